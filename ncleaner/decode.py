"""Decoding raw samples into model inputs (the decode stage).

The image is the first of jpg/jpeg/png/webp present; the caption is the ``txt``
member, else ``caption`` or ``text`` in the ``json`` member. A sample that cannot
be decoded is not dropped: it comes out with a ``status`` saying why
(``ncleaner.schema``), so the report has a row for it and the filter rejects it.

``decode_blocks`` is what every command streams from: whole shards in order,
cut into blocks of decoded, stacked and tokenised pairs, decoded in worker
processes when asked (docs/design.md section 10).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch
from PIL import Image

from . import schema
from .config import DEFAULT_MAX_IMAGE_PIXELS
from .errors import UnreadableShard
from .schema import OK
from .shards import IMAGE_EXTENSIONS, RawSample, image_member, only_dotted, read_shard, read_text_fields, sha1_of


@dataclass
class Pair:
    """A decoded sample: the raw sample, its status, its caption and, when ok, its image tensor."""

    raw: RawSample
    status: str
    caption: str | None = None
    url: str | None = None
    meta: dict = field(default_factory=dict)
    image: torch.Tensor | None = None
    image_sha1: str | None = None  # of the image member's bytes: what an embedding or score was computed from
    size: tuple[int, int] | None = None  # (width, height) from the image's header, where it has one

    @property
    def ok(self) -> bool:
        return self.status == OK


def decode_pair(
    raw: RawSample,
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Pair:
    """Decode one sample; failures become a status, never an exception.

    An image larger than ``max_pixels`` is refused from its header, before any
    pixel is decoded.
    """
    caption, url, meta, text_status = read_text_fields(raw)
    image_bytes = image_member(raw)
    # Hashed whatever the status: a report or an embedding names the bytes it judged, usable or not.
    pair = Pair(
        raw=raw, status=raw.problem or text_status, caption=caption, url=url, meta=meta, image_sha1=sha1_of(image_bytes)
    )
    if raw.problem:
        return pair  # the tar itself disqualifies the sample: its image is not worth decoding
    if image_bytes is None:
        ambiguous = only_dotted(raw.members, IMAGE_EXTENSIONS)
        pair.status = schema.AMBIGUOUS_MEMBERS if ambiguous else schema.MISSING_IMAGE
        return pair
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image_bytes)) as img:
                pair.size = img.size
                if img.width * img.height > max_pixels:
                    pair.status = schema.TOO_LARGE
                    return pair
                img.load()
                tensor = preprocess(img.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        pair.status = schema.TOO_LARGE
        return pair
    except Exception:  # PIL raises many types for corrupt or truncated files
        pair.status = schema.BAD_IMAGE
        return pair
    if pair.ok:
        pair.image = tensor
    return pair


def image_size(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) of an image from its header alone (nothing decoded), or None where there is
    no image or no readable header: what a report records where the image is not decoded again."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # PIL raises many types for a file that is not an image
        return None


def decode_stream(
    raws: Iterable[RawSample],
    preprocess: Callable[[Image.Image], torch.Tensor],
    threads: int = 2,
    chunk: int = 256,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[Pair]:
    """Decode samples in order, ``threads`` at a time (PIL releases the GIL while decoding)."""
    it = iter(raws)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        while block := list(islice(it, chunk)):
            yield from pool.map(lambda r: decode_pair(r, preprocess, max_pixels=max_pixels), block)


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while block := list(islice(it, size)):
        yield block


@dataclass
class DecodedBlock:
    """Up to ``batch_size`` consecutive pairs of one shard, ready for the encoder.

    ``pairs`` keep everything but the image (their raw members are dropped: nothing after
    decoding needs them); ``images`` and ``tokens`` stack the ok pairs', in order. The last
    block of a shard has ``last`` set and carries the reader's ``damage`` note, or the
    ``error`` that made the shard unreadable (then it holds no pairs).
    """

    shard_index: int
    url: str
    pairs: list[Pair]
    images: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    last: bool = False
    damage: str | None = None
    error: str | None = None

    def pin_memory(self) -> DecodedBlock:
        """Page-locked copies of the stacked inputs (DataLoader calls this with ``pin_memory``)."""
        if self.images is not None:
            self.images, self.tokens = self.images.pin_memory(), self.tokens.pin_memory()
        return self


class _ShardBlocks(torch.utils.data.IterableDataset):
    """Shards ``i`` with ``i % workers == worker id``, each decoded whole by that one worker.

    Whole shards per worker keep a shard's samples in order and let the reader see the
    whole tar (hard links, truncation); DataLoader takes one block from each worker in
    turn, so which worker decodes what, and what the caller receives, depend only on the
    shard list and the worker count.
    """

    def __init__(self, urls, preprocess, tokenizer, batch_size: int, max_pixels: int, threads: int, first: int = 0):
        self.urls, self.preprocess, self.tokenizer = list(urls), preprocess, tokenizer
        self.batch_size, self.max_pixels, self.threads = batch_size, max_pixels, threads
        self.first = first  # the first shard's index in the caller's list

    def __iter__(self) -> Iterator[DecodedBlock]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i in range(worker, len(self.urls), workers):
            yield from self._shard(self.first + i, self.urls[i])

    def _shard(self, i: int, url: str) -> Iterator[DecodedBlock]:
        reader = read_shard(url)
        pairs = decode_stream(reader, self.preprocess, threads=self.threads, max_pixels=self.max_pixels)
        block = None
        try:
            for chunk in batched(pairs, self.batch_size):
                if block is not None:
                    yield block
                block = self._block(i, url, chunk)
        except UnreadableShard as exc:
            # Sent as data: an exception would end every worker's stream, not just this shard's.
            yield DecodedBlock(i, url, [], last=True, error=str(exc))
            return
        block = block or DecodedBlock(i, url, [])
        block.last, block.damage = True, reader.damage
        yield block

    def _block(self, i: int, url: str, chunk: list[Pair]) -> DecodedBlock:
        ok = [p for p in chunk if p.ok]
        block = DecodedBlock(i, url, chunk)
        if ok:
            block.images = torch.stack([p.image for p in ok])
            block.tokens = self.tokenizer([p.caption for p in ok])
        for p in chunk:
            p.image = None
            p.raw = dataclasses.replace(p.raw, entries=[])
        return block


# Shards a decode worker process decodes before it is replaced by a fresh one (see decode_blocks).
SHARDS_PER_WORKER = 16


def decode_blocks(
    urls: Iterable[str],
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int,
    workers: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    pin_memory: bool = False,
    threads: int = 2,
) -> Iterator[DecodedBlock]:
    """Every shard's blocks, decoded and tokenised; with ``workers`` > 0 in that many processes.

    Blocks of one shard come in order, and a shard's last block has ``last`` set. With
    several workers, blocks of up to ``workers`` consecutive shards are interleaved (one
    from each worker in turn), so a caller keeps one accumulator per open shard. Memory
    stays bounded: each worker runs at most two blocks ahead, and is replaced after
    ``SHARDS_PER_WORKER`` shards. ``workers=0`` decodes in
    this process (``threads`` threads), which is what a caller with a single shard wants.
    """
    urls = list(urls)
    if workers <= 0:
        yield from _ShardBlocks(urls, preprocess, tokenizer, batch_size, max_pixels, threads=threads)
        return
    # Fresh worker processes every SHARDS_PER_WORKER shards each: a worker's memory grew by about
    # 10 MB a shard it decoded, to ~1.4 GB (measured on 192 shards, with fork and forkserver alike),
    # and starting a forked worker costs a fraction of a second.
    group = workers * SHARDS_PER_WORKER
    for first in range(0, len(urls), group):
        dataset = _ShardBlocks(urls[first : first + group], preprocess, tokenizer, batch_size, max_pixels, 1, first)
        yield from torch.utils.data.DataLoader(
            dataset,
            batch_size=None,  # a block is already a batch
            num_workers=min(workers, len(dataset.urls)),
            pin_memory=pin_memory,
            prefetch_factor=2,
            worker_init_fn=functools.partial(_init_worker, os.getpid()),
        )


def by_shard(blocks: Iterable) -> Iterator[list]:
    """Blocks (anything with ``shard_index`` and ``last``) grouped per shard, shards in order.

    ``decode_blocks`` interleaves the shards its workers decode at the same time; grouping
    here, and holding a shard that finished early until those before it are done, makes
    what a caller sees independent of the worker count.
    """
    open_shards: dict[int, list] = {}
    finished: dict[int, list] = {}
    following = 0  # decode_blocks numbers its shards from 0
    for block in blocks:
        open_shards.setdefault(block.shard_index, []).append(block)
        if not block.last:
            continue
        finished[block.shard_index] = open_shards.pop(block.shard_index)
        while following in finished:
            yield finished.pop(following)
            following += 1


def _init_worker(creator: int, _worker_id: int) -> None:
    # Decoding processes share the cores with the encoder: one torch thread each.
    torch.set_num_threads(1)
    _end_with_parent(creator)


# Seconds between a decode worker's checks that its parent still lives.
PARENT_CHECK_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1


def _end_with_parent(creator: int) -> None:
    """End this worker process soon after the process that started it dies.

    A parent killed with SIGKILL (the OOM killer, a scheduler) runs no clean-up, and
    DataLoader's own check does not help a worker blocked on a full queue: its queue
    thread waits forever on a pipe the other workers still hold open, and the worker
    lives on, reparented, holding its memory. On Linux the kernel kills the worker
    when its parent dies (PR_SET_PDEATHSIG); elsewhere, and should the parent die
    before that is set, a thread sees the worker reparented and ends the process.
    ``creator`` is the pid of the process that built the DataLoader: under ``fork``
    it is the parent, and a parent other than it that it outlived means it died first.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent != creator and not _alive(creator):
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="ncleaner-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
