"""A fitted ncleaner model: backbone + DisNCL heads + reference bank + score calibration.

This is the one place that builds a model from a config and that reads and
writes a model directory:

    MODEL_DIR/config.json        DisNCLConfig
    MODEL_DIR/model.safetensors  heads, reference bank, and backbone weights when trained
    MODEL_DIR/calibration.json   score calibration (docs/design.md section 3)
    MODEL_DIR/selfcheck.json     what the self-check measured on the pool (``ncleaner.selfcheck``)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .backbone import Backbone, build_backbone, checkpoint_sha256, cosine, download_reason
from .config import DisNCLConfig
from .encode import Encoder
from .errors import NcleanerError, first_line
from .heads import DisNCLHeads
from .mixture import TwoComponentMixture
from .writer import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CALIBRATION_FILE = "calibration.json"
SELFCHECK_FILE = "selfcheck.json"
# What a model is (and what its id hashes); the self-check's table only explains the choice in calibration.json.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, CALIBRATION_FILE)
FIT_FILES = (*MODEL_FILES, SELFCHECK_FILE)
# The reference bank: MII features (soft_agreement) and backbone features (negclip) of the same pairs.
BANK_TENSORS = ("bank.v", "bank.t", "bank.fv", "bank.ft")
# Where the saved heads show the sizes they were built with: (tensor, axis) for each config field.
HEAD_SIZES = {
    "embed_dim": ("mii_image.mlp.0.weight", 1),
    "mei_dim": ("mei_image.2.weight", 0),
    "hidden_dim": ("mii_image.mlp.0.weight", 0),
}


# The terms that may correct clip_sim in ``score`` (docs/design.md section 3), besides clip_sim itself.
CORRECTION_TERMS = ("mii_sim", "soft_agreement", "negclip")
TERMS = ("clip_sim", *CORRECTION_TERMS)


@dataclass
class Calibration:
    """Turns a pair's terms into ``score`` and ``clean_prob`` (docs/design.md section 3).

    The score is anchored on the frozen cosine (Eq. S1):

        score = clip_sim + weight * (g(term) - clip_sim),   g = Q_clip o F_term

    where ``F_term`` is the correction term's empirical CDF over the training pairs and
    ``Q_clip`` clip_sim's quantile function there, so ``g`` puts the term on clip_sim's
    scale. ``weight`` 0 is clip_sim itself, bit for bit; 1 ranks by the term alone. Which
    term and weight is what ``fit``'s self-check chose on the user's pool
    (``ncleaner.selfcheck``). ``clean_prob`` is the clean posterior of a two-component
    mixture fitted to the training pairs' ``score``.
    """

    term: str
    weight: float
    quantiles: dict[str, list[float]]
    negclip_tau: float
    mixture: TwoComponentMixture

    @staticmethod
    def quantiles_of(terms: dict[str, np.ndarray], points: int) -> dict[str, list[float]]:
        levels = np.linspace(0.0, 1.0, points)
        return {name: np.quantile(np.asarray(terms[name], np.float64), levels).tolist() for name in TERMS}

    def score(self, terms: dict[str, np.ndarray]) -> np.ndarray:
        return anchored_score(terms, self.term, self.weight, self.quantiles)

    def clean_prob(self, score: np.ndarray) -> np.ndarray:
        return self.mixture.clean_posterior(score).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "term": self.term,
            "weight": self.weight,
            "quantiles": self.quantiles,
            "negclip_tau": self.negclip_tau,
            "mixture": self.mixture.to_dict(),
        }


def anchored_score(terms: dict[str, np.ndarray], term: str, weight: float, quantiles: dict) -> np.ndarray:
    """Eq. S1 for one (term, weight); float32. With weight 0 (or term clip_sim) it returns clip_sim unchanged."""
    clip = np.asarray(terms["clip_sim"], dtype=np.float32)
    if weight == 0 or term == "clip_sim":
        return clip
    on_clip_scale = _quantile_map(terms[term], quantiles[term], quantiles["clip_sim"])
    return ((1.0 - weight) * clip.astype(np.float64) + weight * on_clip_scale).astype(np.float32)


def _quantile_map(values: np.ndarray, source: list[float], target: list[float]) -> np.ndarray:
    """Q_target(F_source(values)) by linear interpolation between stored quantiles (ties broken by a tiny ramp)."""
    q = np.asarray(source, dtype=np.float64)
    q = q + np.arange(len(q)) * 1e-12
    levels = np.interp(np.asarray(values, dtype=np.float64), q, np.linspace(0.0, 1.0, len(q)))
    return np.interp(levels, np.linspace(0.0, 1.0, len(target)), np.asarray(target, dtype=np.float64))


def negclip(
    f_v: torch.Tensor, f_t: torch.Tensor, bank_fv: torch.Tensor, bank_ft: torch.Tensor, tau: float
) -> torch.Tensor:
    """negCLIPLoss (Wang et al., "CLIPLoss and Norm-Based Data Selection Methods", 2024, Eq. 3):

        cos(v_i, t_i) - tau / 2 * [log sum_j exp(cos(v_i, t_j) / tau) + log sum_j exp(cos(v_j, t_i) / tau)]

    with j over a fixed reference batch of pool pairs (the bank's backbone features): a pair
    is judged relative to how similar its image and caption are to everything else, so a
    generic caption or image that matches anything scores low.
    """
    f_v, f_t = F.normalize(f_v, dim=-1), F.normalize(f_t, dim=-1)
    own = (f_v * f_t).sum(-1)
    norm = torch.logsumexp(f_v @ bank_ft.T / tau, dim=1) + torch.logsumexp(f_t @ bank_fv.T / tau, dim=1)
    return own - tau / 2 * norm


def soft_agreement(
    v_s: torch.Tensor, t_s: torch.Tensor, bank_v: torch.Tensor, bank_t: torch.Tensor, tau: float
) -> torch.Tensor:
    """How much of the soft cross-modal target each pair keeps for itself (docs/design.md section 3).

    For image i: p_i2t = softmax over {t_i} U bank texts of MII similarity / tau,
    and the mass on t_i is kept; likewise for text i against the bank's images;
    the two are averaged. Bank entries that duplicate the pair's own partner
    (cosine > 0.999, e.g. a repeated caption) are left out, so a pair is not
    penalised for having its own twin in the bank.
    """
    own = (v_s * t_s).sum(-1, keepdim=True) / tau

    def kept(query: torch.Tensor, partner: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        logits = query @ bank.T / tau
        logits = logits.masked_fill(partner @ bank.T > 0.999, float("-inf"))
        return torch.cat([own, logits], dim=1).softmax(dim=1)[:, 0]

    return (kept(v_s, t_s, bank_t) + kept(t_s, v_s, bank_v)) / 2


class NcleanerModel(torch.nn.Module):
    """Backbone and DisNCL heads, with the bank and calibration that scoring needs."""

    def __init__(self, config: DisNCLConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.clip = backbone.model
        self.heads = DisNCLHeads(config.embed_dim, config.mei_dim, config.hidden_dim)
        self.register_buffer("bank_v", torch.zeros(0, config.embed_dim))
        self.register_buffer("bank_t", torch.zeros(0, config.embed_dim))
        self.register_buffer("bank_fv", torch.zeros(0, config.embed_dim))
        self.register_buffer("bank_ft", torch.zeros(0, config.embed_dim))
        self.calibration: Calibration | None = None
        self.model_dir: Path | None = None  # set by ``load``, so that errors can name the directory

    @classmethod
    def create(cls, config: DisNCLConfig, device: str | torch.device = "cpu") -> NcleanerModel:
        backbone = build_backbone(config.backbone, config.pretrained, device)
        # The caller's config stays as it was: the model carries a copy with the derived fields. A
        # checkpoint file is recorded by absolute path and content, so that the model can be loaded
        # from any directory and never onto other weights found under the same name.
        derived = {"embed_dim": backbone.embed_dim, "pretrained_sha256": None}
        if config.pretrained and os.path.isfile(config.pretrained):
            path = os.path.abspath(config.pretrained)
            derived.update(pretrained=path, pretrained_sha256=checkpoint_sha256(path))
        return cls(dataclasses.replace(config, **derived), backbone).to(device)

    @property
    def trains_backbone(self) -> bool:
        return self.config.resolved_train_backbone() == "all"

    @torch.no_grad()
    def terms(self, f_v: torch.Tensor, f_t: torch.Tensor) -> dict[str, np.ndarray]:
        """Every term ``score`` may be built from (``TERMS``), float32, for a batch of backbone features."""
        if self.calibration is None or len(self.bank_v) == 0:
            raise RuntimeError("model is not fitted: no reference bank or calibration")
        v_s, t_s = self.heads.mii(f_v, f_t)
        out = {
            "clip_sim": cosine(f_v, f_t),
            "mii_sim": (v_s * t_s).sum(-1),
            "soft_agreement": soft_agreement(v_s, t_s, self.bank_v, self.bank_t, self.config.tau),
            "negclip": negclip(f_v, f_t, self.bank_fv, self.bank_ft, self.calibration.negclip_tau),
        }
        return {name: values.float().cpu().numpy() for name, values in out.items()}

    def score_features(self, f_v: torch.Tensor, f_t: torch.Tensor) -> dict[str, np.ndarray]:
        """All score columns for a batch of backbone features."""
        terms = self.terms(f_v, f_t)
        score = self.calibration.score(terms)
        columns = {
            "clip_sim": terms["clip_sim"],
            "mii_sim": terms["mii_sim"],
            "soft_agreement": terms["soft_agreement"],
            "score": score,
            "clean_prob": self.calibration.clean_prob(score),
        }
        # A NaN score sorts as neither clean nor noisy and would pass silently into the report and
        # the filter: a model that gives one for finite features is broken, so nothing is scored.
        finite_in = (_finite_rows(f_v) & _finite_rows(f_t)).cpu().numpy()
        for name, values in columns.items():
            bad = int((finite_in & ~np.isfinite(values)).sum())
            if bad:
                raise NcleanerError(
                    f"{self._source()}: {name} is not finite for {bad} of {len(values)} pairs with finite features "
                    f"(damaged {WEIGHTS_FILE}, {CONFIG_FILE} or {CALIBRATION_FILE})"
                )
        return columns

    def encoder(self) -> Encoder:
        """The encode stage for this model's backbone, on the model's device, at its precision."""
        return Encoder(self.backbone, self.bank_v.device, precision=self.config.precision, source=self._source())

    def _source(self) -> str:
        """What an error message calls this model: its directory, or its backbone before it is saved."""
        if self.model_dir is not None:
            return str(self.model_dir)
        return f"model on backbone {self.config.backbone} ({self.config.pretrained or 'random init'})"

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.backbone.tokenizer(captions)

    # -- model directory -------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> str:
        """Write the model directory and return the model id."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        tensors.update(zip(BANK_TENSORS, (self.bank_v, self.bank_t, self.bank_fv, self.bank_ft), strict=True))
        if self.trains_backbone:
            tensors.update({f"backbone.{k}": v for k, v in self.clip.state_dict().items()})
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        calibration = json.dumps(self.calibration.to_dict(), indent=1) + "\n"
        atomic_write(out / CALIBRATION_FILE, lambda tmp: Path(tmp).write_text(calibration))
        # The config goes last: a directory is only loadable once all three files are there.
        atomic_write(out / CONFIG_FILE, self.config.save)
        return model_id(out)

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", *, allow_download: bool = False
    ) -> NcleanerModel:
        """Load a model directory written by ``save``; NcleanerError (one line) when it is not a sound one.

        A model that would score wrongly is refused rather than run: a config that
        does not validate, weights that do not fit the config, non-finite weights.
        Loading downloads nothing unless ``allow_download``: a backbone that
        open_clip would fetch (``hf-hub:`` names, pretrained tags) is refused.
        """
        d = Path(model_dir)
        missing = [f for f in MODEL_FILES if not (d / f).is_file()]
        if missing:
            raise NcleanerError(f"{d}: not an ncleaner model directory (missing {', '.join(missing)})")
        config = _read_config(d / CONFIG_FILE)
        # A trained backbone's weights are in model.safetensors: its pretrained tag is not loaded.
        backbone_pretrained = None if config.resolved_train_backbone() == "all" else config.pretrained
        reason = None if allow_download else download_reason(config.backbone, backbone_pretrained)
        if reason:
            raise NcleanerError(
                f"{d / CONFIG_FILE}: {reason}; loading a model downloads nothing unless allowed (pass --allow-download)"
            )
        tensors = _read_tensors(d / WEIGHTS_FILE)
        calibration = _read_calibration(d / CALIBRATION_FILE)
        _check_tensors(d, config, tensors)
        if backbone_pretrained and config.pretrained_sha256:
            _check_checkpoint(d / CONFIG_FILE, config)
        try:
            backbone = build_backbone(config.backbone, backbone_pretrained, device)
        except NcleanerError as exc:
            raise NcleanerError(f"{d / CONFIG_FILE}: {exc}") from exc
        if backbone.embed_dim != config.embed_dim:
            raise NcleanerError(
                f"{d}: backbone {config.backbone} has embed_dim {backbone.embed_dim} "
                f"but {CONFIG_FILE} says {config.embed_dim}"
            )
        model = cls(config, backbone)
        model.bank_v, model.bank_t, model.bank_fv, model.bank_ft = (tensors[k] for k in BANK_TENSORS)
        model.heads.load_state_dict(_prefixed(tensors, "heads."))
        if model.trains_backbone:
            saved = _prefixed(tensors, "backbone.")
            _check_fit(d, f"backbone {config.backbone}", _shapes(model.clip), saved)
            model.clip.load_state_dict(saved)
        model.calibration = calibration
        model.model_id = model_id(d)
        model.model_dir = d
        return model.to(device).eval()


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of a batch: are all its values finite (always true for integer tensors such as tokens)."""
    return torch.isfinite(x.reshape(len(x), -1)).all(dim=1)


# -- reading and checking a model directory ----------------------------------------------------------


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise NcleanerError(f"{path}: cannot read JSON: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise NcleanerError(f"{path}: must be a JSON object")
    return data


def _read_config(path: Path) -> DisNCLConfig:
    """config.json with every field of its declared type, validated as fit validates it."""
    data = _read_json_object(path)
    try:
        config = DisNCLConfig.from_dict(data)
        config.validate()
    except ValueError as exc:
        raise NcleanerError(f"{path}: {first_line(exc)}") from exc
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise NcleanerError(f"{path}: cannot read tensors: {first_line(exc)}") from exc


def _read_calibration(path: Path) -> Calibration:
    """calibration.json, checked field by field so that a damaged one is named with what is wrong."""
    data = _read_json_object(path)
    if "mii_quantiles" in data and "term" not in data:
        raise NcleanerError(f"{path}: written by ncleaner 0.1 (before the anchored score); fit the model again")
    mixture = _field(path, data, "mixture")
    if not isinstance(mixture, dict):
        raise NcleanerError(f"{path}: field 'mixture' must be an object")
    clean = _field(path, mixture, "clean", "mixture.")
    if clean not in (0, 1) or isinstance(clean, bool):
        raise NcleanerError(f"{path}: field 'mixture.clean' must be 0 or 1, got {clean!r}")
    term = _field(path, data, "term")
    if term not in TERMS:
        raise NcleanerError(f"{path}: field 'term' must be one of {', '.join(TERMS)}, got {term!r}")
    weight = _numbers(path, {"weight": [_field(path, data, "weight")]}, "weight", length=1)[0]
    if not 0.0 <= weight <= 1.0:
        raise NcleanerError(f"{path}: field 'weight' must be in [0, 1], got {weight!r}")
    quantiles = _field(path, data, "quantiles")
    if not isinstance(quantiles, dict):
        raise NcleanerError(f"{path}: field 'quantiles' must be an object")
    negclip_tau = _numbers(path, {"negclip_tau": [_field(path, data, "negclip_tau")]}, "negclip_tau", length=1)[0]
    if negclip_tau <= 0:
        raise NcleanerError(f"{path}: field 'negclip_tau' must be > 0, got {negclip_tau!r}")
    return Calibration(
        term=term,
        weight=weight,
        quantiles={name: _numbers(path, quantiles, name, "quantiles.") for name in TERMS},
        negclip_tau=negclip_tau,
        mixture=TwoComponentMixture(
            weights=_numbers(path, mixture, "weights", "mixture.", length=2),
            means=_numbers(path, mixture, "means", "mixture.", length=2),
            variances=_numbers(path, mixture, "variances", "mixture.", length=2),
            clean=clean,
        ),
    )


def _field(path: Path, data: dict, name: str, prefix: str = "") -> object:
    if name not in data:
        raise NcleanerError(f"{path}: missing field '{prefix}{name}'")
    return data[name]


def _numbers(path: Path, data: dict, name: str, prefix: str = "", length: int | None = None) -> list[float]:
    """Field ``name``: a non-empty list of finite numbers (of ``length`` numbers when given)."""
    values = _field(path, data, name, prefix)
    ok = isinstance(values, list) and len(values) > 0 and (length is None or len(values) == length)
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
    if not ok:
        size = f"{length} " if length else "a list of "
        raise NcleanerError(f"{path}: field '{prefix}{name}' must be {size}finite numbers")
    return [float(v) for v in values]


def _check_tensors(d: Path, config: DisNCLConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights that do not fit the config, before the (possibly large) backbone is built.

    Without these checks a config edited after fit loads without complaint and
    scores with a randomly initialised backbone, or fails deep inside torch.
    """
    trained = config.resolved_train_backbone() == "all"
    has_backbone = any(k.startswith("backbone.") for k in tensors)
    if has_backbone and not trained:
        raise NcleanerError(
            f"{d}: {WEIGHTS_FILE} holds trained backbone weights but {CONFIG_FILE} says the backbone is frozen "
            f"(train_backbone {config.train_backbone}, pretrained {config.pretrained})"
        )
    if trained and not has_backbone:
        raise NcleanerError(
            f"{d}: {CONFIG_FILE} says the backbone was trained (train_backbone {config.train_backbone}, "
            f"pretrained {config.pretrained}) but {WEIGHTS_FILE} holds no backbone weights"
        )
    heads = _prefixed(tensors, "heads.")
    for name, (key, axis) in HEAD_SIZES.items():
        if key in heads and heads[key].dim() == 2 and heads[key].shape[axis] != getattr(config, name):
            raise NcleanerError(
                f"{d}: {WEIGHTS_FILE} holds heads for {name} {heads[key].shape[axis]} "
                f"but {CONFIG_FILE} says {getattr(config, name)}"
            )
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = _shapes(DisNCLHeads(config.embed_dim, config.mei_dim, config.hidden_dim))
    _check_fit(d, "the heads that config.json describes", expected, heads)
    _check_bank(d, config, tensors)
    # The heads and the bank are all that turn features into scores: a NaN in them is a NaN in every score.
    for key in [*(f"heads.{k}" for k in heads), *BANK_TENSORS]:
        bad = int((~torch.isfinite(tensors[key])).sum())
        if bad:
            raise NcleanerError(f"{d}: {WEIGHTS_FILE} holds {bad} non-finite values in {key} (the file is damaged)")


def _check_bank(d: Path, config: DisNCLConfig, tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in BANK_TENSORS if k not in tensors]
    if missing:
        raise NcleanerError(f"{d}: {WEIGHTS_FILE} has no reference bank (missing {', '.join(missing)})")
    for key in BANK_TENSORS:
        shape = list(tensors[key].shape)
        if len(shape) != 2 or shape[0] < 1 or shape[1] != config.embed_dim:
            raise NcleanerError(
                f"{d}: {WEIGHTS_FILE} holds {key} of shape {shape}, "
                f"not [pairs, embed_dim {config.embed_dim}] as {CONFIG_FILE} says"
            )
    if len({tensors[k].shape for k in BANK_TENSORS}) != 1:
        raise NcleanerError(f"{d}: {WEIGHTS_FILE} holds bank tensors of different shapes ({', '.join(BANK_TENSORS)})")


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_fit(d: Path, what: str, expected: dict[str, tuple[int, ...]], saved: dict[str, torch.Tensor]) -> None:
    """Refuse saved tensors that ``load_state_dict`` would reject, with the first of each kind of problem."""
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    wrong = [k for k in sorted(expected.keys() & saved.keys()) if tuple(saved[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {list(saved[k].shape)}, not {list(expected[k])})")
    if problems:
        raise NcleanerError(f"{d}: {WEIGHTS_FILE} does not fit {what}: tensors {'; '.join(problems)}")


def model_id(model_dir: str | Path) -> str:
    """Hash of the model's weights, config and calibration: the report's ``model_id``."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def _check_checkpoint(path: Path, config: DisNCLConfig) -> None:
    """The frozen backbone's checkpoint must be the file ``fit`` used: at the absolute path it
    recorded, with the SHA-256 it recorded (the heads were trained on that backbone's features)."""
    ckpt, recorded = config.pretrained, config.pretrained_sha256
    if not os.path.isfile(ckpt):
        raise NcleanerError(
            f"{path}: the backbone checkpoint {ckpt} is missing (fit used it, SHA-256 {recorded[:12]}): "
            "put the file back there, or fit again"
        )
    found = checkpoint_sha256(ckpt)
    if found != recorded:
        raise NcleanerError(
            f"{path}: the backbone checkpoint {ckpt} holds other weights (SHA-256 {found[:12]}) than those "
            f"fit used ({recorded[:12]}): put the original back there, or fit again"
        )
