"""The encode stage: decoded blocks in, backbone features out (docs/design.md section 10).

Every command that needs backbone features (``fit``, ``score``, ``embed``,
``evaluate``) encodes through ``Encoder``. Its features are L2-normalised: the
DisNCL heads normalise their inputs anyway (``heads.DisNCLHeads.mii``), and
normalised features are what published embedding sets hold, so features computed
here and features read from an embeddings directory are interchangeable.
"""

from __future__ import annotations

import contextlib
import logging

import open_clip
import torch
import torch.nn.functional as F

from .backbone import Backbone
from .config import PRECISIONS
from .errors import NcleanerError

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Encoder:
    """F_V, F_T of stacked images and tokens, under ``torch.inference_mode``: L2-normalised,
    rounded to float16 values (``canonical``), as float32 tensors.

    Args:
        backbone: the open_clip backbone.
        device: where it runs; inputs are moved there (without blocking, from pinned memory).
        precision: ``fp32``, or ``fp16`` / ``bf16`` autocast on CUDA (on CPU, where autocast
            is slower than float32 for these models, the backbone runs in float32).
        source: how an error message names the model (its directory, or the backbone).
    """

    def __init__(self, backbone: Backbone, device: torch.device, *, precision: str = "fp32", source: str = ""):
        if precision not in PRECISIONS:
            raise NcleanerError(f"precision {precision}: must be one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and device.type != "cuda":
            logger.info("precision %s applies on CUDA only: encoding in float32 on %s", precision, device)
            precision = "fp32"
        self.backbone, self.device, self.precision = backbone, device, precision
        self.source = source or f"backbone {type(backbone.model).__name__}"

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=_AUTOCAST_DTYPES[self.precision])

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.backbone.model.eval()
        images = images.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            f_v = canonical(self.backbone.encode_image(images))
        return self._checked("image", f_v), self.text(tokens)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """F_T alone: what ``fit`` needs for captions it writes itself (edits, boilerplate)."""
        model = self.backbone.model
        model.eval()
        tokens = tokens.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            f_t = canonical(encode_text(model, tokens))
        return self._checked("text", f_t)

    def _checked(self, what: str, features: torch.Tensor) -> torch.Tensor:
        # Decoded images and tokens are finite, so non-finite features mean broken backbone
        # weights (or an fp16 overflow), which the heads could not tell from bad input.
        hint = ", or fp16 overflow: try --precision bf16" if self.precision == "fp16" else ""
        bad = int((~torch.isfinite(features).all(dim=1)).sum())
        if bad:
            raise NcleanerError(
                f"{self.source}: backbone gives non-finite {what} features for {bad} of {len(features)} pairs "
                f"(damaged backbone weights{hint})"
            )
        return features


def canonical(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised and rounded to float16, the precision embeddings are stored in, so that fresh
    features and stored ones are the same numbers: a model fitted from either scores alike."""
    return F.normalize(features.float(), dim=-1).half().float()


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower on ``tokens``, cut to the batch's longest caption where that cannot change the result.

    open_clip pads every caption to the context length (77 tokens for most models), and
    most captions are far shorter. In open_clip's ``CLIP`` text tower the attention mask
    is causal and the feature is read at the end-of-text token, so the padding after the
    batch's last non-pad token never reaches it: running the tower on the first L
    positions only (positional embeddings and mask cut to L) gives the same features at a
    fraction of the cost. Other towers (bidirectional, Hugging Face, last-token pooling)
    run on the full length.
    """
    if not _truncatable(model):
        return model.encode_text(tokens)
    nonpad = (tokens != 0).any(dim=0).nonzero()
    length = int(nonpad.max()) + 1 if len(nonpad) else 1
    if length == tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def _truncatable(model: torch.nn.Module) -> bool:
    return (
        isinstance(model, open_clip.CLIP)
        and model.text_pool_type in ("argmax", "eos")
        and getattr(model, "attn_mask", None) is not None
        and model.attn_mask.ndim == 2
    )
