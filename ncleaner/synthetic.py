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
COLOR_SYNONYMS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "navy", "azure"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "tangerine", "amber"),
}
SHAPE_SYNONYMS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape", "triangular shape"),
    "cross": ("cross", "plus sign", "plus"),
}
NUMBERS = {2: "two", 3: "three"}
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
# A second kind of caption clutter, for pools that differ from what a backbone was pretrained on
# (web-shop and social boilerplate). No phrase is one of FILLERS, nor one of inject-noise's
# boilerplate captions, so "clutter the backbone never saw" stays apart from "a caption of noise".
SITE_TAGS = (
    "via pinterest",
    "| example-shop.com",
    "#geometry #shapes #flat",
    "vector illustration",
    "hd 4k",
    "trending now",
    "from our spring catalogue",
    "as seen on tv",
    "rated 4.8 by buyers",
    "printable pdf included",
    "link in bio",
    "editor's pick",
)
# What each clutter style puts behind the objects and around the caption (docs/design.md section 9.4).
CLUTTER_STYLES = {"stripes": FILLERS, "blobs": SITE_TAGS}


@dataclass(frozen=True)
class SceneGenerator:
    """One or two coloured shapes, described left to right.

    ``image_clutter`` draws a random textured background; ``text_clutter`` adds
    phrases to the caption. Both are MEI: present in one modality, absent from the
    other. ``clutter`` picks their kind (``CLUTTER_STYLES``): ``stripes`` (noisy
    striped backgrounds, ``FILLERS``) or ``blobs`` (soft muted blobs, ``SITE_TAGS``).
    """

    image_size: int = 64
    max_objects: int = 2
    image_clutter: bool = True
    text_clutter: bool = True
    clutter: str = "stripes"

    def __post_init__(self):
        if self.clutter not in CLUTTER_STYLES:
            raise ValueError(f"unknown clutter style {self.clutter!r} (one of {', '.join(CLUTTER_STYLES)})")

    def render(self, rng: np.random.Generator) -> tuple[Image.Image, str]:
        """One (image, caption) pair drawn with ``rng``."""
        image, objects = self._scene(rng)
        return image, self._clutter(self._caption(objects, rng), rng)

    def _scene(self, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, str]]]:
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
        return image, objects

    def _background(self, rng: np.random.Generator) -> Image.Image:
        s = self.image_size
        if not self.image_clutter:
            return Image.new("RGB", (s, s), (128, 128, 128))
        if self.clutter == "blobs":
            return _blobs(s, rng)
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
            return names[0]
        if rng.random() < 0.5:
            return f"{names[0]} to the left of {names[1]}"
        return f"{names[1]} to the right of {names[0]}"

    def _clutter(self, text: str, rng: np.random.Generator) -> str:
        """Filler phrases around the caption: text-side MEI that no image shows."""
        if self.text_clutter:
            for _ in range(int(rng.integers(0, 3))):
                filler = str(rng.choice(CLUTTER_STYLES[self.clutter]))
                text = f"{filler}, {text}" if rng.random() < 0.5 else f"{text}, {filler}"
        return text


@dataclass(frozen=True)
class ParaphraseGenerator(SceneGenerator):
    """The scenes of ``SceneGenerator`` described with several templates and synonyms.

    The same content has many surface forms, so a model must match meaning, not wording.
    """

    def _caption(self, objects: list[tuple[str, str]], rng: np.random.Generator) -> str:
        names = [self._name(color, shape, rng) for color, shape in objects]
        if len(names) == 1:
            template = str(rng.choice(["{a}", "a picture of {a}", "{a}, nothing else", "just {a}"]))
            return template.format(a=names[0])
        template = str(
            rng.choice(
                [
                    "{a} to the left of {b}",
                    "{b} to the right of {a}",
                    "on the left {a}, on the right {b}",
                    "{a} and, to its right, {b}",
                    "{b} with {a} on its left",
                ]
            )
        )
        return template.format(a=names[0], b=names[1])

    @staticmethod
    def _name(color: str, shape: str, rng: np.random.Generator) -> str:
        c = str(rng.choice(COLOR_SYNONYMS[color]))
        sh = str(rng.choice(SHAPE_SYNONYMS[shape]))
        return f"{_article(c)} {c} {sh}"


@dataclass(frozen=True)
class HardSceneGenerator(SceneGenerator):
    """Two or three objects on a 2x2 grid, with relations (left of, above), counts, and
    small distractor objects that the caption does not mention."""

    max_objects: int = 3
    distractors: int = 2

    def _scene(self, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, str]]]:
        n = int(rng.integers(2, self.max_objects + 1))
        kind = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        # Half of the scenes repeat an object, so counts matter ("two red circles").
        objects = [
            kind if rng.random() < 0.5 else (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
            for _ in range(n - 1)
        ] + [kind]
        cells = [int(c) for c in rng.permutation(4)[:n]]
        image = self._background(rng)
        draw = ImageDraw.Draw(image)
        half = self.image_size / 2
        for _ in range(self.distractors):
            cx, cy = rng.uniform(0, self.image_size, size=2)
            gray = int(rng.integers(60, 200))
            _draw_shape(draw, str(rng.choice(SHAPES)), float(cx), float(cy), 0.07 * self.image_size, (gray,) * 3)
        for (color, shape), cell in zip(objects, cells, strict=True):
            cx = (cell % 2 + 0.5) * half + float(rng.uniform(-0.1, 0.1)) * half
            cy = (cell // 2 + 0.5) * half + float(rng.uniform(-0.1, 0.1)) * half
            _draw_shape(draw, shape, cx, cy, float(rng.uniform(0.3, 0.4)) * half, COLORS[color])
        return image, [(c, sh, cell) for (c, sh), cell in zip(objects, cells, strict=True)]

    def _caption(self, objects, rng: np.random.Generator) -> str:
        counts: dict[tuple[str, str], int] = {}
        for color, shape, _ in objects:
            counts[(color, shape)] = counts.get((color, shape), 0) + 1
        if len(counts) < len(objects):  # a repeated object: describe by counts
            parts = [
                f"{NUMBERS[k]} {color} {_plural(shape)}" if k > 1 else f"{_article(color)} {color} {shape}"
                for (color, shape), k in counts.items()
            ]
            return " and ".join(parts)
        (c1, s1, p1), (c2, s2, p2) = objects[0], objects[1]
        a, b = f"{_article(c1)} {c1} {s1}", f"{_article(c2)} {c2} {s2}"
        if p1 // 2 == p2 // 2:
            relation = "to the left of" if p1 < p2 else "to the right of"
        elif p1 % 2 == p2 % 2:
            relation = "above" if p1 < p2 else "below"
        else:
            relation = "diagonally " + ("above" if p1 < p2 else "below")
        text = f"{a} {relation} {b}"
        for c3, s3, _ in objects[2:]:
            text += f" and {_article(c3)} {c3} {s3}"
        return text


@dataclass(frozen=True)
class LayoutGenerator(SceneGenerator):
    """One to three objects of two sizes in three horizontal bands, captioned band by band.

    What it shows (sizes, vertical layout) and how it writes ("at the top: a large
    green square; in the middle: ...") differ from the other families. No default
    was tuned on it and the benchmark's pretrained backbone never saw it: it is
    the family that shows whether a setting carries over (docs/design.md section 9.4).
    """

    max_objects: int = 3

    def _scene(self, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, str, str, str]]]:
        n = int(rng.integers(1, self.max_objects + 1))
        bands = sorted(int(b) for b in rng.permutation(3)[:n])
        image = self._background(rng)
        draw = ImageDraw.Draw(image)
        objects = []
        for band in bands:
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            size = "large" if rng.random() < 0.5 else "small"
            radius = (0.14 if size == "large" else 0.07) * self.image_size * float(rng.uniform(0.9, 1.1))
            cx = float(rng.uniform(0.25, 0.75)) * self.image_size
            cy = (band + 0.5) / 3 * self.image_size
            _draw_shape(draw, shape, cx, cy, radius, COLORS[color])
            objects.append((size, color, shape, LAYOUT_BANDS[band]))
        return image, objects

    def _caption(self, objects, rng: np.random.Generator) -> str:
        parts = [f"{band}: {_article(size)} {size} {color} {shape}" for size, color, shape, band in objects]
        if rng.random() < 0.3:
            parts.reverse()
        return "; ".join(parts)


LAYOUT_BANDS = ("at the top", "in the middle", "at the bottom")


def _blobs(size: int, rng: np.random.Generator) -> Image.Image:
    """A light background of a few soft, desaturated blobs: the ``blobs`` clutter style."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    pixels = np.full((size, size, 3), rng.uniform(90, 200))
    for _ in range(int(rng.integers(3, 7))):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        gray = rng.uniform(-60, 60)
        tint = gray + rng.uniform(-15, 15, size=3)  # close to gray, so no blob reads as an object's colour
        pixels = pixels + bump[..., None] * tint
    pixels = pixels + rng.normal(0.0, 3.0, size=(size, size, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


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


GENERATORS = {
    "scenes": SceneGenerator,
    "paraphrase": ParaphraseGenerator,
    "hard": HardSceneGenerator,
    "layout": LayoutGenerator,
}


def make_generator(
    name: str, image_clutter: bool = True, text_clutter: bool = True, clutter: str = "stripes"
) -> SceneGenerator:
    """A generator by name (``GENERATORS``), clutter on each side switchable, of style ``clutter``."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r} (one of {', '.join(GENERATORS)})")
    return GENERATORS[name](image_clutter=image_clutter, text_clutter=text_clutter, clutter=clutter)


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


# How write_shards_with_duplicates makes a copy of a picture: what a crawl finds again under
# another URL (the same file, saved again, scaled, cropped at the borders).
COPY_EDITS = ("exact", "reencode", "resize", "crop", "crop_side", "grey")


def copy_of(jpeg: bytes, edit: str, rng: np.random.Generator) -> bytes:
    """A copy of the picture in ``jpeg`` made by ``edit`` (``COPY_EDITS``), as JPEG bytes: the same
    bytes, saved again at quality 50-80, scaled to 50-80 % of its side, cropped by 4-10 % of each
    side, cropped by 4-10 % of one side or two adjacent ones, or made grey."""
    if edit == "exact":
        return jpeg
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    quality = 85
    if edit == "reencode":
        quality = int(rng.integers(50, 81))
    elif edit == "resize":
        scale = rng.uniform(0.5, 0.8)
        image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
    elif edit == "crop":
        m = rng.uniform(0.04, 0.10)
        w, h = image.size
        image = image.crop((round(w * m), round(h * m), round(w * (1 - m)), round(h * (1 - m))))
    elif edit == "crop_side":
        m = rng.uniform(0.04, 0.10)
        w, h = image.size
        sides = [rng.random() < 0.5 for _ in range(2)]  # which edge of x, of y; the second axis maybe untouched
        x = (round(w * m), 0, w, h) if sides[0] else (0, 0, round(w * (1 - m)), h)
        box = list(x)
        if rng.random() < 0.5:  # two adjacent sides: a corner
            box[1], box[3] = (round(h * m), h) if sides[1] else (0, round(h * (1 - m)))
        image = image.crop(tuple(box))
    elif edit == "grey":
        image = image.convert("L").convert("RGB")
    else:
        raise ValueError(f"unknown edit {edit!r} (one of {', '.join(COPY_EDITS)})")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards_with_duplicates(
    out_dir: str | os.PathLike,
    n_distinct: int,
    n_copies: int,
    shard_size: int,
    seed: int,
    generator: SceneGenerator | None = None,
    edits: tuple[str, ...] = COPY_EDITS,
) -> dict[str, tuple[str, str]]:
    """Render ``n_distinct`` pairs, add ``n_copies`` copies of randomly chosen ones (each by an edit
    of ``edits``, with the original's caption), shuffle, and write shards. Returns the truth: per
    copy's key, (its original's key, the edit). The same arguments always give the same bytes."""
    generator = generator or SceneGenerator()
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_distinct):
        image, caption = generator.render(rng)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        samples.append((buf.getvalue(), caption, None))
    for _ in range(n_copies):
        original = int(rng.integers(n_distinct))
        edit = edits[int(rng.integers(len(edits)))]
        samples.append((copy_of(samples[original][0], edit, rng), samples[original][1], (original, edit)))
    order = rng.permutation(len(samples))
    key_of = {int(i): f"{pos // shard_size:05d}{pos % shard_size:04d}" for pos, i in enumerate(order)}
    truth = {}
    with ShardSink(out_dir, maxcount=shard_size) as sink:
        for i in order.tolist():
            jpeg, caption, copied = samples[i]
            key = key_of[i]
            if copied is not None:
                truth[key] = (key_of[copied[0]], copied[1])
            meta = {"key": key, "url": f"https://example.invalid/ncleaner-dedup/{seed}/{key}.jpg", "caption": caption}
            sink.write(
                {
                    "__key__": key,
                    "jpg": jpeg,
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
    return truth
