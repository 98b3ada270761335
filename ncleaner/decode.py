"""Decoding raw samples into model inputs (the decode stage).

The image is the first of jpg/jpeg/png/webp present; the caption is the ``txt``
member, else ``caption`` or ``text`` in the ``json`` member. A sample that cannot
be decoded is not dropped: it comes out with a ``status`` saying why, so the
report has a row for it and the filter rejects it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch
from PIL import Image

from .shards import RawSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JSON_CAPTION_FIELDS = ("caption", "text")

OK = "ok"
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"
MISSING_CAPTION = "missing_caption"
BAD_JSON = "bad_json"


@dataclass
class Pair:
    """A decoded sample: the raw sample, its status, its caption and, when ok, its image tensor."""

    raw: RawSample
    status: str
    caption: str | None = None
    url: str | None = None
    meta: dict = field(default_factory=dict)
    image: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def _member(members: dict[str, bytes], extension: str) -> bytes | None:
    for name, data in members.items():
        if name.lower() == extension:
            return data
    return None


def read_text_fields(raw: RawSample) -> tuple[str | None, str | None, dict, str]:
    """(caption, url, json metadata, status) of a sample, without touching its image."""
    meta: dict = {}
    status = OK
    json_bytes = _member(raw.members, "json")
    if json_bytes is not None:
        try:
            parsed = json.loads(json_bytes.decode("utf-8"))
            meta = parsed if isinstance(parsed, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            status = BAD_JSON
    caption = None
    txt = _member(raw.members, "txt")
    if txt is not None:
        caption = txt.decode("utf-8", errors="replace")
    else:
        for name in JSON_CAPTION_FIELDS:
            if isinstance(meta.get(name), str):
                caption = meta[name]
                break
    if caption is not None and not caption.strip():
        caption = None
    if caption is None and status == OK:
        status = MISSING_CAPTION
    elif caption is not None:
        # A broken json does not matter when the txt member gives the caption.
        status = OK
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    return caption, url, meta, status


def decode_pair(raw: RawSample, preprocess: Callable[[Image.Image], torch.Tensor]) -> Pair:
    """Decode one sample; failures become a status, never an exception."""
    caption, url, meta, text_status = read_text_fields(raw)
    pair = Pair(raw=raw, status=text_status, caption=caption, url=url, meta=meta)
    image_bytes = next((d for ext in IMAGE_EXTENSIONS if (d := _member(raw.members, ext)) is not None), None)
    if image_bytes is None:
        pair.status = MISSING_IMAGE
        return pair
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.load()
            tensor = preprocess(img.convert("RGB"))
    except Exception:  # PIL raises many types for corrupt or truncated files
        pair.status = BAD_IMAGE
        return pair
    if pair.ok:
        pair.image = tensor
    return pair


def decode_stream(
    raws: Iterable[RawSample],
    preprocess: Callable[[Image.Image], torch.Tensor],
    threads: int = 2,
    chunk: int = 256,
) -> Iterator[Pair]:
    """Decode samples in order, ``threads`` at a time (PIL releases the GIL while decoding)."""
    it = iter(raws)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        while block := list(islice(it, chunk)):
            yield from pool.map(lambda r: decode_pair(r, preprocess), block)


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while block := list(islice(it, size)):
        yield block
