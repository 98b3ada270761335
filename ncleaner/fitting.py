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

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import losses, schema, selfcheck
from .backbone import resolve_device
from .config import DisNCLConfig
from .decode import DEFAULT_MAX_IMAGE_PIXELS, by_shard, decode_blocks
from .embeddings import EmbeddingStore, embed_on_ray, model_features, open_for_model
from .encode import canonical
from .engine import DEFAULT_RUN, RunOptions, ShardTally, check_on_bad_shard
from .errors import NcleanerError
from .heads import DisNCLCritics
from .mixture import TwoComponentMixture
from .model import FIT_FILES, SELFCHECK_FILE, Calibration, NcleanerModel, anchored_score
from .noise_text import partial_edit
from .shards import expand_shards, shard_names
from .writer import StagedDir

logger = logging.getLogger(__name__)

# Neighbourhood batches (``neighbourhood_batches``): pairs a group, pairs searched per group.
NEIGHBOUR_GROUP = 8
NEIGHBOUR_WINDOW = 4096
NEAR_DUPLICATE_IMAGE = 0.95


@dataclass
class TrainingSet:
    """What fit keeps in memory: per sampled ok pair, cached features (float16) or decoded inputs."""

    statuses: Counter = field(default_factory=Counter)
    f_v: torch.Tensor | None = None  # frozen backbone: cached features, L2-normalised, float16
    f_t: torch.Tensor | None = None
    images: torch.Tensor | None = None  # trained backbone: decoded inputs
    tokens: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)  # for the edits of L_edit and the self-check
    # L_edit's negatives: per pair, whether its caption has a one-fact edit, and the edit's
    # features (frozen backbone) or tokens (trained backbone).
    has_edit: torch.Tensor | None = None
    edit_f: torch.Tensor | None = None
    edit_tokens: torch.Tensor | None = None
    unreadable_shards: dict[str, str] = field(default_factory=dict)  # unreadable shard -> why (ShardTally)

    def __len__(self) -> int:
        held = self.f_v if self.f_v is not None else self.images
        return 0 if held is None else len(held)

    def take(self, rows: np.ndarray) -> TrainingSet:
        """The pairs at ``rows``, in that order (statuses and skipped shards are the whole read's)."""
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TrainingSet(
            statuses=self.statuses,
            f_v=pick(self.f_v),
            f_t=pick(self.f_t),
            images=pick(self.images),
            tokens=pick(self.tokens),
            captions=[self.captions[i] for i in idx.tolist()],
            unreadable_shards=self.unreadable_shards,
        )


@dataclass
class FitResult:
    model_dir: Path
    model_id: str
    pairs_read: int
    pairs_used: int
    statuses: dict[str, int]
    history: list[dict]
    unreadable_shards: dict[str, str] = field(default_factory=dict)
    pairs_held_out: int = 0  # held out of training for the self-check
    retrained: bool = False  # trained again on every pair after the self-check (a backbone that trains)
    selfcheck: selfcheck.SelfCheck | None = None
    score_rule: str = ""  # what score is, in words (the line fit ends with)


class Reservoir:
    """A uniform random sample of at most ``k`` rows from a stream, in one pass (Vitter's Algorithm R).

    Rows are added in batches of aligned columns (features of both sides, or images and
    tokens, and the captions as a list); memory is ``k`` rows whatever the stream's length.
    The sample depends only on ``seed`` and the order of the rows.
    """

    def __init__(self, k: int, seed: int):
        self.k, self.seen = k, 0
        self.rng = np.random.default_rng(seed)
        self.columns: list[torch.Tensor | list] | None = None

    def add(self, *columns: torch.Tensor | list) -> None:
        n = len(columns[0])
        if self.columns is None:
            self.columns = [
                [] if isinstance(c, list) else torch.empty((min(self.k, 1 << 16), *c.shape[1:]), dtype=c.dtype)
                for c in columns
            ]
        filled = min(self.seen, self.k)
        take = min(n, self.k - filled)  # while not full, every row is kept
        if take:
            self._grow(filled + take)
            for store, c in zip(self.columns, columns, strict=True):
                if isinstance(store, list):
                    store.extend(c[:take])
                else:
                    store[filled : filled + take] = c[:take]
        if take < n:
            # Row t (0-based in the stream) replaces a random slot with probability k / (t + 1).
            t = self.seen + np.arange(take, n)
            slots = (self.rng.random(n - take) * (t + 1)).astype(np.int64)
            for row, slot in zip(np.flatnonzero(slots < self.k) + take, slots[slots < self.k], strict=True):
                for store, c in zip(self.columns, columns, strict=True):
                    store[slot] = c[row]
        self.seen += n

    def _grow(self, size: int) -> None:
        # Storage grows with the sample, so a small pool does not allocate k rows.
        for i, c in enumerate(self.columns):
            if not isinstance(c, list) and size > len(c):
                new = min(self.k, max(size, 2 * len(c)))
                self.columns[i] = torch.cat([c, c.new_empty((new - len(c), *c.shape[1:]))])

    def sample(self) -> list[torch.Tensor | list] | None:
        if self.columns is None:
            return None
        return [c[: min(self.seen, self.k)] for c in self.columns]


def load_training_set(
    urls: list[str],
    model: NcleanerModel,
    batch_size: int,
    progress: bool,
    *,
    on_bad_shard: str = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int = 0,
    store: EmbeddingStore | None = None,
) -> TrainingSet:
    """Read every shard once and keep a uniform sample of at most ``config.max_fit_pairs`` ok pairs:
    their features (frozen backbone; read from ``store`` where it has them) or their
    decoded inputs (trained backbone).

    A shard that ends early contributes no pair (all its samples count as
    ``truncated_shard``); an unreadable one stops the run, or with
    ``on_bad_shard="skip"`` is recorded in ``unreadable_shards`` and left out.
    """
    data = TrainingSet()
    max_fit_pairs = model.config.max_fit_pairs
    reservoir = Reservoir(max_fit_pairs, model.config.seed)
    bar = tqdm(desc="encoding" if not model.trains_backbone else "decoding", unit="pair", disable=not progress)
    tally = ShardTally(statuses=data.statuses, unreadable_shards=data.unreadable_shards)
    for answer, columns in _shards(urls, model, batch_size, workers, max_image_pixels, store, bar):
        if tally.count(answer, on_bad_shard=on_bad_shard, log=logger) and columns is not None and len(columns[0]):
            reservoir.add(*columns)
    bar.close()
    sample = reservoir.sample()
    if sample is not None:
        if model.trains_backbone:
            data.images, data.tokens, data.captions = sample
        else:
            data.f_v, data.f_t, data.captions = sample
    if reservoir.seen > max_fit_pairs:
        logger.info("training on a uniform sample of %d of the %d usable pairs", max_fit_pairs, reservoir.seen)
    return data


def _shards(urls, model: NcleanerModel, batch_size, workers, max_image_pixels, store, bar):
    """Per shard in order: (its answer for ``ShardTally.count``, the ok pairs' columns for the
    reservoir or None)."""
    if not model.trains_backbone:
        stream = model_features(
            model,
            urls,
            shard_names(urls),
            store=store,
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_image_pixels,
            progress=bar.update,
        )
        for shard in stream:
            # float16 halves the cache; fit from embeddings and fit from fresh features see the same values.
            captions = [c for c, ok in zip(shard.captions, shard.ok, strict=True) if ok]
            columns = (torch.from_numpy(shard.f_v).half(), torch.from_numpy(shard.f_t).half(), captions)
            if shard.error:
                yield {"shard": shard.url, "error": shard.error}, None
            else:
                yield {"shard": shard.url, "statuses": Counter(shard.statuses)}, columns
        return
    blocks = decode_blocks(
        urls,
        model.backbone.preprocess,
        model.tokenize,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_image_pixels,
    )
    for group in by_shard(blocks):
        last = group[-1]
        statuses = Counter(p.status for b in group for p in b.pairs)
        bar.update(sum(statuses.values()))
        if last.damage:
            # The cut may have taken members of any of its samples: train on none of them.
            yield {"shard": last.url, "statuses": {schema.TRUNCATED_SHARD: sum(statuses.values())}}, None
            continue
        inputs = [b for b in group if b.images is not None]
        columns = None
        if inputs:
            captions = [p.caption for b in inputs for p in b.pairs if p.status == schema.OK]
            columns = (torch.cat([b.images for b in inputs]), torch.cat([b.tokens for b in inputs]), captions)
        yield (
            ({"shard": last.url, "error": last.error} if last.error else {"shard": last.url, "statuses": statuses}),
            columns,
        )


def fit(
    shards: str | Iterable[str],
    out_dir: str | Path,
    config: DisNCLConfig | None = None,
    *,
    force: bool = False,
    on_bad_shard: str = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    embeddings: str | Path | None = None,
    embeddings_backbone: str | None = None,
    run: RunOptions = DEFAULT_RUN,
) -> FitResult:
    """Train a DisNCL model on ``shards`` and save it to ``out_dir``.

    Args:
        shards: SHARDS in any form ``expand_shards`` takes.
        out_dir: the model directory. It is written under a temporary name and
            swapped in when complete, so an interrupted fit leaves the previous model.
        config: the ``DisNCLConfig`` (defaults when None).
        force: replace an existing model directory (only the files ``fit`` writes).
        on_bad_shard: ``fail`` stops at an unreadable shard; ``skip`` leaves it out
            and lists it in ``FitResult.unreadable_shards``.
        max_image_pixels: larger images are not decoded (status ``too_large``).
        embeddings: an embeddings directory (``ncleaner.embeddings``, frozen backbone only):
            shards it holds are read from it, the others encoded and added to it, so that
            a later ``score`` with the same directory encodes nothing again.
        embeddings_backbone: the backbone that wrote ``embeddings`` when it has no
            ``embeddings.json`` (clip-retrieval's own output).
        run: where and how it runs (``RunOptions``; the per-epoch lines go to this module's
            logger, at INFO, whatever its ``progress``). On Ray the shards ``embeddings`` lacks are
            encoded on the cluster, then the heads train here from the embeddings, on a sample of
            at most ``config.max_fit_pairs`` pairs: it needs ``embeddings`` and a frozen
            pretrained backbone, since the embeddings are what the cluster produces.
    """
    config = config or DisNCLConfig()
    try:
        config.validate()
    except ValueError as exc:
        raise NcleanerError(f"invalid configuration: {exc}") from exc
    check_on_bad_shard(on_bad_shard)
    run.check()
    if run.on_ray:
        if config.resolved_train_backbone() != "none":
            raise NcleanerError(
                "fit --engine ray: the cluster computes a frozen pretrained backbone's embeddings, but this "
                f"model trains its backbone ({config.backbone} without --pretrained, or --train-backbone all)"
            )
        if embeddings is None:
            raise NcleanerError(
                "fit --engine ray needs --embeddings DIR on storage every node reaches: the cluster writes "
                "the pool's features there and the heads train from them here"
            )
    urls = expand_shards(shards)
    with StagedDir(out_dir, force=force, owned=lambda _: set(FIT_FILES)) as stage:
        reading = {
            "on_bad_shard": on_bad_shard,
            "max_image_pixels": max_image_pixels,
            "embeddings": embeddings,
            "embeddings_backbone": embeddings_backbone,
        }
        result = _fit(urls, stage.path, config, reading, run)
        result.model_dir = stage.commit()
    return result


def _fit(urls, out: Path, config, reading: dict, run: RunOptions) -> FitResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    progress = run.progress
    device = resolve_device(run.device)
    model = NcleanerModel.create(config, device)
    config = model.config  # with the backbone's embed_dim
    store = None
    if reading["embeddings"] is not None:
        store = open_for_model(
            reading["embeddings"], config, create=True, assume_backbone=reading["embeddings_backbone"]
        )
    if run.on_ray:
        _embed_on_ray(urls, store, config, reading["max_image_pixels"], run)
    data = load_training_set(
        urls,
        model,
        config.batch_size,
        progress,
        on_bad_shard=reading["on_bad_shard"],
        max_image_pixels=reading["max_image_pixels"],
        workers=run.decode_workers(len(urls)),
        store=store,
    )
    if len(data) < 4:
        raise NcleanerError(
            f"{urls[0]}{' ...' if len(urls) > 1 else ''}: only {len(data)} usable pairs; need at least 4"
        )
    # The self-check's slice never trains: heads that saw its clean pairs would flatter themselves.
    # Its own generator, so that the training's random choices do not depend on whether it is on.
    check_rng = np.random.default_rng([config.seed, 17])
    order = check_rng.permutation(len(data))
    held = selfcheck.slice_size(len(data), config)
    everything = data
    check_set = data.take(np.sort(order[:held])) if held else None
    if held:
        data = data.take(np.sort(order[held:]))
        logger.info("self-check: %d pairs held out of training", held)
    bad = {k: v for k, v in data.statuses.items() if k != schema.OK}
    if bad:
        logger.info("not used for training: %s", ", ".join(f"{v} {k}" for k, v in sorted(bad.items())))
    history = _train(model, data, config, rng, progress)
    check = _finalise(model, data, check_set, config, rng, check_rng)
    if check_set is not None and model.trains_backbone:
        # A backbone trained on the pool scores the pairs it trained on above those it never saw,
        # so the held-out slice would look noisy in the report (sample_data: clip_sim's AUROC
        # 0.87 against 0.94 without the slice). The self-check chose the rule; the model that
        # scores is then trained again, from the same seed, on every pair.
        logger.info("self-check done: training again on all %d pairs", len(everything))
        rule = (model.calibration.term, model.calibration.weight)
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        model = NcleanerModel.create(config, device)
        data = everything
        history = _train(model, data, config, rng, progress)
        _finalise(model, data, None, config, rng, check_rng, rule=rule)
    mid = model.save(out)
    if check is not None:
        (out / SELFCHECK_FILE).write_text(json.dumps(check.to_dict(), indent=1) + "\n")
    return FitResult(
        model_dir=out,
        model_id=mid,
        pairs_read=sum(data.statuses.values()),
        pairs_used=len(data),
        statuses=dict(data.statuses),
        history=history,
        unreadable_shards=data.unreadable_shards,
        pairs_held_out=0 if check_set is None else len(check_set),
        retrained=data is everything and check_set is not None,
        selfcheck=check,
        score_rule=_score_rule(model.calibration, check),
    )


def _train(model: NcleanerModel, data: TrainingSet, config: DisNCLConfig, rng: np.random.Generator, progress) -> list:
    """The epochs of docs/design.md section 2.7 on ``data``; returns each epoch's statistics."""
    device = model.bank_v.device
    n = len(data)
    if config.lambda_edit > 0:
        _add_edit_negatives(model, data, config.batch_size, np.random.default_rng([config.seed, 23]))
    critics = DisNCLCritics(config.embed_dim, config.mei_dim, config.hidden_dim).to(device)
    params = [{"params": model.heads.parameters(), "lr": config.lr}]
    if model.trains_backbone:
        params.append({"params": model.clip.parameters(), "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=config.weight_decay)
    critic_optimizer = torch.optim.AdamW(critics.parameters(), lr=config.critic_lr)
    schedule = one_cycle(
        optimizer, [g["lr"] for g in params], config.epochs * max(1, n // config.batch_size), config.epochs
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
        terms = ", ".join(f"{k} {stats[k]:.4f}" for k in ("align", "dis", "reg", "edit") if k in stats)
        logger.info(
            "epoch %d/%d: loss %.4f (%s), pairs weighted as noisy %.1f%%",
            epoch + 1, config.epochs, stats["loss"], terms, 100 * stats["flagged"],
        )  # fmt: skip

    return history


def _embed_on_ray(
    urls: list[str], store: EmbeddingStore, config: DisNCLConfig, max_pixels: int, run: RunOptions
) -> None:
    """The part of ``fit`` that needs a cluster: encode the shards the embeddings lack, on Ray.

    What follows reads every shard's features from the store, here: the heads train on a
    sample of at most ``max_fit_pairs`` of them, which one machine holds.
    """
    pending = store.to_embed(urls, shard_names(urls), max_pixels=max_pixels)
    todo = [(url, name) for url, name, _ in pending]
    if not todo:
        return
    # An unreadable shard gets no part: the pass that follows meets it again, and stops at it
    # or records it as skipped, as the local engine does.
    embed_on_ray(
        todo,
        store,
        backbone=config.backbone,
        pretrained=config.pretrained,
        precision=config.precision,
        batch_size=config.batch_size,
        max_image_pixels=max_pixels,
        allow_download=True,  # as fit does here: it builds the backbone the config names
        run=run,
    )


def _add_edit_negatives(model: NcleanerModel, data: TrainingSet, batch_size: int, rng: np.random.Generator) -> None:
    """One-fact edits of the training captions for L_edit, from the training vocabulary, which
    neither half of the self-check uses; a frozen text tower encodes them once, here."""
    vocabulary = (selfcheck.TRAINING_VOCABULARY, selfcheck.VOCABULARY_PARTS)
    edits = [partial_edit(c, rng, vocabulary=vocabulary) for c in data.captions]
    data.has_edit = torch.tensor([e is not None for e in edits], dtype=torch.bool)
    texts = [e if e is not None else "" for e in edits]
    if model.trains_backbone:
        data.edit_tokens = model.tokenize(texts)
        return
    encoder = model.encoder()
    data.edit_f = torch.cat(
        [encoder.text(model.tokenize(texts[i : i + batch_size])).cpu().half() for i in range(0, len(texts), batch_size)]
    )
    logger.info("L_edit: one-fact edits of %d of %d training captions", int(data.has_edit.sum()), len(texts))


def _features(model: NcleanerModel, data: TrainingSet, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = model.bank_v.device
    if data.f_v is not None:
        return data.f_v[idx].to(device).float(), data.f_t[idx].to(device).float()
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
        # The values score will see: a trained backbone's features go through the encode stage's rounding.
        v_s, t_s = model.heads.mii(*(canonical(f) for f in _features(model, data, idx)))
        out_v.append(v_s.cpu())
        out_t.append(t_s.cpu())
    return torch.cat(out_v), torch.cat(out_t)


def one_cycle(optimizer, max_lr: list[float], steps: int, epochs: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR warming up over the first epoch (at most 30 % of the steps).

    OneCycleLR divides by the length of each phase, and a phase shorter than one step
    is zero long: with one batch per epoch (a pool under two batches) the first epoch is
    one step and the schedule raised ZeroDivisionError. Each phase is kept at least
    half a step long, which leaves every schedule of more than a few steps as it was.
    """
    total = max(2, steps)
    pct = min(max(min(0.3, 1.0 / epochs), 1.5 / total), (total - 0.5) / total)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=pct)


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


def neighbourhood_batches(
    f_v: torch.Tensor, f_t: torch.Tensor, batch_size: int, share: float, rng: np.random.Generator
) -> list[torch.Tensor]:
    """``epoch_batches`` in which ``share`` of each batch is groups of near neighbours.

    Random in-batch negatives are almost never near misses, so the alignment loss never
    asks the heads to keep what tells two similar pairs apart. Here each batch holds
    groups of ``NEIGHBOUR_GROUP`` pairs: an anchor and the free pairs closest to it by
    caption (even groups) or by image (odd groups), searched in a window of the epoch's
    random order (``NEIGHBOUR_WINDOW`` pairs: cost window x width per group, so any pool
    size works without an index). Pairs whose image is a near duplicate of the anchor's
    are left for other batches, since their captions may well describe it. The rest of
    each batch is random. Every pair is used exactly once per epoch, and the batch count
    is ``epoch_batches``'s.
    """
    n = len(f_t)
    sizes = [len(b) for b in epoch_batches(n, batch_size, rng)]
    order = rng.permutation(n)
    free = np.ones(n, dtype=bool)
    cursor = 0
    batches = []
    for size in sizes:
        grouped = int(share * size) // NEIGHBOUR_GROUP * NEIGHBOUR_GROUP
        batch: list[int] = []
        for g in range(grouped // NEIGHBOUR_GROUP):
            while cursor < n and not free[order[cursor]]:
                cursor += 1
            if cursor >= n:
                break
            window = order[cursor : cursor + NEIGHBOUR_WINDOW]
            window = window[free[window]]
            anchor = window[0]
            feats = f_t if g % 2 == 0 else f_v
            sim = (feats[window].float() @ feats[anchor].float()).numpy()
            duplicate = (f_v[window].float() @ f_v[anchor].float()).numpy() > NEAR_DUPLICATE_IMAGE
            duplicate[0] = False
            ranked = window[np.argsort(-np.where(duplicate, -np.inf, sim), kind="stable")]
            group = ranked[: min(NEIGHBOUR_GROUP, int((~duplicate).sum()))]
            free[group] = False
            batch.extend(group.tolist())
        while len(batch) < size:
            while not free[order[cursor]]:
                cursor += 1
            free[order[cursor]] = False
            batch.append(int(order[cursor]))
        batches.append(torch.tensor(batch))
    return batches


def _train_epoch(model, critics, data, weights, optimizer, critic_optimizer, schedule, rng, epoch, progress):
    config = model.config
    model.train()
    if not model.trains_backbone:
        model.clip.eval()
    if config.hard_batch_share > 0 and data.f_v is not None:
        batches = neighbourhood_batches(data.f_v, data.f_t, config.batch_size, config.hard_batch_share, rng)
    else:
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
        if config.lambda_edit > 0 and data.has_edit is not None and data.has_edit[idx].any():
            edit = _edit_loss(model, data, idx, split, w)
            loss = loss + config.lambda_edit * edit
            parts["edit"] = edit.item()
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


def _edit_loss(model: NcleanerModel, data: TrainingSet, idx: torch.Tensor, split, w: torch.Tensor) -> torch.Tensor:
    """L_edit on the batch's pairs that have an edited caption."""
    device = model.bank_v.device
    has = data.has_edit[idx]
    rows = idx[has]
    if data.edit_f is not None:
        e_f = data.edit_f[rows].to(device).float()
    else:
        e_f = model.backbone.encode_text(data.edit_tokens[rows].to(device))
    e_s = torch.nn.functional.normalize(model.heads.mii_text(torch.nn.functional.normalize(e_f, dim=-1)), dim=-1)
    mask = has.to(device)
    return losses.edit_negative_loss(split.v_s[mask], split.t_s[mask], e_s, w[mask], model.config.tau)


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


def _finalise(
    model: NcleanerModel,
    data: TrainingSet,
    check_set: TrainingSet | None,
    config: DisNCLConfig,
    rng: np.random.Generator,
    check_rng: np.random.Generator,
    *,
    rule: tuple[str, float] | None = None,
) -> selfcheck.SelfCheck | None:
    """Sample the reference bank from pairs judged clean, put every term on the training pairs'
    quantiles, let the self-check choose score's term and weight (Eq. S1) unless ``rule`` gives
    them, and fit clean_prob's mixture to the training pairs' score. Returns the self-check, or
    None where none ran."""
    v_s, t_s = _all_mii(model, data, config.batch_size)
    mii = losses.mii_similarity(v_s, t_s).numpy()
    clean = TwoComponentMixture.fit(mii, seed=config.seed).clean_posterior(mii) >= 0.5
    pool = np.flatnonzero(clean) if clean.sum() >= 2 else np.argsort(-mii)[: max(2, len(mii) // 2)]
    chosen = np.sort(rng.choice(pool, size=min(config.bank_size, len(pool)), replace=False))
    device = model.bank_v.device
    model.bank_v = v_s[chosen].to(device)
    model.bank_t = t_s[chosen].to(device)
    model.bank_fv, model.bank_ft = _encoded(model, data, chosen)
    del v_s, t_s
    # negclip's temperature is the backbone's own (its contrastive logit scale), as in Wang et al.
    scale = getattr(model.clip, "logit_scale", None)
    tau = float(np.clip(1.0 / float(scale.detach().exp()), 0.01, 1.0)) if scale is not None else config.tau
    # Provisional: the terms need the bank and negclip's temperature, not the choice made below.
    model.calibration = Calibration("clip_sim", 0.0, {}, tau, TwoComponentMixture.fit(mii[:0]))
    terms = _training_terms(model, data, config.batch_size * 8)
    quantiles = Calibration.quantiles_of(terms, config.calibration_points)

    check = None
    if check_set is not None:
        partner_rows = np.sort(check_rng.permutation(len(data))[: selfcheck.PARTNER_POOL])
        check = selfcheck.run(
            model,
            (*_encoded(model, check_set, np.arange(len(check_set))), check_set.captions),
            (*_encoded(model, data, partner_rows), [data.captions[i] for i in partner_rows]),
            terms,
            quantiles,
            config,
            check_rng,
        )
    if rule is not None:
        term, weight = rule
    elif check is not None:
        term, weight = check.term, check.weight
    elif config.score_term != "auto" and config.score_weight is not None:
        term, weight = config.score_term, config.score_weight
    else:
        term, weight = "clip_sim", 0.0
        if check_set is not None:
            logger.warning("self-check: too few held-out pairs judged clean to test a correction; score is clip_sim")
    score = anchored_score(terms, term, weight, quantiles)
    model.calibration = Calibration(term, weight, quantiles, tau, TwoComponentMixture.fit(score, seed=config.seed))
    model.eval()
    return check


def _encoded(model: NcleanerModel, data: TrainingSet, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone features of the pairs at ``rows``, as score will see them (canonical, float32)."""
    device = model.bank_v.device
    if data.f_v is not None:
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return data.f_v[idx].to(device).float(), data.f_t[idx].to(device).float()
    encoder = model.encoder()
    parts = [
        encoder(data.images[torch.from_numpy(chunk)], data.tokens[torch.from_numpy(chunk)])
        for chunk in np.array_split(np.asarray(rows, dtype=np.int64), max(1, -(-len(rows) // 256)))
        if len(chunk)
    ]
    if not parts:
        dim = model.config.embed_dim
        return torch.zeros(0, dim, device=device), torch.zeros(0, dim, device=device)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _training_terms(model: NcleanerModel, data: TrainingSet, chunk: int) -> dict[str, np.ndarray]:
    """Every term of Eq. S1 for every training pair, computed a chunk at a time."""
    starts = range(0, len(data), chunk)
    parts = [model.terms(*_encoded(model, data, np.arange(i, min(i + chunk, len(data))))) for i in starts]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _score_rule(calibration: Calibration, check: selfcheck.SelfCheck | None) -> str:
    if calibration.weight == 0 or calibration.term == "clip_sim":
        rule = "score is clip_sim (the backbone's own cosine)"
    else:
        rule = f"score = clip_sim + {calibration.weight:g} x ({calibration.term} - clip_sim), on clip_sim's scale"
    return rule if check is None else check.summary()
