"""``fit``: train a DisNCL model on the user's own shards (no clean labels).

Two regimes (docs/design.md section 1): a pretrained backbone stays frozen, its
features are encoded once and only the heads train; a randomly initialised
backbone trains together with the heads. Its only objective is DisNCL's: the
MII heads are residual (``heads.ResidualHead``), so aligning the MII subspace
also aligns the backbone's own space and ``clip_sim`` stays meaningful.

Each epoch after the warm-up fits a two-component mixture to the MII
similarity of every training pair; the clean posterior is that pair's weight
in the alignment loss and in its soft targets.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import losses, schema
from .backbone import resolve_device
from .config import DisNCLConfig
from .decode import DEFAULT_MAX_IMAGE_PIXELS, batched, decode_stream
from .errors import NcleanerError, UnreadableShard
from .heads import DisNCLCritics
from .mixture import TwoComponentMixture
from .model import MODEL_FILES, Calibration, NcleanerModel, soft_agreement
from .shards import expand_shards, read_shard
from .writer import StagedDir

logger = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """What fit keeps in memory: per ok pair, either cached features or decoded inputs."""

    statuses: Counter = field(default_factory=Counter)
    f_v: torch.Tensor | None = None  # frozen backbone: cached features
    f_t: torch.Tensor | None = None
    images: torch.Tensor | None = None  # trained backbone: decoded inputs
    tokens: torch.Tensor | None = None
    skipped_shards: dict[str, str] = field(default_factory=dict)  # unreadable shard -> why

    def __len__(self) -> int:
        return len(self.f_v if self.f_v is not None else self.images)


@dataclass
class FitResult:
    model_dir: Path
    model_id: str
    pairs_read: int
    pairs_used: int
    statuses: dict[str, int]
    history: list[dict]
    skipped_shards: dict[str, str] = field(default_factory=dict)


def load_training_set(
    urls: list[str],
    model: NcleanerModel,
    batch_size: int,
    progress: bool,
    *,
    on_bad_shard: str = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> TrainingSet:
    """Read and decode every shard once; cache features (frozen) or inputs (trained backbone).

    A shard that ends early contributes no pair (all its samples count as
    ``truncated_shard``); an unreadable one stops the run, or with
    ``on_bad_shard="skip"`` is recorded in ``skipped_shards`` and left out.
    """
    data = TrainingSet()
    parts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    bar = tqdm(desc="encoding" if not model.trains_backbone else "decoding", unit="pair", disable=not progress)
    for url in urls:
        try:
            shard_parts, statuses = _load_shard(url, model, batch_size, max_image_pixels, bar)
        except UnreadableShard as exc:
            if on_bad_shard == "fail":
                raise
            logger.warning("skipped %s", exc)
            data.skipped_shards[url] = str(exc)
            continue
        data.statuses.update(statuses)
        for k in parts:
            parts[k].extend(shard_parts[k])
    bar.close()
    if parts["a"]:
        a, b = torch.cat(parts["a"]), torch.cat(parts["b"])
        if model.trains_backbone:
            data.images, data.tokens = a, b
        else:
            data.f_v, data.f_t = a, b
    return data


def _load_shard(url, model: NcleanerModel, batch_size: int, max_image_pixels: int, bar):
    """One shard's cached inputs or features (``a``: images / F_V, ``b``: tokens / F_T) and statuses."""
    reader = read_shard(url)
    statuses: Counter = Counter()
    parts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for block in batched(decode_stream(reader, model.backbone.preprocess, max_pixels=max_image_pixels), batch_size):
        statuses.update(p.status for p in block)
        bar.update(len(block))
        ok = [p for p in block if p.ok]
        if not ok:
            continue
        x = torch.stack([p.image for p in ok])
        t = model.tokenize([p.caption for p in ok])
        if not model.trains_backbone:
            f_v, f_t = model.encode(x, t)
            x, t = f_v.float().cpu(), f_t.float().cpu()
        parts["a"].append(x)
        parts["b"].append(t)
    if reader.damage:
        # The cut may have taken members of any of its samples: train on none of them.
        return {"a": [], "b": []}, Counter({schema.TRUNCATED_SHARD: sum(statuses.values())})
    return parts, statuses


def fit(
    shards: str | Iterable[str],
    out_dir: str | Path,
    config: DisNCLConfig | None = None,
    *,
    device: str = "auto",
    force: bool = False,
    on_bad_shard: str = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = False,
) -> FitResult:
    """Train a DisNCL model on ``shards`` and save it to ``out_dir``.

    Args:
        shards: SHARDS in any form ``expand_shards`` takes.
        out_dir: the model directory. It is written under a temporary name and
            swapped in when complete, so an interrupted fit leaves the previous model.
        config: the ``DisNCLConfig`` (defaults when None).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        force: replace an existing model directory (only the files ``fit`` writes).
        on_bad_shard: ``fail`` stops at an unreadable shard; ``skip`` leaves it out
            and lists it in ``FitResult.skipped_shards``.
        max_image_pixels: larger images are not decoded (status ``too_large``).
        progress: show progress bars (the per-epoch lines go to this module's logger, at INFO).
    """
    config = config or DisNCLConfig()
    try:
        config.validate()
    except ValueError as exc:
        raise NcleanerError(f"invalid configuration: {exc}") from exc
    if on_bad_shard not in ("fail", "skip"):
        raise NcleanerError(f"--on-bad-shard {on_bad_shard}: must be fail or skip")
    urls = expand_shards(shards)
    with StagedDir(out_dir, force=force, owned=lambda _: set(MODEL_FILES)) as stage:
        result = _fit(urls, stage.path, config, device, on_bad_shard, max_image_pixels, progress)
        result.model_dir = stage.commit()
    return result


def _fit(urls, out: Path, config, device, on_bad_shard, max_image_pixels, progress) -> FitResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    device = resolve_device(device)
    model = NcleanerModel.create(config, device)
    config = model.config  # with the backbone's embed_dim
    data = load_training_set(
        urls, model, config.batch_size, progress, on_bad_shard=on_bad_shard, max_image_pixels=max_image_pixels
    )
    n = data.statuses.get(schema.OK, 0)
    if n < 4:
        raise NcleanerError(f"{urls[0]}{' ...' if len(urls) > 1 else ''}: only {n} usable pairs; need at least 4")
    bad = {k: v for k, v in data.statuses.items() if k != schema.OK}
    if bad:
        logger.info("not used for training: %s", ", ".join(f"{v} {k}" for k, v in sorted(bad.items())))
    critics = DisNCLCritics(config.embed_dim, config.mei_dim, config.hidden_dim).to(device)
    params = [{"params": model.heads.parameters(), "lr": config.lr}]
    if model.trains_backbone:
        params.append({"params": model.clip.parameters(), "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=config.weight_decay)
    critic_optimizer = torch.optim.AdamW(critics.parameters(), lr=config.critic_lr)
    steps_per_epoch = max(1, n // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in params],
        total_steps=config.epochs * steps_per_epoch,
        pct_start=min(0.3, 1.0 / config.epochs),
    )

    weights = torch.ones(n)
    history = []
    for epoch in range(config.epochs):
        if config.noise_weights and epoch >= config.warmup_epochs and epoch > 0:
            mii = _mii_similarity(model, data, config.batch_size)
            mixture = TwoComponentMixture.fit(mii, seed=config.seed)
            weights = torch.from_numpy(mixture.clean_posterior(mii)).float()
        stats = _train_epoch(model, critics, data, weights, optimizer, critic_optimizer, schedule, rng, epoch, progress)
        stats.update(epoch=epoch + 1, mean_weight=float(weights.mean()), flagged=float((weights < 0.5).float().mean()))
        history.append(stats)
        terms = ", ".join(f"{k} {stats[k]:.4f}" for k in ("align", "dis", "reg") if k in stats)
        logger.info(
            "epoch %d/%d: loss %.4f (%s), pairs weighted as noisy %.1f%%",
            epoch + 1, config.epochs, stats["loss"], terms, 100 * stats["flagged"],
        )  # fmt: skip

    _finalise(model, data, config, rng)
    mid = model.save(out)
    return FitResult(
        model_dir=out,
        model_id=mid,
        pairs_read=sum(data.statuses.values()),
        pairs_used=n,
        statuses=dict(data.statuses),
        history=history,
        skipped_shards=data.skipped_shards,
    )


def _features(model: NcleanerModel, data: TrainingSet, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = model.bank_v.device
    if data.f_v is not None:
        return data.f_v[idx].to(device), data.f_t[idx].to(device)
    return (
        model.backbone.encode_image(data.images[idx].to(device)),
        model.backbone.encode_text(data.tokens[idx].to(device)),
    )


@torch.no_grad()
def _all_mii(model: NcleanerModel, data: TrainingSet, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out_v, out_t = [], []
    for start in range(0, len(data), batch_size * 4):
        idx = torch.arange(start, min(start + batch_size * 4, len(data)))
        v_s, t_s = model.heads.mii(*_features(model, data, idx))
        out_v.append(v_s.cpu())
        out_t.append(t_s.cpu())
    return torch.cat(out_v), torch.cat(out_t)


def _mii_similarity(model: NcleanerModel, data: TrainingSet, batch_size: int) -> np.ndarray:
    v_s, t_s = _all_mii(model, data, batch_size)
    return losses.mii_similarity(v_s, t_s).numpy()


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """A random split of ``range(n)`` into batches: every pair exactly once per epoch.

    A short last batch joins the one before it (a tiny batch has too few negatives for a
    contrastive loss), so there are ``max(1, n // batch_size)`` batches, which is the step
    count the learning-rate schedule is built for.
    """
    order = torch.from_numpy(rng.permutation(n))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        last = batches.pop()
        batches[-1] = torch.cat([batches[-1], last])
    return batches


def _train_epoch(model, critics, data, weights, optimizer, critic_optimizer, schedule, rng, epoch, progress):
    config = model.config
    model.train()
    if not model.trains_backbone:
        model.clip.eval()
    batches = epoch_batches(len(data), config.batch_size, rng)
    totals = Counter()
    device = model.bank_v.device
    for idx in tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", disable=not progress, leave=False):
        f_v, f_t = _features(model, data, idx)
        split = model.heads(f_v, f_t)
        w = weights[idx].to(device)

        align = losses.soft_alignment_loss(
            split.v_s, split.t_s, w, config.tau, config.target_tau, config.identity_mix, soft=config.soft_targets
        )
        loss, parts = align, {"align": align.item()}
        if config.lambda_dis > 0:
            _critic_step(critics, split, critic_optimizer)
            dis = _disentanglement_loss(critics, split, config.lambda_adv)
            loss = loss + config.lambda_dis * dis
            parts["dis"] = dis.item()
        if config.lambda_reg > 0:
            rec_v, rec_t = model.heads.reconstruct(split)
            reg = losses.reconstruction_loss(rec_v, f_v) + losses.reconstruction_loss(rec_t, f_t)
            loss = loss + config.lambda_reg * reg
            parts["reg"] = reg.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        totals.update(parts, loss=loss.item())
    return {k: v / len(batches) for k, v in totals.items()}


def _critic_step(critics: DisNCLCritics, split, optimizer) -> None:
    """Estimators first, on detached outputs: vCLUB's q(x|s) by likelihood, the discriminators
    by matching (the alternating updates of docs/design.md section 2)."""
    s = {k: v.detach() for k, v in vars(split).items()}
    loss = (
        -losses.gaussian_log_likelihood(critics.club_image, s["v_s"], s["v_x"])
        - losses.gaussian_log_likelihood(critics.club_text, s["t_s"], s["t_x"])
        + losses.matching_loss(critics.disc_image_mei(s["v_x"], s["t_s"]))
        + losses.matching_loss(critics.disc_text_mei(s["t_x"], s["v_s"]))
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _disentanglement_loss(critics: DisNCLCritics, split, lambda_adv: float) -> torch.Tensor:
    """L_Dis: vCLUB bounds on I(V_S; V_X) and I(T_S; T_X), plus the MEI heads' adversarial term
    (the MII side is detached there: only the MEI heads are trained to defeat the discriminator)."""
    return (
        losses.vclub_upper_bound(critics.club_image, split.v_s, split.v_x)
        + losses.vclub_upper_bound(critics.club_text, split.t_s, split.t_x)
        + lambda_adv
        * (
            losses.confusion_loss(critics.disc_image_mei(split.v_x, split.t_s.detach()))
            + losses.confusion_loss(critics.disc_text_mei(split.t_x, split.v_s.detach()))
        )
    )


def _finalise(model: NcleanerModel, data: TrainingSet, config: DisNCLConfig, rng: np.random.Generator) -> None:
    """Sample the reference bank from pairs judged clean, then calibrate the scores on all training pairs."""
    v_s, t_s = _all_mii(model, data, config.batch_size)
    mii = losses.mii_similarity(v_s, t_s).numpy()
    clean = TwoComponentMixture.fit(mii, seed=config.seed).clean_posterior(mii) >= 0.5
    pool = np.flatnonzero(clean) if clean.sum() >= 2 else np.argsort(-mii)[: max(2, len(mii) // 2)]
    chosen = np.sort(rng.choice(pool, size=min(config.bank_size, len(pool)), replace=False))
    device = model.bank_v.device
    model.bank_v = v_s[chosen].to(device)
    model.bank_t = t_s[chosen].to(device)
    soft = torch.cat(
        [
            soft_agreement(
                v_s[i : i + 1024].to(device), t_s[i : i + 1024].to(device), model.bank_v, model.bank_t, config.tau
            ).cpu()
            for i in range(0, len(v_s), 1024)
        ]
    ).numpy()
    model.calibration = Calibration.fit(mii, soft, config.calibration_points, config.seed)
    model.eval()
