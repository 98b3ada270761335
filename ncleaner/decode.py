"""Decoding raw samples into model inputs (the decode stage).

The image is the first of jpg/jpeg/png/webp present; the caption is the ``txt``
member, else ``caption`` or ``text`` in the ``json`` member. A sample that cannot
be decoded is not dropped: it comes out with a ``status`` saying why
(``ncleaner.schema``), so the report has a row for it and the filter rejects it.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch
from PIL import Image

from . import schema
from .config import DEFAULT_MAX_IMAGE_PIXELS
from .schema import OK
from .shards import RawSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JSON_CAPTION_FIELDS = ("caption", "text")


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


def _ambiguous(members: dict[str, bytes], extensions: Iterable[str]) -> bool:
    """Whether a wanted member only exists under a dotted name (``001.jpg`` in sample ``img``)."""
    return any(name.lower().endswith(f".{ext}") for name in members for ext in extensions)


def read_text_fields(raw: RawSample) -> tuple[str | None, str | None, dict, str]:
    """(caption, url, json metadata, status) of a sample, without touching its image."""
    meta: dict = {}
    json_status = OK
    json_bytes = _member(raw.members, "json")
    if json_bytes is not None:
        try:
            parsed = json.loads(json_bytes.decode("utf-8"))
            meta = parsed if isinstance(parsed, dict) else {}
        except (UnicodeDecodeError, ValueError, RecursionError):  # a deeply nested json overflows the parser
            json_status = schema.BAD_JSON
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    txt = _member(raw.members, "txt")
    if txt is not None:
        try:
            caption = txt.decode("utf-8")
        except UnicodeDecodeError:
            # Shown in the report for the curator, never scored: replacement characters are not a caption.
            return txt.decode("utf-8", errors="replace"), url, meta, schema.BAD_CAPTION
        # A broken json does not matter when the txt member gives the caption.
        return (caption, url, meta, OK) if caption.strip() else (None, url, meta, schema.MISSING_CAPTION)
    caption = next((meta[f] for f in JSON_CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
    if caption is not None and caption.strip():
        return caption, url, meta, json_status
    if json_status != OK:
        return None, url, meta, json_status
    if _ambiguous(raw.members, ("txt", "json")):
        return None, url, meta, schema.AMBIGUOUS_MEMBERS
    return None, url, meta, schema.MISSING_CAPTION


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
    pair = Pair(raw=raw, status=raw.problem or text_status, caption=caption, url=url, meta=meta)
    if raw.problem:
        return pair  # the tar itself disqualifies the sample: its image is not worth decoding
    image_bytes = next((d for ext in IMAGE_EXTENSIONS if (d := _member(raw.members, ext)) is not None), None)
    if image_bytes is None:
        ambiguous = _ambiguous(raw.members, IMAGE_EXTENSIONS)
        pair.status = schema.AMBIGUOUS_MEMBERS if ambiguous else schema.MISSING_IMAGE
        return pair
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image_bytes)) as img:
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
