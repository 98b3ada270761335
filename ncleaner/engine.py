"""The engine layer: what a stage hands to an engine, and the one place that picks the engine.

A stage (``score``, ``embed``, ``filter``) runs locally by itself: its shards stream through
decode and encode in this process and its decode workers. For ``--engine ray`` it describes
its per-shard work as a job and hands it here; the Ray engine (``ncleaner.ray_engine``) runs
any job and imports no stage, so a new stage needs no edit of the Ray module (as datatrove's
pipeline steps never import an executor). Each stage's Ray job lives with its stage:
``scoring.ScoreJob``, ``embeddings.EmbedJob``, and ``filter``'s two task functions in
``filtering``.

Nothing here imports Ray, or torch, before it is used: ``filter`` and the local engine never
pay for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import NcleanerError

ENGINES = ("local", "ray")


def check_engine(engine: str, ray_address: str | None) -> None:
    """Refuse an unknown engine, an address without ``ray``, and ``ray`` without Ray installed
    or with an address nothing listens on, before any work starts."""
    if engine not in ENGINES:
        raise NcleanerError(f"--engine {engine}: must be one of {', '.join(ENGINES)}")
    if engine == "local":
        if ray_address is not None:
            raise NcleanerError("--ray-address: only with --engine ray")
        return
    from .ray_engine import check_ray

    check_ray(ray_address)


def worker_device(device: str) -> str:
    """The device a job's worker uses for the run's ``device``: Ray shows an actor only its own
    GPU(s), as cuda:0, so a driver's cuda:N means "a GPU" there."""
    return "cuda" if device.startswith("cuda") else device


class ShardJob:
    """One stage's work on one shard at a time, in a worker that sets up once.

    A subclass defines ``_setup(*init)`` (load a model, build a backbone) and ``_shard(url,
    name) -> dict`` (the shard's answer, which the stage counts as its local engine would).
    A setup that fails with an NcleanerError is kept and answered as ``{"fatal": message}`` on
    the first call, one line rather than a worker-creation traceback; so is an NcleanerError
    from a shard (non-finite features, a refused model): the engine stops the run with it.
    """

    def __init__(self, *init):
        import torch

        torch.set_num_threads(1)  # one CPU declared per worker, one used by torch
        self.failure = None
        try:
            self._setup(*init)
        except NcleanerError as exc:
            self.failure = str(exc)

    def _setup(self, *init) -> None:
        raise NotImplementedError

    def _shard(self, url: str, name: str) -> dict:
        raise NotImplementedError

    def run(self, url: str, name: str) -> dict:
        if self.failure:
            return {"fatal": self.failure}
        try:
            return self._shard(url, name)
        except NcleanerError as exc:
            return {"fatal": str(exc)}


def run_shard_jobs(
    job: type[ShardJob],
    init: tuple,
    todo: list[tuple[str, str]],
    *,
    ray_address: str | None,
    device: str,
    actors_per_gpu: int,
    progress: bool,
    desc: str,
) -> dict[str, dict]:
    """``job(*init).run(url, name)`` for every (url, name) of ``todo`` on the Ray engine, on a pool
    of workers each set up once; per shard name, its answer."""
    from .ray_engine import ray_session, run_on_actors

    answers: dict[str, dict] = {}
    with ray_session(ray_address) as ray:
        run_on_actors(
            ray,
            job,
            init,
            todo,
            answers.__setitem__,
            device=device,
            actors_per_gpu=actors_per_gpu,
            progress=progress,
            desc=desc,
        )
    return answers


@contextmanager
def ray_tasks(ray_address: str | None) -> Iterator[Callable[..., list]]:
    """For the length of the block, ``run(fn, args, labels=..., progress=..., desc=...)``: stateless
    tasks ``fn(*a)`` for every ``a`` of ``args`` on the Ray engine (one CPU each, retried as a
    shard is), their results in the order of ``args``; ``labels`` name each task in an error.
    One Ray session serves every call, so a stage of several steps starts Ray once."""
    from .ray_engine import ray_session, run_remote

    with ray_session(ray_address) as ray:
        yield functools.partial(run_remote, ray)
