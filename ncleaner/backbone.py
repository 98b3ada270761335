"""The open_clip backbone: building it, preprocessing for it, encoding with it.

Every open_clip model name works. ``pretrained`` is an open_clip tag (fetched by
open_clip where the machine can reach its hub) or a local checkpoint file. The
package also registers ``ncleaner-tiny``: a small ResNet image tower and a small
text transformer at 64 px, trained from scratch. It exists so that the demo and
the tests run offline on a CPU; it is not a substitute for a real backbone.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from .config import TINY_BACKBONE  # noqa: F401  (re-exported: the name this module registers)
from .errors import NcleanerError, first_line

open_clip.add_model_config(Path(__file__).parent / "model_configs")


@dataclass
class Backbone:
    """An open_clip model with the image transform and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    embed_dim: int

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """F_V: raw (unnormalised) image features."""
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """F_T: raw (unnormalised) text features."""
        return self.model.encode_text(tokens)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a local checkpoint file: what identifies its weights wherever the file lies.

    Hashed once per version of the file in a process (keyed by its real path, size and mtime),
    so that a run that both loads a model and opens its embeddings reads the file once.
    """
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def build_backbone(name: str, pretrained: str | None, device: str | torch.device = "cpu") -> Backbone:
    """Create the open_clip model ``name`` with weights from ``pretrained`` (tag or path) or random."""
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise NcleanerError(f"{name}: not an open_clip model name (see open_clip.list_models())")
    if pretrained and not os.path.isfile(pretrained) and name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            known = f"its tags: {', '.join(tags)}" if tags else "it has no open_clip tags"
            raise NcleanerError(f"{pretrained}: neither a checkpoint file nor a pretrained tag of {name} ({known})")
    try:
        with _quiet_random_init():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device
            )
    except Exception as exc:  # open_clip raises RuntimeError, OSError, hub errors...
        raise NcleanerError(f"{name} ({pretrained or 'random init'}): cannot load backbone: {first_line(exc)}") from exc
    tokenizer = open_clip.get_tokenizer(name)
    embed_dim = _embed_dim(model)
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, embed_dim=embed_dim)


def download_reason(name: str, pretrained: str | None) -> str | None:
    """Why building ``name`` with ``pretrained`` would make open_clip reach the network, or None.

    Follows open_clip's own resolution (``create_model``, ``get_tokenizer``): an
    ``hf-hub:`` name fetches its config and weights; a pretrained tag is
    downloaded, and open_clip looks tags up before files, so a local file named
    like a tag does not stop it; a Hugging Face text tower or tokenizer fetches
    its config and vocabulary even without pretrained weights.
    """
    if name.startswith("hf-hub:"):
        return f"backbone {name} is fetched from the Hugging Face hub"
    local_dir = name.startswith("local-dir:")
    if pretrained and not local_dir and open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained):
        return f"pretrained {pretrained} is an open_clip tag, downloaded from its hub"
    text_cfg = _model_config(name).get("text_cfg", {})
    # A local-dir model's tokenizer is read from its directory; its HF text tower's config is not.
    hub_names = [text_cfg.get("hf_model_name")] + ([] if local_dir else [text_cfg.get("hf_tokenizer_name")])
    hub_names = [n for n in hub_names if n and not os.path.exists(n)]
    if hub_names:
        return f"backbone {name} fetches {hub_names[0]} from the Hugging Face hub"
    if not local_dir and not text_cfg.get("hf_tokenizer_name") and "siglip" in name.lower():
        return f"backbone {name} downloads its SigLIP tokenizer vocabulary"
    return None


def _model_config(name: str) -> dict:
    """open_clip's config of ``name`` without network access ({} when there is none to read)."""
    key = name if name.startswith("local-dir:") else name.replace("/", "-")  # as open_clip's create_model looks it up
    try:
        return open_clip.get_model_config(key) or {}
    except Exception:  # a local-dir without a readable config: building the backbone says what is wrong
        return {}


@contextmanager
def _quiet_random_init():
    """Drop open_clip's "No pretrained weights loaded" warning: without --pretrained a random
    initialisation is what was asked for (a trained backbone's weights are loaded afterwards).

    A logger's filter sees only records logged on that very logger, not those propagated from
    its children, so the filter goes on every logger open_clip has warned through: the root
    logger (``logging.warning`` in open_clip 2.x and 3.x) and its own module loggers.
    """

    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    loggers = [logging.getLogger(name) for name in ("", "open_clip", "open_clip.factory")]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _embed_dim(model: torch.nn.Module) -> int:
    with torch.no_grad():
        out = model.encode_text(torch.zeros(1, _context_length(model), dtype=torch.long))
    return int(out.shape[-1])


def _context_length(model: torch.nn.Module) -> int:
    return int(getattr(model, "context_length", 77))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA where there is none is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NcleanerError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise NcleanerError(f"--device {name}: not a torch device") from exc


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [N, D] tensors."""
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)
