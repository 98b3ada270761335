"""The offline stand-in for a pretrained open_clip backbone: ``ncleaner-tiny`` trained with plain
contrastive loss (CLIP's) on a large, clean generated corpus, saved as a checkpoint file that
``ncleaner fit --pretrained PATH`` loads.

    python pipelines/pretrain_backbone.py                 # 20,000 pairs, 6 epochs: ~10 min on 2 cores
    python pipelines/pretrain_backbone.py --pairs 256 --epochs 1 --out /tmp/tiny.safetensors   # CI size

No pretrained CLIP weights can be downloaded on the machines this project is built on, and a
frozen backbone that was trained on the noisy pool itself is not what users run. The corpus
uses families, seeds and clutter that no evaluation set of ``benchmark_frozen.py`` uses:
families ``scenes``, ``paraphrase`` and ``hard`` (never ``layout``), seeds from
``PRETRAIN_SEED`` up (evaluation seeds are below 1,000), and ``stripes`` clutter drawn with
the corpus's own random stream. Nothing in it is noisy. The same settings give the same
checkpoint bytes (one torch thread, fixed seeds), so ``checkpoint()`` caches it outside git
under a name derived from the settings and regenerates it when missing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from ncleaner.backbone import Backbone, build_backbone
from ncleaner.encode import encode_text
from ncleaner.evaluate import recall_at_k
from ncleaner.synthetic import make_generator
from ncleaner.writer import atomic_write

logger = logging.getLogger("ncleaner.pretrain")

PRETRAIN_FAMILIES = ("scenes", "paraphrase", "hard")
PRETRAIN_SEED = 7_000
CACHE_DIR = Path(os.environ.get("NCLEANER_BENCH_CACHE", Path.home() / ".cache" / "ncleaner-bench"))
# Bump when the corpus or the training loop changes in a way the settings do not show.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the checkpoint; its hash names the cached file."""

    backbone: str = "ncleaner-tiny"
    pairs: int = 20_000
    families: tuple[str, ...] = PRETRAIN_FAMILIES
    clutter: str = "stripes"
    image_clutter: bool = True
    text_clutter: bool = True
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = PRETRAIN_SEED
    recipe: int = field(default=RECIPE_VERSION)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def render_pairs(
    family_names: tuple[str, ...] | list[str],
    n: int,
    seed: int,
    *,
    clutter: str = "stripes",
    image_clutter: bool = True,
    text_clutter: bool = True,
) -> tuple[list[Image.Image], list[str]]:
    """``n`` clean pairs dealt round-robin from the families, images through a JPEG round trip
    at the quality shards are written with, so training sees what decoding a shard gives."""
    rng = np.random.default_rng(seed)
    gens = [make_generator(f, image_clutter, text_clutter, clutter) for f in family_names]
    images, captions = [], []
    for i in range(n):
        image, caption = gens[i % len(gens)].render(rng)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        captions.append(caption)
    return images, captions


def train_contrastive(
    backbone_name: str,
    images: list[Image.Image],
    captions: list[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    steps: int | None = None,
) -> Backbone:
    """A randomly initialised open_clip model trained with CLIP's symmetric InfoNCE
    (``open_clip.ClipLoss``) on the pairs: AdamW, linear warm-up over the first 5 %
    of steps, cosine decay. ``steps`` fixes the number of optimiser steps whatever
    the number of pairs (the downstream benchmark's equal budget); otherwise
    ``epochs`` passes. Returns the backbone (its model in eval mode, with its preprocess and tokenizer).
    """
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_name, None)
    model = backbone.model
    x = torch.stack([backbone.preprocess(im) for im in images])
    tokens = backbone.tokenizer(captions)
    n = len(captions)
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    total = steps if steps is not None else epochs * per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)),
    )
    loss_fn = open_clip.ClipLoss()
    rng = np.random.default_rng(seed)
    model.train()
    step, order = 0, np.empty(0, dtype=np.int64)
    while step < total:
        if len(order) < batch_size:
            order = rng.permutation(n)
        idx, order = torch.from_numpy(order[:batch_size]), order[batch_size:]
        f_v = torch.nn.functional.normalize(model.encode_image(x[idx]), dim=-1)
        f_t = torch.nn.functional.normalize(encode_text(model, tokens[idx]), dim=-1)
        loss = loss_fn(f_v, f_t, model.logit_scale.exp().clamp(max=100))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step % max(1, per_epoch) == 0 or step == total:
            logger.info("step %d/%d loss %.3f", step, total, loss.item())
    model.eval()
    return backbone


@torch.no_grad()
def zero_shot_recall(backbone: Backbone, images, captions) -> dict[str, float]:
    """Image-to-text and text-to-image R@1/5/10 of ``backbone`` on clean pairs."""
    model = backbone.model
    f_v = torch.nn.functional.normalize(
        model.encode_image(torch.stack([backbone.preprocess(i) for i in images])), dim=-1
    )
    f_t = torch.nn.functional.normalize(encode_text(model, backbone.tokenizer(captions)), dim=-1)
    return recall_at_k(f_v @ f_t.T)


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """A safetensors state dict, which open_clip's ``pretrained=PATH`` loads; unlike ``torch.save``
    its bytes depend on the weights only (a torch zip records its own file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def pretrain(settings: PretrainSettings, out: Path) -> Path:
    """Render the corpus, train, save to ``out``; one torch thread so that the bytes repeat."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, captions = render_pairs(
            settings.families,
            settings.pairs,
            settings.seed,
            clutter=settings.clutter,
            image_clutter=settings.image_clutter,
            text_clutter=settings.text_clutter,
        )
        backbone = train_contrastive(
            settings.backbone,
            images,
            captions,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=settings.seed,
        )
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(backbone.model, out)
    out.with_suffix(".json").write_text(json.dumps(asdict(settings), indent=1) + "\n")
    return out


def checkpoint(settings: PretrainSettings = PretrainSettings(), cache_dir: Path = CACHE_DIR) -> Path:
    """The cached checkpoint for ``settings``, trained first if it is not there."""
    path = Path(cache_dir) / f"pretrained-{settings.backbone}-{settings.key()}.safetensors"
    if not path.is_file():
        logger.info("pretraining %s on %d generated pairs -> %s", settings.backbone, settings.pairs, path)
        pretrain(settings, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = PretrainSettings()
    parser.add_argument("--pairs", type=int, default=defaults.pairs)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--no-clutter", action="store_true", help="flat backgrounds and plain captions")
    parser.add_argument("--out", default=None, help="checkpoint path (default: the cache, named by the settings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    settings = PretrainSettings(
        pairs=args.pairs, epochs=args.epochs, image_clutter=not args.no_clutter, text_clutter=not args.no_clutter
    )
    start = time.perf_counter()
    path = pretrain(settings, Path(args.out)) if args.out else checkpoint(settings)
    seconds = time.perf_counter() - start
    backbone = build_backbone(settings.backbone, str(path))
    backbone.model.eval()
    for family in ("scenes", "layout"):
        images, captions = render_pairs([family], 500, 999_999)
        recall = zero_shot_recall(backbone, images, captions)
        print(f"{family}: " + ", ".join(f"{k} {v:.1f}" for k, v in recall.items()))
    print(f"{path} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
