"""A fitted ncleaner model: backbone + DisNCL heads + reference bank + score calibration.

This is the one place that builds a model from a config and that reads and
writes a model directory:

    MODEL_DIR/config.json        DisNCLConfig
    MODEL_DIR/model.safetensors  heads, reference bank, and backbone weights when trained
    MODEL_DIR/calibration.json   score calibration (section 3 of DESIGN.md)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbone import Backbone, build_backbone, cosine
from .config import DisNCLConfig
from .errors import NcleanerError
from .heads import DisNCLHeads
from .mixture import TwoComponentMixture
from .writer import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CALIBRATION_FILE = "calibration.json"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, CALIBRATION_FILE)


@dataclass
class Calibration:
    """Turns (mii_sim, soft_agreement) into ``score``, and ``mii_sim`` into ``clean_prob``.

    ``score`` is the mean of the two columns' ranks among the training pairs
    (empirical CDFs stored as quantiles), so scores of different runs of one
    model are comparable. ``clean_prob`` is the clean posterior of the
    two-component mixture fitted to the training pairs' ``mii_sim``: the same
    split that weighted the pairs in training. (DESIGN.md fits it to ``score``,
    but a rank-normalised score is close to uniform by construction, so a
    two-component fit on it splits wherever EM lands: on sample_data it once
    flagged 47 % of the pairs where 20 % were noisy.)
    """

    mii_quantiles: list[float]
    soft_quantiles: list[float]
    mixture: TwoComponentMixture

    @classmethod
    def fit(cls, mii: np.ndarray, soft: np.ndarray, points: int, seed: int) -> Calibration:
        levels = np.linspace(0.0, 1.0, points)
        return cls(
            mii_quantiles=np.quantile(mii, levels).tolist(),
            soft_quantiles=np.quantile(soft, levels).tolist(),
            mixture=TwoComponentMixture.fit(mii, seed=seed),
        )

    def score(self, mii: np.ndarray, soft: np.ndarray) -> np.ndarray:
        return ((_rank(mii, self.mii_quantiles) + _rank(soft, self.soft_quantiles)) / 2).astype(np.float32)

    def clean_prob(self, mii: np.ndarray) -> np.ndarray:
        return self.mixture.clean_posterior(mii).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "mii_quantiles": self.mii_quantiles,
            "soft_quantiles": self.soft_quantiles,
            "mixture": self.mixture.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(d["mii_quantiles"], d["soft_quantiles"], TwoComponentMixture.from_dict(d["mixture"]))


def _rank(values: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """Empirical CDF by linear interpolation between stored quantiles (ties broken by a tiny ramp)."""
    q = np.asarray(quantiles, dtype=np.float64)
    q = q + np.arange(len(q)) * 1e-12
    return np.interp(np.asarray(values, dtype=np.float64), q, np.linspace(0.0, 1.0, len(q)))


def soft_agreement(
    v_s: torch.Tensor, t_s: torch.Tensor, bank_v: torch.Tensor, bank_t: torch.Tensor, tau: float
) -> torch.Tensor:
    """How much of the soft cross-modal target each pair keeps for itself (DESIGN.md section 3).

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
        self.calibration: Calibration | None = None

    @classmethod
    def create(cls, config: DisNCLConfig, device: str | torch.device = "cpu") -> NcleanerModel:
        backbone = build_backbone(config.backbone, config.pretrained, device)
        config.embed_dim = backbone.embed_dim
        return cls(config, backbone).to(device)

    @property
    def trains_backbone(self) -> bool:
        return self.config.resolved_train_backbone() == "all"

    @torch.no_grad()
    def score_features(self, f_v: torch.Tensor, f_t: torch.Tensor) -> dict[str, np.ndarray]:
        """All score columns for a batch of backbone features."""
        if self.calibration is None or len(self.bank_v) == 0:
            raise RuntimeError("model is not fitted: no reference bank or calibration")
        v_s, t_s = self.heads.mii(f_v, f_t)
        mii = (v_s * t_s).sum(-1).cpu().numpy()
        soft = soft_agreement(v_s, t_s, self.bank_v, self.bank_t, self.config.tau).cpu().numpy()
        score = self.calibration.score(mii, soft)
        return {
            "clip_sim": cosine(f_v, f_t).cpu().numpy().astype(np.float32),
            "mii_sim": mii.astype(np.float32),
            "soft_agreement": soft.astype(np.float32),
            "score": score,
            "clean_prob": self.calibration.clean_prob(mii),
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_V, F_T for a batch, in eval mode."""
        self.clip.eval()
        device = self.bank_v.device
        return self.backbone.encode_image(images.to(device)), self.backbone.encode_text(tokens.to(device))

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.backbone.tokenizer(captions)

    # -- model directory -------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> str:
        """Write the model directory and return the model id."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        tensors["bank.v"], tensors["bank.t"] = self.bank_v, self.bank_t
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
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> NcleanerModel:
        """Load a model directory written by ``save`` (one-line error when it is not one)."""
        d = Path(model_dir)
        missing = [f for f in MODEL_FILES if not (d / f).is_file()]
        if missing:
            raise NcleanerError(f"{d}: not an ncleaner model directory (missing {', '.join(missing)})")
        try:
            config = DisNCLConfig.load(d / CONFIG_FILE)
            tensors = load_file(str(d / WEIGHTS_FILE))
            calibration = Calibration.from_dict(json.loads((d / CALIBRATION_FILE).read_text()))
        except Exception as exc:
            raise NcleanerError(f"{d}: cannot read model: {exc}") from exc
        backbone_pretrained = None if config.resolved_train_backbone() == "all" else config.pretrained
        backbone = build_backbone(config.backbone, backbone_pretrained, device)
        model = cls(config, backbone)
        model.bank_v, model.bank_t = tensors.pop("bank.v"), tensors.pop("bank.t")
        model.heads.load_state_dict(_prefixed(tensors, "heads."))
        if model.trains_backbone:
            model.clip.load_state_dict(_prefixed(tensors, "backbone."))
        model.calibration = calibration
        model.model_id = model_id(d)
        return model.to(device).eval()


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def model_id(model_dir: str | Path) -> str:
    """Hash of the model's weights, config and calibration: the report's ``model_id``."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()[:16]
