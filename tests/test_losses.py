"""Properties each DisNCL term must have (docs/design.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ncleaner import losses
from ncleaner.heads import DisNCLHeads, GaussianVariational, ResidualHead


def _clean_batch(n=8, d=16, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = F.normalize(v + noise * torch.randn(n, d, generator=g), dim=-1)
    return v, t


def test_soft_targets_are_distributions_peaked_on_the_diagonal_for_a_clean_batch():
    v, t = _clean_batch()
    targets = losses.soft_targets(v @ t.T, torch.ones(8), target_tau=0.1, identity_mix=0.5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert (targets >= 0).all()
    assert (targets.argmax(dim=1) == torch.arange(8)).all()
    # Soft, not one-hot: other captions share some mass.
    assert (targets.diagonal() < 1).all()


def test_soft_targets_give_a_noisy_pair_nothing_on_its_own_caption():
    v, t = _clean_batch()
    w = torch.ones(8)
    w[3] = 0.0
    targets = losses.soft_targets(v @ t.T, w, target_tau=0.1, identity_mix=0.5)
    assert targets[3, 3] == 0
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))


def test_identity_mix_one_gives_one_hot_targets_for_clean_pairs():
    v, t = _clean_batch()
    targets = losses.soft_targets(v @ t.T, torch.ones(8), target_tau=0.1, identity_mix=1.0)
    assert torch.allclose(targets, torch.eye(8))


def test_alignment_loss_ignores_pairs_with_zero_weight_and_prefers_aligned_batches():
    v, t = _clean_batch()
    kw = dict(tau=0.1, target_tau=0.1, identity_mix=0.5)
    w = torch.ones(8)
    aligned = losses.soft_alignment_loss(v, t, w, **kw)
    shuffled = losses.soft_alignment_loss(v, t[torch.randperm(8, generator=torch.Generator().manual_seed(1))], w, **kw)
    assert aligned < shuffled
    assert losses.soft_alignment_loss(v, t, torch.zeros(8), **kw) == 0


def _club_bound(make_x, steps=300):
    """Train q(x|s) on one sample, report the vCLUB bound on a fresh one."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    s_train, s_test = torch.randn(512, 4, generator=g), torch.randn(512, 4, generator=g)
    x_train, x_test = make_x(s_train, g), make_x(s_test, g)
    q = GaussianVariational(4, 4, 64)
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        (-losses.gaussian_log_likelihood(q, s_train, x_train)).backward()
        opt.step()
    with torch.no_grad():
        return losses.vclub_upper_bound(q, s_test, x_test).item()


def test_vclub_bound_is_near_zero_for_independent_inputs_and_large_for_dependent_ones():
    independent = _club_bound(lambda s, g: torch.randn(s.shape, generator=g))
    dependent = _club_bound(lambda s, g: s + 0.1 * torch.randn(s.shape, generator=g))
    assert abs(independent) < 0.5
    assert dependent > 5  # true I(s; x) here is 4 * log(1 + 100) / 2 = 9.2 nats


def test_confusion_loss_is_zero_at_chance_and_positive_when_the_discriminator_matches():
    assert abs(losses.confusion_loss(torch.zeros(6, 6)).item()) < 1e-6
    assert losses.confusion_loss(10 * torch.eye(6)).item() > 1.0
    assert losses.matching_loss(10 * torch.eye(6)) < losses.matching_loss(torch.zeros(6, 6))
    assert math.isclose(losses.matching_loss(torch.zeros(6, 6)).item(), math.log(6), rel_tol=1e-6)


def test_reconstruction_loss_is_zero_for_a_perfect_decoder():
    f = torch.randn(5, 8)
    assert losses.reconstruction_loss(F.normalize(f, dim=-1), f) == 0
    assert losses.reconstruction_loss(torch.zeros(5, 8), f) > 0


def test_mii_heads_start_as_the_identity_so_mii_sim_starts_at_clip_sim():
    torch.manual_seed(0)
    head = ResidualHead(16, 32)
    x = torch.randn(4, 16)
    assert torch.equal(head(x), x)
    heads = DisNCLHeads(embed_dim=16, mei_dim=8, hidden_dim=32)
    f_v, f_t = torch.randn(4, 16), torch.randn(4, 16)
    v_s, t_s = heads.mii(f_v, f_t)
    # Two float32 formulas of one cosine: they agree to rounding, which varies with the CPUs' kernels.
    assert torch.allclose(losses.mii_similarity(v_s, t_s), F.cosine_similarity(f_v, f_t), atol=1e-5)
    split = heads(f_v, f_t)
    assert split.v_x.shape == (4, 8) and torch.allclose(split.v_x.norm(dim=-1), torch.ones(4))
