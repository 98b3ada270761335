"""DisNCL's modules: the MII/MEI heads and the critics that train against them.

Notation follows docs/design.md section 2: backbone features F_V, F_T; MII outputs
V_S, T_S (the shared subspace); MEI outputs V_X, T_X (what one modality has and
the other lacks). All head outputs are L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ResidualHead(nn.Module):
    """MII head s(F) = F + MLP(F), with the MLP's last layer starting at zero.

    At initialisation the MII subspace *is* the backbone space, so ``mii_sim``
    starts equal to ``clip_sim`` and training can only move it away from the
    backbone's alignment where the data asks for it; a pretrained backbone's
    zero-shot alignment is not thrown away by a random projection.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = mlp(dim, hidden, dim)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


@dataclass
class Split:
    """Normalised head outputs for a batch: MII (v_s, t_s) and MEI (v_x, t_x)."""

    v_s: torch.Tensor
    t_s: torch.Tensor
    v_x: torch.Tensor
    t_x: torch.Tensor


class DisNCLHeads(nn.Module):
    """MII heads s_V, s_T, MEI heads x_V, x_T, and the decoders of the completeness term.

    The decoders map [V_S; V_X] back to F_V (and [T_S; T_X] to F_T); L_reg uses
    them so that the split keeps the backbone's information (docs/design.md section 2,
    "Completeness / regulariser").
    """

    def __init__(self, embed_dim: int, mei_dim: int, hidden_dim: int):
        super().__init__()
        self.mii_image = ResidualHead(embed_dim, hidden_dim)
        self.mii_text = ResidualHead(embed_dim, hidden_dim)
        self.mei_image = mlp(embed_dim, hidden_dim, mei_dim)
        self.mei_text = mlp(embed_dim, hidden_dim, mei_dim)
        self.decode_image = mlp(embed_dim + mei_dim, hidden_dim, embed_dim)
        self.decode_text = mlp(embed_dim + mei_dim, hidden_dim, embed_dim)

    def mii(self, f_v: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_S, T_S): all scoring similarity is taken here."""
        f_v, f_t = F.normalize(f_v, dim=-1), F.normalize(f_t, dim=-1)
        return F.normalize(self.mii_image(f_v), dim=-1), F.normalize(self.mii_text(f_t), dim=-1)

    def forward(self, f_v: torch.Tensor, f_t: torch.Tensor) -> Split:
        v_s, t_s = self.mii(f_v, f_t)
        f_v, f_t = F.normalize(f_v, dim=-1), F.normalize(f_t, dim=-1)
        v_x = F.normalize(self.mei_image(f_v), dim=-1)
        t_x = F.normalize(self.mei_text(f_t), dim=-1)
        return Split(v_s, t_s, v_x, t_x)

    def reconstruct(self, s: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded backbone features from the two halves of each modality's split."""
        return (
            self.decode_image(torch.cat([s.v_s, s.v_x], dim=-1)),
            self.decode_text(torch.cat([s.t_s, s.t_x], dim=-1)),
        )


class GaussianVariational(nn.Module):
    """q(x | s) = N(mu(s), diag(exp(logvar(s)))), the variational net of vCLUB.

    Trained by maximum likelihood on (s, x) pairs; the heads then minimise the
    vCLUB bound it induces (Cheng et al., "CLUB", ICML 2020, eq. 13), see
    ``ncleaner.losses.vclub_upper_bound``.
    """

    def __init__(self, s_dim: int, x_dim: int, hidden: int):
        super().__init__()
        self.mu = mlp(s_dim, hidden, x_dim)
        self.logvar = nn.Sequential(mlp(s_dim, hidden, x_dim), nn.Tanh())

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(s), self.logvar(s)


class PairDiscriminator(nn.Module):
    """Bilinear critic that tries to tell which MII vector of the other modality goes with an MEI vector.

    ``logits(x, s)[i, j]`` scores "x_i and s_j come from the same pair". If MEI
    carried shared content, the critic would find the match; the MEI heads are
    trained to leave it at chance (docs/design.md section 2, "Adversarial term").
    """

    def __init__(self, x_dim: int, s_dim: int, hidden: int):
        super().__init__()
        self.x_proj = mlp(x_dim, hidden, hidden)
        self.s_proj = mlp(s_dim, hidden, hidden)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.x_proj(x) @ self.s_proj(s).T


class DisNCLCritics(nn.Module):
    """The estimator networks, trained in alternation with the heads (their own optimiser)."""

    def __init__(self, embed_dim: int, mei_dim: int, hidden_dim: int):
        super().__init__()
        self.club_image = GaussianVariational(embed_dim, mei_dim, hidden_dim)
        self.club_text = GaussianVariational(embed_dim, mei_dim, hidden_dim)
        self.disc_image_mei = PairDiscriminator(mei_dim, embed_dim, hidden_dim)  # V_X vs T_S
        self.disc_text_mei = PairDiscriminator(mei_dim, embed_dim, hidden_dim)  # T_X vs V_S
