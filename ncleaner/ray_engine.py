"""The Ray engine: any stage's per-shard jobs and tasks on a Ray cluster (docs/design.md section 12).

It runs what ``ncleaner.engine`` hands it and imports no stage: a ``ShardJob`` class on a
fixed pool of actors, each set up once (``run_on_actors``: ``scoring.ScoreJob`` loads the model,
``embeddings.EmbedJob`` builds the backbone, and each writes its shard's part itself), or
stateless task functions (``run_remote``: ``filter``'s route and stitch steps, in
``filtering``).

Only shard names, counts and byte offsets travel through Ray; sample bytes are read and
written by ncleaner's own reader and writer on storage every node reaches (a shared file
system), never through Ray Data's ``read_webdataset`` / ``write_webdataset``. The work
items are a plain list scheduled on a fixed pool of actors, not a Ray Data pipeline: there is
nothing to stream between stages, and a Ray Data read stage would need CPUs of its own while
the actors hold theirs (two 1-CPU actors on a 2-CPU Ray wait forever for a read task to run).

Nothing here imports Ray before it is used, and a missing Ray is a one-line error naming the
extra to install.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import NcleanerError, first_line

logger = logging.getLogger(__name__)

# A worker killed in the middle of a shard (a preempted node, the OOM killer) is restarted
# and its shard retried this many times before the run stops; a re-run resumes either way.
RETRIES = 2
# Ray's object store holds nothing larger than a shard's byte offsets here: a local Ray
# started for the run needs little of it (Ray's default is 30 % of the memory, in /dev/shm).
LOCAL_OBJECT_STORE_BYTES = 256 << 20
# Seconds to wait for a TCP connection to --ray-address before saying it is unreachable
# (ray.init itself retries for minutes, printing a warning every few seconds).
CONNECT_TIMEOUT_S = 10.0


def check_ray(ray_address: str | None) -> None:
    """Ray installed, and at ``ray_address`` (HOST:PORT) something listening: one line at once
    otherwise (``engine.check_engine``)."""
    _import_ray()
    if ray_address not in (None, "auto"):
        _check_reachable(ray_address)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise NcleanerError(
            f"--engine ray needs Ray, which is not installed ({first_line(exc)}): pip install 'ncleaner[ray]'"
        ) from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator:
    """Ray, connected for the length of the block.

    An existing connection of the caller's (``ray.init`` called before) is used as it is and
    left open. Otherwise ``address`` None starts a local Ray with this process's cores, which
    ends with the block; ``auto`` joins the cluster ``ray start``
    made on this machine; ``HOST:PORT`` (or ``ray://HOST:PORT``) another one.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    common = {"include_dashboard": False, "logging_level": logging.WARNING, "runtime_env": _package_env()}
    try:
        if address is None:
            ray.init(num_cpus=len(os.sched_getaffinity(0)), object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
        else:
            ray.init(address=address, **common)
    except ConnectionError as exc:
        raise NcleanerError(f"--ray-address {address}: no Ray cluster there ({first_line(exc)})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """One line at once for an address nothing listens on, where ``ray.init`` would retry for minutes."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise NcleanerError(f"--ray-address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise NcleanerError(
            f"--ray-address {address}: no Ray cluster reachable there ({exc.strerror or first_line(exc)}); "
            "start one with ray start --head, or leave --ray-address out for a local Ray"
        ) from None


def _package_env() -> dict:
    """The job's runtime environment: this very ``ncleaner`` shipped to every worker, so that the
    cluster runs the driver's code.

    Its dependencies (torch, open_clip, ...) must be installed on every node
    (``pip install 'ncleaner[ray]'``); the package itself, a few hundred KB, travels with
    the job, so a node holding another version, or none, cannot change the results. (Ray
    uploads a local directory only for a whole job, at ``ray.init``: a caller that connected
    Ray itself makes ncleaner importable on its workers its own way.)
    """
    import ncleaner

    return {"py_modules": [str(Path(ncleaner.__file__).parent)]}


def _worker_resources(ray, device: str, actors_per_gpu: int) -> tuple[int, dict]:
    """How many actors to start and the resources each declares.

    One CPU each, and on a cluster with GPUs (unless ``device`` is ``cpu``) ``1 /
    actors_per_gpu`` of a GPU each. Nothing else of the run needs a CPU while the actors
    live, so actors on every CPU cannot starve another stage of it.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    cpus = int(resources.get("CPU", 0))
    if device.startswith("cuda") and not gpus:
        raise NcleanerError(f"--device {device}: the Ray cluster has no GPUs")
    if cpus < 1:
        raise NcleanerError("the Ray cluster has no CPU to run a worker on (ray start --num-cpus)")
    # Never more actors than CPUs: one that can never be placed would hold its shard forever.
    if gpus:
        return min(gpus * actors_per_gpu, cpus), {"num_cpus": 1, "num_gpus": 1 / actors_per_gpu}
    return cpus, {"num_cpus": 1, "num_gpus": 0}


def run_on_actors(
    ray,
    worker_class: type,
    init: tuple,
    items: list[tuple[str, str]],
    done: Callable[[str, dict], None],
    *,
    device: str,
    actors_per_gpu: int,
    progress: bool,
    desc: str,
) -> None:
    """Run ``worker_class(*init).run(url, name)`` (an ``engine.ShardJob``) for every item on a pool of actors.

    Each actor holds its model from start to end and takes the next shard as soon as it has
    written the last one; ``done(name, answer)`` is called here, in completion order. A
    worker whose process dies is restarted and its shard retried (``RETRIES``); an answer
    ``{"fatal": message}`` (a model that cannot load, a backbone giving non-finite features)
    stops the run with that one line.
    """
    from tqdm.auto import tqdm

    count, resources = _worker_resources(ray, device, actors_per_gpu)
    remote = ray.remote(_Actor).options(**resources, max_restarts=RETRIES, max_task_retries=RETRIES)
    actors = [remote.remote(worker_class, init) for _ in range(min(count, len(items)))]
    queue = deque(items)
    pending: dict = {}
    idle = list(actors)
    bar = tqdm(total=len(items), unit="shard", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        while queue or pending:
            while idle and queue:
                actor, (url, name) = idle.pop(), queue.popleft()
                pending[actor.run.remote(url, name)] = (actor, url, name)
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, url, name = pending.pop(ready[0])
            answer = _get(ray, ready[0], url)
            if "fatal" in answer:
                raise NcleanerError(answer["fatal"])
            done(name, answer)
            idle.append(actor)
            bar.update(1)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


class _Actor:
    """A job on a Ray worker: set up once, then one shard a call. The worker declares one CPU, so
    torch, where the job uses it, is held to one thread (the local engine uses the machine's)."""

    def __init__(self, job_class: type, init: tuple):
        self.job = job_class(*init)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)

    def run(self, url: str, name: str) -> dict:
        return self.job.run(url, name)


def _get(ray, ref, url: str):
    """A worker's answer; a worker that died more often than it may, or raised, is one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, NcleanerError):
            raise NcleanerError(str(cause)) from None  # it names its file already
        if isinstance(cause, OSError):
            raise NcleanerError(f"{url}: {cause.strerror or first_line(cause)}") from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
        raise NcleanerError(
            f"{url}: the Ray worker on it died {RETRIES + 1} times ({first_line(exc)}); "
            "finished shards are kept, run the command again to resume"
        ) from None


def run_remote(ray, fn: Callable, args: list[tuple], *, labels: list[str], progress: bool, desc: str) -> list:
    """``fn(*a)`` for every ``a`` of ``args`` as Ray tasks of one CPU, retried ``RETRIES`` times
    when their worker dies; the results in the order of ``args``. ``labels[i]`` names task i in
    an error (``_get``)."""
    from tqdm.auto import tqdm

    remote = ray.remote(fn).options(num_cpus=1, max_retries=RETRIES)
    refs = {remote.remote(*a): i for i, a in enumerate(args)}
    results: list = [None] * len(args)
    with tqdm(total=len(args), unit="shard", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready[0])
            results[i] = _get(ray, ready[0], labels[i])
            bar.update(1)
    return results
