"""The one configuration dataclass, saved as ``config.json`` beside every model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import __version__

# A small from-scratch open_clip config registered by ncleaner.backbone, for offline demos and tests.
TINY_BACKBONE = "ncleaner-tiny"
TRAIN_BACKBONE_CHOICES = ("auto", "none", "all")
PRECISIONS = ("fp32", "fp16", "bf16")
SCORE_TERM_CHOICES = ("auto", "clip_sim", "mii_sim", "soft_agreement", "negclip")
# Fields a fitted model fills in itself; a user cannot set them.
DERIVED_FIELDS = ("embed_dim", "pretrained_sha256", "version")
# Decoding guard, not part of a model: 64 megapixels (8000 x 8000) is above anything a caption
# dataset needs and below Pillow's own warning limit; a 33 KB PNG can declare 144 megapixels
# and take 0.7 GB to decode.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# dedup's near duplicates: the share of 256 perceptual-hash bits two copies of one picture agree
# in (measured in pipelines/benchmark_dedup.py; ncleaner.dedup says how they are hashed).
DEFAULT_NEAR_SIMILARITY = 0.82

# The JSON values each field annotation accepts, and how a message names them. The keys are the
# annotations as written (this module's annotations are strings); int is no bool, a float may be an int.
JSON_TYPES = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "str | None": ((str, type(None)), "a string or null"),
    "float | None": ((int, float, type(None)), "a number or null"),
}


def setting(default, help: str, *, choices: tuple[str, ...] | None = None, min: int | None = None):  # noqa: A002
    """A field a user sets: its default, and what ``fit`` shows for it (``--help``, the option's
    choices or lowest value). ``cli.config_options`` makes one ``fit`` option of each such field,
    so a new setting needs no edit of the CLI."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "min": min})


@dataclass
class DisNCLConfig:
    """Everything that defines a fitted ncleaner model besides its weights.

    The paper's body (arXiv 2408.05503) gives no defaults we could reach; the
    values here were tuned on the package's synthetic data (``ncleaner.synthetic``)
    and are recorded so a model can be rebuilt exactly.
    """

    # Backbone (docs/design.md section 1).
    backbone: str = setting(
        TINY_BACKBONE, "open_clip model name. The default is a tiny demo backbone trained from scratch, not a real one."
    )
    pretrained: str | None = setting(
        None, "open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint file (stored by absolute path)."
    )
    train_backbone: str = setting(
        "auto",
        "none: freeze the backbone and cache its features (default with --pretrained); "
        "all: train it with the heads (default without).",
        choices=TRAIN_BACKBONE_CHOICES,
    )
    embed_dim: int = 0  # filled from the backbone at fit time
    pretrained_sha256: str | None = None  # of a checkpoint file, filled at fit time; a model checks it on load
    precision: str = setting(
        "fp32",
        "Backbone precision on CUDA (fp16/bf16 autocast); recorded in the model, used by score too.",
        choices=PRECISIONS,
    )

    # DisNCL heads (section 2). The MII subspace has the backbone's width so that the
    # MII head can start as the identity (see heads.ResidualHead).
    mei_dim: int = setting(64, "Width of each modality-exclusive (MEI) subspace.", min=1)
    hidden_dim: int = setting(256, "Hidden width of the heads' MLPs.", min=1)

    # Alignment in the MII subspace with soft many-to-many targets.
    tau: float = setting(0.05, "Temperature of the MII alignment loss.")
    target_tau: float = setting(0.05, "Temperature of the soft many-to-many targets.")
    identity_mix: float = setting(0.5, "Share of the one-hot target mixed into the soft targets, in [0, 1].")

    # Ablation switches; all on is DisNCL. With both off and lambda_dis = lambda_reg = 0 the
    # objective is plain symmetric InfoNCE (the NCR-style baseline of the benchmark).
    soft_targets: bool = setting(True, "Soft many-to-many targets (off: one-hot).")
    noise_weights: bool = setting(True, "Down-weight pairs that look noisy after the warm-up (off: weight 1 for all).")

    # Loss weights: L = L_align + lambda_dis * L_Dis + lambda_reg * L_reg + lambda_edit * L_edit.
    lambda_dis: float = setting(0.1, "Weight of the disentanglement term L_Dis.")
    lambda_adv: float = setting(1.0, "Weight of the adversarial critics inside L_Dis.")
    lambda_reg: float = setting(0.01, "Weight of the reconstruction term L_reg.")
    # Hard negatives from the pool (docs/design.md section 2.1): L_edit against one-fact edits of the
    # training captions, and the share of each batch made of near neighbours (frozen backbone only).
    lambda_edit: float = setting(0.0, "Weight of L_edit against one-fact edits of the training captions.")
    hard_batch_share: float = setting(
        0.0, "Share of each batch made of near neighbours in the stored features, in [0, 1] (frozen backbone)."
    )

    # Training sample: fit trains on a uniform sample of at most this many ok pairs of the pool
    # (score still covers every pair); it bounds fit's memory (docs/benchmarks.md, "Speed and memory").
    max_fit_pairs: int = setting(
        1_000_000,
        "Train on a uniform sample of at most this many usable pairs (bounds fit's memory; score covers all).",
        min=4,
    )

    # Optimisation.
    epochs: int = setting(12, "Training epochs.", min=1)
    warmup_epochs: int = setting(
        3, "Epochs of plain alignment before pairs are weighted by how clean they look.", min=0
    )
    batch_size: int = setting(128, "Pairs per contrastive batch.", min=2)
    lr: float = setting(1e-3, "Learning rate of the heads.")
    backbone_lr: float = setting(1e-3, "Learning rate of a backbone that trains.")
    weight_decay: float = setting(0.05, "AdamW weight decay.")
    critic_lr: float = setting(1e-3, "Learning rate of the adversarial critics.")
    seed: int = setting(0, "Seed of every random choice.")

    # Scoring (section 3).
    bank_size: int = setting(1024, "Pool pairs in the fixed reference bank (soft_agreement, negclip).", min=1)
    calibration_points: int = setting(1001, "Quantiles stored per score term to calibrate it.", min=2)

    # score = clip_sim + score_weight * (g(score_term) - clip_sim) (docs/design.md section 3, Eq. S1).
    # "auto" / null: fit's self-check chooses them on a held-out slice of the pool with injected noise.
    score_term: str = setting(
        "auto", "The term that corrects clip_sim in score (auto: chosen by the self-check).", choices=SCORE_TERM_CHOICES
    )
    score_weight: float | None = setting(
        None, "Weight of that correction, in [0, 1] (unset: chosen by the self-check)."
    )

    # Self-check (section 3.1): selfcheck_fraction of the usable pairs (at least selfcheck_min_pairs,
    # at most selfcheck_max_pairs and a fifth of the pool) is held out of training; 0 turns it off.
    selfcheck_fraction: float = setting(0.1, "Share of the usable pairs held out for the self-check (0: off).")
    selfcheck_min_pairs: int = setting(300, "Fewest pairs the self-check holds out.", min=0)
    selfcheck_max_pairs: int = setting(20_000, "Most pairs the self-check holds out.", min=0)
    # How many bootstrap standard errors a correction must gain over clip_sim by on half B to be used.
    selfcheck_margin: float = setting(
        2.0, "Bootstrap standard errors a correction must gain over clip_sim by on the check's half B."
    )

    version: str = __version__

    def resolved_train_backbone(self) -> str:
        """A pretrained backbone stays frozen; a randomly initialised one must train."""
        if self.train_backbone == "auto":
            return "none" if self.pretrained else "all"
        return self.train_backbone

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if self.train_backbone not in TRAIN_BACKBONE_CHOICES:
            raise ValueError(f"train_backbone must be one of {TRAIN_BACKBONE_CHOICES}")
        if self.resolved_train_backbone() == "none" and not self.pretrained:
            raise ValueError("a frozen backbone needs pretrained weights (--pretrained)")
        if not 0 <= self.warmup_epochs <= self.epochs or self.epochs < 1:
            raise ValueError("need epochs >= 1 and 0 <= warmup_epochs <= epochs")
        if self.max_fit_pairs < 4:
            raise ValueError("max_fit_pairs must be at least 4")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (contrastive batches need negatives)")
        if not 0.0 <= self.identity_mix <= 1.0:
            raise ValueError("identity_mix must be in [0, 1]")
        if not (self.tau > 0 and self.target_tau > 0):  # also false for NaN
            raise ValueError("tau and target_tau must be > 0 (similarities are divided by them)")
        if not 0.0 <= self.hard_batch_share <= 1.0:
            raise ValueError("hard_batch_share must be in [0, 1]")
        if not self.lambda_edit >= 0:
            raise ValueError("lambda_edit must be >= 0")
        if self.score_term not in SCORE_TERM_CHOICES:
            raise ValueError(f"score_term must be one of {SCORE_TERM_CHOICES}")
        if self.score_weight is not None and not 0.0 <= self.score_weight <= 1.0:
            raise ValueError("score_weight must be in [0, 1] (or null: chosen by the self-check)")
        if not 0.0 <= self.selfcheck_fraction < 1.0:
            raise ValueError("selfcheck_fraction must be in [0, 1)")
        if self.selfcheck_fraction == 0 and (self.score_term == "auto" or self.score_weight is None):
            raise ValueError("without the self-check (selfcheck_fraction 0), set score_term and score_weight")
        if self.selfcheck_min_pairs < 0 or self.selfcheck_max_pairs < 0 or not self.selfcheck_margin >= 0:
            raise ValueError("selfcheck_min_pairs, selfcheck_max_pairs and selfcheck_margin must be >= 0")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DisNCLConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def with_overrides(self, overrides: Mapping[str, object] | Iterable[str]) -> DisNCLConfig:
        """A copy with some fields replaced; the one way the CLI and the benchmark change a config.

        ``overrides`` is a mapping of field values, or ``FIELD=VALUE`` strings (``fit --set``)
        whose VALUE is read as JSON when it parses (``0.1``, ``true``, ``null``) and as text
        otherwise (``ViT-B-32``). Every value must have its field's type, as in ``config.json``.
        ``embed_dim``, ``pretrained_sha256`` and ``version`` are derived (from the backbone, its
        checkpoint, the package) and cannot be set. Raises ValueError naming the field.
        """
        if not isinstance(overrides, Mapping):
            overrides = dict(_field_assignment(item) for item in overrides)
        known = {f.name: f for f in dataclasses.fields(self)}
        values = {}
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"{name}: not a DisNCLConfig field (one of {', '.join(sorted(known))})")
            if name in DERIVED_FIELDS:
                raise ValueError(f"{name}: derived, not set (from the backbone, its checkpoint or the package version)")
            values[name] = typed_json(name, value, known[name].type)
        return dataclasses.replace(self, **values)

    @classmethod
    def from_dict(cls, data: object) -> DisNCLConfig:
        """The config a parsed ``config.json`` holds; ValueError names the first field of the wrong type.

        Unknown fields are ignored, so that a config written by a newer version still loads.
        """
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = typed_json(f.name, data[f.name], f.type)
        return cls(**values)


def _field_assignment(item: str) -> tuple[str, object]:
    name, equals, text = item.partition("=")
    if not equals or not name:
        raise ValueError(f"{item!r}: expected FIELD=VALUE")
    try:
        return name, json.loads(text)
    except ValueError:
        return name, text


def typed_json(name: str, value: object, annotation: str) -> object:
    """``value`` if JSON gave the field its declared type (ints widened to float), else ValueError:
    the one type check of every JSON file ncleaner reads (``config.json``, ``embeddings.json``)."""
    accepted, described = JSON_TYPES[annotation]
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        raise ValueError(f"field {name} must be {described}, got {value!r}")
    return float(value) if annotation.startswith("float") and value is not None else value
