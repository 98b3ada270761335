"""Rendered image-caption data with known noisy correspondences.

Each image is a scene of simple coloured shapes; its caption says what is drawn
(colour, shape, left/right order). Both sides also carry modality-exclusive
information (MEI) that says nothing about the other side: a random textured
background in the image, filler phrases in the caption. A fraction of the
captions is then permuted (``ncleaner.noise``), and each sample's json records
whether it is noisy, so detection can be scored against ground truth.

The shards look like img2dataset output: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .noise import caption_permutation
from .writer import ShardSink

COLORS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 215, 35),
    "purple": (140, 50, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
FILLERS = (
    "free download",
    "stock photo",
    "high quality wallpaper",
    "click to see more",
    "my favourite picture this year",
    "posted by a happy customer",
    "all rights reserved",
    "#art #design #minimal",
    "repost if you agree",
    "new collection",
    "best seller",
    "limited offer today",
)


@dataclass(frozen=True)
class SceneGenerator:
    """One or two coloured shapes, described left to right.

    ``image_clutter`` draws a random noisy, striped background; ``text_clutter``
    adds filler phrases to the caption. Both are MEI: present in one modality,
    absent from the other.
    """

    image_size: int = 64
    max_objects: int = 2
    image_clutter: bool = True
    text_clutter: bool = True

    def render(self, rng: np.random.Generator) -> tuple[Image.Image, str]:
        n = int(rng.integers(1, self.max_objects + 1))
        objects = [(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))) for _ in range(n)]
        image = self._background(rng)
        draw = ImageDraw.Draw(image)
        slot = self.image_size / n
        for i, (color, shape) in enumerate(objects):
            radius = float(rng.uniform(0.17, 0.24)) * self.image_size
            cx = (i + 0.5) * slot + float(rng.uniform(-0.12, 0.12)) * slot
            cy = float(rng.uniform(0.35, 0.65)) * self.image_size
            _draw_shape(draw, shape, cx, cy, radius, COLORS[color])
        return image, self._caption(objects, rng)

    def _background(self, rng: np.random.Generator) -> Image.Image:
        s = self.image_size
        if not self.image_clutter:
            return Image.new("RGB", (s, s), (128, 128, 128))
        base = rng.uniform(70, 190)
        pixels = base + rng.normal(0.0, rng.uniform(4, 16), size=(s, s, 1))
        # Faint stripes in a random desaturated tint: texture the caption never mentions.
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:s, 0:s]
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * rng.uniform(0.2, 0.8))
        tint = rng.uniform(-1, 1, size=3) * rng.uniform(5, 25)
        pixels = pixels + stripes[..., None] * tint
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    def _caption(self, objects: list[tuple[str, str]], rng: np.random.Generator) -> str:
        names = [f"{_article(color)} {color} {shape}" for color, shape in objects]
        if len(names) == 1:
            text = names[0]
        elif rng.random() < 0.5:
            text = f"{names[0]} to the left of {names[1]}"
        else:
            text = f"{names[1]} to the right of {names[0]}"
        if self.text_clutter:
            for _ in range(int(rng.integers(0, 3))):
                filler = str(rng.choice(FILLERS))
                text = f"{filler}, {text}" if rng.random() < 0.5 else f"{text}, {filler}"
        return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    n_samples: int,
    shard_size: int,
    noise_rate: float,
    seed: int,
    generator: SceneGenerator | None = None,
    jpeg_quality: int = 90,
) -> list[str]:
    """Render ``n_samples`` pairs, permute a ``noise_rate`` fraction of captions, write shards.

    Keys follow img2dataset (``{shard:05d}{index:04d}``). Each json carries
    ``ncleaner_noisy`` and, for noisy samples, ``ncleaner_original_caption``.
    Returns the shard paths. The same arguments always give the same bytes.
    """
    generator = generator or SceneGenerator()
    rng = np.random.default_rng(seed)
    scenes = [generator.render(rng) for _ in range(n_samples)]
    perm = caption_permutation(n_samples, noise_rate, rng)
    with ShardSink(out_dir, maxcount=shard_size) as sink:
        for i, (image, own_caption) in enumerate(scenes):
            caption = scenes[perm[i]][1]
            key = f"{i // shard_size:05d}{i % shard_size:04d}"
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=jpeg_quality)
            meta = {
                "key": key,
                "url": f"https://example.invalid/ncleaner-synthetic/{seed}/{key}.jpg",
                "caption": caption,
                "status": "success",
                "width": image.width,
                "height": image.height,
                "ncleaner_noisy": bool(perm[i] != i),
            }
            if perm[i] != i:
                meta["ncleaner_original_caption"] = own_caption
            sink.write(
                {
                    "__key__": key,
                    "jpg": buf.getvalue(),
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
    return [str(p) for p in sink.paths]
