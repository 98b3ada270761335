"""DisNCL's loss terms as pure functions (docs/design.md section 2).

Each function names the quantity it estimates or bounds. The training loop in
``ncleaner.fitting`` only adds them up with the weights of ``DisNCLConfig``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .heads import GaussianVariational


def soft_targets(sim: torch.Tensor, clean_weight: torch.Tensor, target_tau: float, identity_mix: float) -> torch.Tensor:
    """Soft many-to-many targets for one retrieval direction.

    ``sim[i, j]`` is the (detached) MII similarity of query i to candidate j.
    For a pair judged clean the target row is
        alpha * e_i + (1 - alpha) * softmax_j(sim[i, j] / target_tau),
    so captions that also fit image i share its mass instead of being pushed
    away as one-hot negatives would be. For a pair judged noisy the row is
        softmax_{j != i}(sim[i, j] / target_tau),
    which puts nothing on its own (wrong) caption. Rows are blended by the clean
    weight w_i in [0, 1]; every row sums to 1.
    """
    n = sim.shape[0]
    if n < 2:
        raise ValueError("soft targets need a batch of at least two pairs")
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    scaled = sim / target_tau
    clean_rows = identity_mix * eye.to(sim.dtype) + (1.0 - identity_mix) * scaled.softmax(dim=1)
    noisy_rows = scaled.masked_fill(eye, float("-inf")).softmax(dim=1)
    w = clean_weight.to(sim.dtype)[:, None]
    return w * clean_rows + (1.0 - w) * noisy_rows


def soft_alignment_loss(
    v_s: torch.Tensor,
    t_s: torch.Tensor,
    clean_weight: torch.Tensor,
    tau: float,
    target_tau: float,
    identity_mix: float,
    soft: bool = True,
) -> torch.Tensor:
    """L_align: weighted symmetric cross-entropy of MII similarities against soft targets.

    Maximises an InfoNCE-style lower bound on I(V_S; T_S) (docs/design.md section 2,
    "Cross-modal alignment in the MII subspace"), with each pair's two rows
    scaled by its clean weight so pairs that look noisy contribute little.
    ``soft=False`` uses one-hot targets instead (the ablation / plain InfoNCE).
    """
    sim = v_s @ t_s.T
    logits = sim / tau
    with torch.no_grad():
        if soft:
            target_i2t = soft_targets(sim, clean_weight, target_tau, identity_mix)
            target_t2i = soft_targets(sim.T, clean_weight, target_tau, identity_mix)
        else:
            target_i2t = target_t2i = torch.eye(len(sim), dtype=sim.dtype, device=sim.device)
    ce_i2t = -(target_i2t * logits.log_softmax(dim=1)).sum(dim=1)
    ce_t2i = -(target_t2i * logits.T.log_softmax(dim=1)).sum(dim=1)
    return (clean_weight * (ce_i2t + ce_t2i) / 2).mean()


def infonce_per_pair(v_s: torch.Tensor, t_s: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-pair symmetric InfoNCE loss with one-hot targets within the batch (no reduction).

    The statistic NCR (Huang et al., NeurIPS 2021) splits with a two-component
    mixture: noisy pairs are the ones the model fits last, so their loss stays high.
    """
    logits = v_s @ t_s.T / tau
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2


def gaussian_log_likelihood(q: GaussianVariational, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean log q(x_i | s_i) up to its constant: the objective the vCLUB estimator maximises."""
    mu, logvar = q(s)
    return (-((mu - x) ** 2) / logvar.exp() / 2 - logvar / 2).sum(dim=1).mean()


def vclub_upper_bound(q: GaussianVariational, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """vCLUB upper bound on I(S; X) (Cheng et al., ICML 2020, eq. 13):

        I_vCLUB = E_{p(s,x)}[log q(x|s)] - E_{p(s)} E_{p(x)}[log q(x|s)],

    estimated on a batch with all N^2 (s_i, x_j) pairs as the product of marginals.
    The heads minimise it to remove shared information between MII and MEI
    (I(V_S; V_X), I(T_S; T_X)); it is ~0 when s and x are independent.
    """
    mu, logvar = q(s)
    inv_var = (-logvar).exp()
    positive = (-((mu - x) ** 2) * inv_var / 2).sum(dim=1)
    negative = (-((mu[:, None, :] - x[None, :, :]) ** 2) * inv_var[:, None, :] / 2).sum(dim=2).mean(dim=1)
    return (positive - negative).mean()


def matching_loss(logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's objective: identify the true partner of each row and column (symmetric CE)."""
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """The MEI heads' adversarial objective: KL(uniform || discriminator), zero at chance.

    Driving the discriminator's matching distribution to uniform means the MEI
    of one modality carries nothing that predicts the other modality's MII.
    """
    n = logits.shape[1]
    return (-logits.log_softmax(dim=1).mean(dim=1) - math.log(n)).mean()


def reconstruction_loss(decoded: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """L_reg: squared error of the decoded feature against the normalised backbone feature."""
    return ((decoded - F.normalize(feature, dim=-1).detach()) ** 2).sum(dim=1).mean()


def mii_similarity(v_s: torch.Tensor, t_s: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in the MII subspace (inputs already normalised)."""
    return (v_s * t_s).sum(dim=-1)


def edit_negative_loss(
    v_s: torch.Tensor, t_s: torch.Tensor, e_s: torch.Tensor, clean_weight: torch.Tensor, tau: float
) -> torch.Tensor:
    """L_edit: each image must prefer its own caption to a one-fact edit of it.

        L_edit = sum_i w_i * -log( exp(v_i.t_i / tau) / (exp(v_i.t_i / tau) + exp(v_i.e_i / tau)) ) / sum_i w_i

    ``e_s`` holds the MII features of the edited captions (a colour, count, object or
    position word swapped), row i for pair i. Random in-batch negatives almost never
    differ from a caption by one fact, so InfoNCE alone lets the heads blur the
    directions that tell "a red car" from "a blue car"; this term keeps them. Pairs
    weighted as noisy (w_i near 0) contribute nothing: their own caption is not the one
    to prefer.
    """
    own = (v_s * t_s).sum(-1) / tau
    edit = (v_s * e_s).sum(-1) / tau
    per_pair = F.softplus(edit - own)  # -log sigmoid(own - edit)
    w = clean_weight.to(per_pair.dtype)
    return (w * per_pair).sum() / w.sum().clamp_min(1e-8)
