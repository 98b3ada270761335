"""The engine layer: how a stage runs, what it hands to an engine, and how it counts its shards.

- ``RunOptions``: where and how a stage runs (engine, Ray address, device, decoding workers,
  actors per GPU, progress), one object every stage takes as ``run=`` and the CLI builds once.
- ``ShardJob`` and ``run_shard_jobs``: a stage's per-shard work (set up once per worker, then
  one shard a call), run in this process or on Ray. The Ray engine (``ncleaner.ray_engine``)
  runs any job and imports no stage, so a new stage needs no edit of it (as datatrove's
  pipeline steps never import an executor). Each stage's job lives with its stage
  (``scoring.ScoreJob``, ``embeddings.EmbedJob``); ``ray_tasks`` runs stateless task functions
  (``filter``'s route and stitch steps). ``score`` and ``embed`` run locally through their own
  stream, which pipelines decoding across shards, and hand only their Ray work here.
- ``ShardTally``: the one count of per-shard answers, with ``--on-bad-shard``; the base of the
  stages' results.

Nothing here imports Ray, or torch, before it is used: ``filter`` and the local engine never
pay for them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import NcleanerError, UnreadableShard

ENGINES = ("local", "ray")
ON_BAD_SHARD = ("fail", "skip")


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


def check_on_bad_shard(on_bad_shard: str) -> None:
    if on_bad_shard not in ON_BAD_SHARD:
        raise NcleanerError(f"--on-bad-shard {on_bad_shard}: must be one of {', '.join(ON_BAD_SHARD)}")


@dataclass(frozen=True)
class RunOptions:
    """Where and how a stage runs, one object for every stage: none of it changes the stage's
    output (the local and Ray engines write the same bytes, any number of workers gives the same
    rows), so none of it belongs in a model's configuration.

    Attributes:
        engine: ``local`` (this process and its decoding workers) or ``ray``: one work item per
            shard on a Ray cluster (``ncleaner.ray_engine``).
        ray_address: with ``engine="ray"``: None starts a local Ray for the run, ``auto`` joins
            the cluster ``ray start`` made on this machine, ``HOST:PORT`` another one.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present).
        workers: local decoding processes (None: one per core, at most one per shard; 0: decode
            in the main process).
        actors_per_gpu: with ``engine="ray"`` on GPUs, workers sharing each GPU, each decoding
            on its own CPU (more of them feed a fast GPU better; docs/design.md section 12).
        progress: show progress bars.
    """

    engine: str = "local"
    ray_address: str | None = None
    device: str = "auto"
    workers: int | None = None
    actors_per_gpu: int = 1
    progress: bool = False

    def check(self) -> None:
        """Refuse what cannot run (``check_engine``, a negative worker count) before any work."""
        check_engine(self.engine, self.ray_address)
        if self.workers is not None and self.workers < 0:
            raise NcleanerError(f"--workers {self.workers}: must be 0 or more")
        if self.actors_per_gpu < 1:
            raise NcleanerError(f"--ray-actors-per-gpu {self.actors_per_gpu}: must be 1 or more")

    @property
    def on_ray(self) -> bool:
        return self.engine == "ray"

    def decode_workers(self, shards: int) -> int:
        """Local decoding processes for ``shards`` shards: ``workers``, or by default one per core,
        never more than there are shards."""
        if self.workers is not None:
            return self.workers
        return max(1, min(len(os.sched_getaffinity(0)), shards))


# The stages' default: this machine, CUDA when present, one decoding process per core, quiet.
DEFAULT_RUN = RunOptions()


@dataclass(kw_only=True)
class ShardTally:
    """What a stage did, shard by shard: the one count every stage keeps, so that its counts
    mean the same in every result.

    Attributes:
        statuses: samples per status, over the shards done now and those done before.
        done_now: shards this run processed, in input order.
        done_before: shards an earlier run had finished (resumed over, not read again).
        unreadable_shards: shards that could not be read, with why (``on_bad_shard="skip"``).
        truncated_shards: shards that ended early; their samples up to the damage were counted.
    """

    statuses: Counter = field(default_factory=Counter)
    done_now: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)
    unreadable_shards: dict[str, str] = field(default_factory=dict)
    truncated_shards: list[str] = field(default_factory=list)

    def count(self, answer: dict, *, on_bad_shard: str, log: logging.Logger) -> bool:
        """Count one shard's answer: ``{"shard", "statuses", "damage"}`` for a shard that was read,
        ``{"shard", "error"}`` for one that was not. An unreadable shard stops the run
        (``fail``: UnreadableShard with the reason) or is warned about on ``log`` and listed
        (``skip``); False then, True for a counted shard."""
        url = answer["shard"]
        if "error" in answer:
            if on_bad_shard == "fail":
                raise UnreadableShard(answer["error"])
            log.warning("skipped %s", answer["error"])
            self.unreadable_shards[url] = answer["error"]
            return False
        self.done_now.append(url)
        self.statuses.update(answer.get("statuses", {}))
        if answer.get("damage"):
            self.truncated_shards.append(url)
        return True


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
    run: RunOptions,
    desc: str,
) -> dict[str, dict]:
    """``job(*init).run(url, name)`` for every (url, name) of ``todo``; per shard name, its answer.

    On the Ray engine, on a pool of workers each set up once (``run``'s device and actors per
    GPU); locally, one job set up in this process runs the shards one after another. A
    ``{"fatal": message}`` answer stops the run with that line on either. This is all a new
    per-shard stage needs from an engine (docs/design.md section 12 has the smallest one); a
    stage whose local engine pipelines decoding across shards (``score``, ``embed``) runs that
    stream itself and hands only its Ray work here.
    """
    answers: dict[str, dict] = {}
    if not run.on_ray:
        from tqdm.auto import tqdm

        worker = job(*init)
        for url, name in tqdm(todo, unit="shard", desc=desc, disable=not run.progress, dynamic_ncols=True):
            answer = worker.run(url, name)
            if "fatal" in answer:
                raise NcleanerError(answer["fatal"])
            answers[name] = answer
        return answers
    from .ray_engine import ray_session, run_on_actors

    with ray_session(run.ray_address) as ray:
        run_on_actors(
            ray,
            job,
            init,
            todo,
            answers.__setitem__,
            device=run.device,
            actors_per_gpu=run.actors_per_gpu,
            progress=run.progress,
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
