"""The Ray engine: ``embed``, ``score`` and ``filter`` one shard per work item on a Ray cluster
(docs/design.md section 12).

Each command runs the same unit of work as the local engine, on one shard at a time:

- ``score``: ``report.write_shard_report`` on the features of the shard, in an actor that
  loaded the model once; it writes the shard's report part and marker itself.
- ``embed`` (and the embedding part of ``fit``): ``embeddings.write_embedding_part``, in an
  actor that built the backbone once; it writes the shard's part of the embeddings directory.
- ``filter``: ``filtering.route_shard`` in a task per input shard, writing the shard's kept
  and rejected samples as ``writer.ShardPiece``s; tasks then cut the pieces into the very
  shards the local engine's ``ShardSink`` writes (``writer.shard_layout``).

Only shard names, counts and byte offsets travel through Ray; sample bytes are read and
written by ncleaner's own reader and writer on storage every node reaches (a shared file
system), never through Ray Data's ``read_webdataset`` / ``write_webdataset``. The work
items are a plain list scheduled on a fixed pool of actors (``_run_on_actors``), not a Ray
Data pipeline: there is nothing to stream between stages, and a Ray Data read stage would
need CPUs of its own while the actors hold theirs (two 1-CPU actors on a 2-CPU Ray wait
forever for a read task to run).

Nothing here imports Ray, or torch, before it is used: ``filter`` and the local engine
never pay for it, and a missing Ray is a one-line error naming the extra to install.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import NcleanerError, first_line

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
# A worker killed in the middle of a shard (a preempted node, the OOM killer) is restarted
# and its shard retried this many times before the run stops; a re-run resumes either way.
RETRIES = 2
# Ray's object store holds nothing larger than a shard's byte offsets here: a local Ray
# started for the run needs little of it (Ray's default is 30 % of the memory, in /dev/shm).
LOCAL_OBJECT_STORE_BYTES = 256 << 20
# Seconds to wait for a TCP connection to --ray-address before saying it is unreachable
# (ray.init itself retries for minutes, printing a warning every few seconds).
CONNECT_TIMEOUT_S = 10.0
PIECES = ".pieces"


def check_engine(engine: str, ray_address: str | None) -> None:
    """Refuse an unknown engine, an address without ``ray``, and ``ray`` without Ray installed,
    before any work starts."""
    if engine not in ENGINES:
        raise NcleanerError(f"--engine {engine}: must be one of {', '.join(ENGINES)}")
    if engine == "local":
        if ray_address is not None:
            raise NcleanerError("--ray-address: only with --engine ray")
        return
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


def _worker_device(device: str) -> str:
    # Ray shows an actor only its own GPU(s), as cuda:0: a driver's cuda:N means "a GPU" there.
    return "cuda" if device.startswith("cuda") else device


def _run_on_actors(
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
    """Run ``worker_class(*init).run(url, name)`` for every item on a pool of actors.

    Each actor holds its model from start to end and takes the next shard as soon as it has
    written the last one; ``done(name, answer)`` is called here, in completion order. A
    worker whose process dies is restarted and its shard retried (``RETRIES``); an answer
    ``{"fatal": message}`` (a model that cannot load, a backbone giving non-finite features)
    stops the run with that one line.
    """
    from tqdm.auto import tqdm

    count, resources = _worker_resources(ray, device, actors_per_gpu)
    remote = ray.remote(worker_class).options(**resources, max_restarts=RETRIES, max_task_retries=RETRIES)
    actors = [remote.remote(*init) for _ in range(min(count, len(items)))]
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


class _ShardWorker:
    """What every ncleaner Ray actor does: set up once (``_setup``: a model, a backbone), then
    one shard per ``run`` call (``_shard``).

    A setup that fails with an NcleanerError is kept and answered to the driver as
    ``{"fatal": message}`` on the first call, one line rather than an actor-creation
    traceback; so is an NcleanerError from a shard (non-finite features, a refused model).
    """

    def __init__(self, *args):
        import torch

        torch.set_num_threads(1)  # one CPU declared, one used by torch; decoding has two threads
        self.failure = None
        try:
            self._setup(*args)
        except NcleanerError as exc:
            self.failure = str(exc)

    def run(self, url: str, name: str) -> dict:
        if self.failure:
            return {"fatal": self.failure}
        try:
            return self._shard(url, name)
        except NcleanerError as exc:
            return {"fatal": str(exc)}


class _ScoreWorker(_ShardWorker):
    """The model loaded once; each shard scored and its report part and marker written."""

    def _setup(self, model_dir: str, out_dir: str, store, options: dict) -> None:
        from .backbone import resolve_device
        from .model import NcleanerModel

        self.out, self.store, self.options = Path(out_dir), store, options
        device = resolve_device(_worker_device(options["device"]))
        self.model = NcleanerModel.load(model_dir, device, allow_download=options["allow_download"])

    def _shard(self, url: str, name: str) -> dict:
        from .embeddings import model_features
        from .report import write_shard_report

        o = self.options
        stream = model_features(
            self.model,
            [url],
            [name],
            store=self.store,
            batch_size=o["batch_size"],
            workers=0,
            max_pixels=o["max_image_pixels"],
        )
        return write_shard_report(self.model, next(stream), self.out, name, keep_json_fields=o["keep_json_fields"])


def score_on_ray(
    todo: list[tuple[str, str]],
    model_dir,
    out_dir: Path,
    *,
    store,
    keep_json_fields,
    batch_size: int,
    device: str,
    max_image_pixels: int,
    ray_address: str | None,
    allow_download: bool,
    progress: bool,
    actors_per_gpu: int = 1,
) -> dict[str, dict]:
    """Score ``score``'s shards ``todo`` ((url, name) each) on Ray; per shard name, what
    ``report.write_shard_report`` answered in the worker that wrote it."""
    options = {
        "device": device,
        "allow_download": allow_download,
        "batch_size": batch_size,
        "max_image_pixels": max_image_pixels,
        "keep_json_fields": list(keep_json_fields),
    }
    answers: dict[str, dict] = {}
    with ray_session(ray_address) as ray:
        _run_on_actors(
            ray,
            _ScoreWorker,
            (str(Path(model_dir).resolve()), str(out_dir.resolve()), store, options),
            todo,
            answers.__setitem__,
            device=device,
            actors_per_gpu=actors_per_gpu,
            progress=progress,
            desc=f"scoring {len(todo)} shard(s) on Ray",
        )
    return answers


class _EmbedWorker(_ShardWorker):
    """The backbone built once; each shard encoded and its embeddings part written."""

    def _setup(self, store, options: dict) -> None:
        from .backbone import build_backbone, download_reason, resolve_device
        from .encode import Encoder

        self.store, self.options = store, options
        backbone, pretrained = options["backbone"], options["pretrained"]
        reason = None if options["allow_download"] else download_reason(backbone, pretrained)
        if reason:
            raise NcleanerError(
                f"{backbone}: {reason} on a Ray worker ({socket.gethostname()}); "
                "nothing is downloaded unless allowed (pass --allow-download)"
            )
        device = resolve_device(_worker_device(options["device"]))
        self.model = build_backbone(backbone, pretrained, device)
        source = f"backbone {backbone} ({pretrained})"
        self.encoder = Encoder(self.model, device, precision=options["precision"], source=source)

    def _shard(self, url: str, name: str) -> dict:
        from .embeddings import compute_features, write_embedding_part

        o = self.options
        stream = compute_features(
            [url],
            self.encoder,
            preprocess=self.model.preprocess,
            tokenizer=self.model.tokenizer,
            batch_size=o["batch_size"],
            workers=0,
            max_pixels=o["max_image_pixels"],
        )
        return write_embedding_part(self.store, name, next(stream))


def embed_on_ray(
    todo: list[tuple[str, str]],
    store,
    *,
    backbone: str,
    pretrained: str,
    precision: str,
    batch_size: int,
    device: str,
    max_image_pixels: int,
    ray_address: str | None,
    allow_download: bool,
    progress: bool,
    actors_per_gpu: int = 1,
) -> dict[str, dict]:
    """Encode ``embed``'s shards ``todo`` on Ray, each part written into ``store`` by the worker
    that encoded it; per shard name, what ``embeddings.write_embedding_part`` answered there."""
    options = {
        "backbone": backbone,
        "pretrained": str(Path(pretrained).resolve()) if os.path.isfile(pretrained) else pretrained,
        "precision": precision,
        "device": device,
        "allow_download": allow_download,
        "batch_size": batch_size,
        "max_image_pixels": max_image_pixels,
    }
    answers: dict[str, dict] = {}
    with ray_session(ray_address) as ray:
        _run_on_actors(
            ray,
            _EmbedWorker,
            (store, options),
            todo,
            answers.__setitem__,
            device=device,
            actors_per_gpu=actors_per_gpu,
            progress=progress,
            desc=f"embedding {len(todo)} shard(s) on Ray",
        )
    return answers


def _route_piece(url: str, report, outcomes: list[str], pieces: list[str | None]) -> dict:
    """A Ray task: route one input shard into a kept and a rejected piece (``filtering.route_shard``).

    Returns the byte offsets where each sample ends in each piece, whether the shard is
    damaged, or the error that made it unreadable (then no piece is left).
    """
    from .errors import UnreadableShard
    from .filtering import route_shard
    from .writer import ShardPiece

    sinks = [ShardPiece(p) for p in pieces if p is not None]
    try:
        damaged = route_shard(url, report, outcomes, sinks[0], sinks[1] if len(sinks) > 1 else None)
    except BaseException as exc:
        for sink in sinks:
            sink.abort()
        if isinstance(exc, UnreadableShard):
            return {"error": str(exc), "damaged": False, "ends": [[], []]}
        raise
    for sink in sinks:
        sink.close()
    ends = [sink.ends for sink in sinks]
    return {"error": None, "damaged": damaged, "ends": ends + [[]] * (2 - len(ends))}


def _stitch(path: str, ranges: list[tuple]) -> str:
    """A Ray task: one output shard from byte ranges of pieces (``writer.write_shard_from_pieces``)."""
    from .writer import write_shard_from_pieces

    return str(write_shard_from_pieces(path, ranges))


def filter_on_ray(
    urls: list[str],
    reports: dict,
    outcomes: dict[str, list[str]],
    stages: list[Path | None],
    *,
    maxcount: int,
    ray_address: str | None,
    progress: bool,
) -> tuple[dict, tuple[list[Path], list[Path]]]:
    """Route ``urls`` on Ray into the kept and rejected staging directories ``stages`` (the second
    may be None): per shard (error or None, damaged), and the shards written, as ``filter``'s
    local engine returns them.

    First a task per input shard writes its kept and rejected samples as pieces (under
    ``STAGE/.pieces/``); then a task per output shard copies its samples' bytes out of the
    pieces, in input order, ``maxcount`` to a shard, so the shards are those one
    ``ShardSink`` fed shard after shard would have written. The pieces are removed before the
    stage is committed.
    """
    from tqdm.auto import tqdm

    from .filtering import ROUTE_COLUMNS
    from .shards import shard_names
    from .writer import shard_layout

    for stage in stages:
        if stage is not None:
            (stage / PIECES).mkdir()
    names = dict(zip(urls, shard_names(urls), strict=True))
    routed: dict[str, tuple] = {}
    ends: dict[str, list] = {}
    with ray_session(ray_address) as ray:
        env = {"num_cpus": 1, "max_retries": RETRIES}
        route = ray.remote(_route_piece).options(**env)
        stitch = ray.remote(_stitch).options(**env)
        refs = {}
        for url in urls:
            pieces = [str(s / PIECES / f"{names[url]}.tar") if s is not None else None for s in stages]
            report = reports[url][[c for c in ROUTE_COLUMNS if c in reports[url].columns]]
            refs[route.remote(url, report, outcomes[url], pieces)] = url
        bar = tqdm(total=len(urls), unit="shard", desc="filtering on Ray", disable=not progress, dynamic_ncols=True)
        with bar:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                url = refs.pop(ready[0])
                answer = _get(ray, ready[0], url)
                routed[url] = (answer["error"], answer["damaged"])
                ends[url] = answer["ends"]
                bar.update(1)
        written: list[list[Path]] = [[], []]
        jobs = []
        for role, stage in enumerate(stages):
            if stage is None:
                continue
            pieces = [(str(stage / PIECES / f"{names[u]}.tar"), ends[u][role]) for u in urls if ends[u][role]]
            for j, ranges in enumerate(shard_layout(pieces, maxcount)):
                path = stage / f"{j:05d}.tar"
                written[role].append(path)
                jobs.append(stitch.remote(str(path), ranges))
        for ref in jobs:
            _get(ray, ref, "filter output")
    for stage in stages:
        if stage is not None:
            for piece in (stage / PIECES).iterdir():
                piece.unlink()
            (stage / PIECES).rmdir()
    return routed, (written[0], written[1])
