"""``inspect``: one self-contained HTML page showing what a rule keeps and rejects (docs/design.md section 11).

The page is built from the report and the shards alone: nothing is fetched when it is
opened (no CDN, no web font; a Content-Security-Policy forbids any request), so it opens
from disk in any browser and can be mailed around. The rule is resolved and every row
routed by the very functions ``filter`` uses (``make_rule``, ``route``), so the counts on
the page are the counts ``filter`` would write.

A caption is data, never markup: the page is rendered by jinja2 with autoescaping on, the
page's script only ever sets ``textContent``, and the policy allows no script but the
page's own (by hash), so a caption holding ``<script>`` shows as text.

Images are read from the shards only for the pairs shown, each shard once and only up to
its last shown sample, and shrunk to JPEG thumbnails of at most ``thumb_px`` pixels a side;
the number of cards is bounded by ``per_gallery``, so the page size does not grow with the pool.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import shlex
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import __version__, schema
from .config import DEFAULT_MAX_IMAGE_PIXELS
from .dedup import load_groups
from .errors import NcleanerError, UnreadableShard, first_line, printable
from .rules import (
    KEPT,
    WHERE_HOLDS,
    ScoredSamples,
    describe,
    is_kept,
    load_shard_reports,
    make_rule,
    part_paths,
    route,
    route_rows,
)
from .schema import SCORE_COLUMNS, STATUSES, Rule
from .shards import RawSample, expand_shards, image_member, read_shard
from .writer import atomic_write, remove_stale_partials

logger = logging.getLogger(__name__)

GENERATOR = f"ncleaner inspect {__version__}"
DEFAULT_PER_GALLERY = 24
MAX_PER_GALLERY = 500
DEFAULT_THUMB_PX = 160
MAX_THUMB_PX = 512
HISTOGRAM_BINS = 40
CURVE_POINTS = 200
# How much of an existing --out is read to recognise a page this command wrote.
_SNIFF_BYTES = 4096
# Longest caption a card shows in full: one huge caption (1 MB was seen) must not make the page huge.
MAX_CAPTION_CHARS = 1000

GALLERIES = (
    ("lowest", "Lowest-scoring pairs", "The scored pairs with the lowest {column}, lowest first."),
    ("below", "Just below the cut", "Rejected by the rule: the highest {column} under the threshold, closest first."),
    ("above", "Just above the cut", "Kept by the rule: the lowest {column} at or over the threshold, closest first."),
    ("kept", "Random sample of kept pairs", "Drawn at random (seed {seed}) from every pair the rule keeps."),
    ("not_ok", "Not scored", "Samples with a non-ok status, always rejected; each status is represented."),
)
# With --dedup, a sixth gallery; and the columns of the dedup parts it reads.
DUPLICATES_GALLERY = (
    "duplicates",
    "Duplicate groups",
    "Each group's representative, then the samples that repeat it (rejected as duplicate), side by side.",
)
DEDUP_COLUMNS = ["dup_group", "duplicate_of", "dup_kind", "dup_similarity"]


@dataclass
class InspectResult:
    """What ``inspect_report`` wrote: the page, its size, and the counts it shows."""

    out: Path
    size_bytes: int
    pool: int
    kept: int
    rejected: int
    rule: Rule
    cards: dict[str, int] = field(default_factory=dict)
    thumbnails: int = 0
    truth: dict | None = None
    unreadable_shards: dict[str, str] = field(default_factory=dict)


def inspect_report(
    shards: str | Iterable[str],
    report_dir: str | Path,
    out: str | Path,
    *,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    auto: bool = False,
    column: str = "score",
    where: str | None = None,
    per_gallery: int = DEFAULT_PER_GALLERY,
    truth_field: str | None = None,
    truth_file: str | Path | None = None,
    model_dir: str | Path | None = None,
    seed: int = 0,
    thumb_px: int = DEFAULT_THUMB_PX,
    dedup: str | Path | None = None,
    on_bad_shard: str = "fail",
) -> InspectResult:
    """Write one self-contained HTML page showing what a rule keeps and rejects in a scored pool.

    Args:
        shards: the SHARDS that were scored (any form ``expand_shards`` takes).
        report_dir: the report ``score`` wrote for them.
        out: the HTML file to write. An existing file is replaced only when this command wrote it.
        threshold, keep_fraction, auto: the rule, as for ``filter_shards``; with none given the
            model's own split (``auto``) is shown.
        column: the score column ``threshold`` and ``keep_fraction`` apply to.
        where: a SQL predicate over the report's columns a kept row must also meet, as for
            ``filter_shards``.
        per_gallery: cards per gallery (1 to 500); five galleries bound the page's size.
        truth_field: a report column (kept with ``score --keep-json-fields``) true for noisy
            pairs: cards are marked and the header gives the rule's precision and noise removed.
        truth_file: instead, a Parquet with ``key`` and ``noisy`` columns (``inject-noise``'s
            ``noise_truth.parquet``).
        model_dir: the model that scored the report, to show its backbone; it must be the
            model whose id the report carries.
        seed: seed of the random sample of kept pairs.
        thumb_px: largest side of a thumbnail, in pixels (16 to 512).
        dedup: a directory ``ncleaner dedup`` wrote for these shards: its duplicates are rejected
            as ``filter --dedup`` rejects them, and a sixth gallery shows groups side by side,
            each representative followed by the samples that repeat it.
        on_bad_shard: ``skip`` leaves out shards ``score --on-bad-shard skip`` could not read;
            ``fail`` (default) stops at them, as ``filter`` does.
    """
    if not 1 <= per_gallery <= MAX_PER_GALLERY:
        raise NcleanerError(f"--per-gallery {per_gallery}: must be between 1 and {MAX_PER_GALLERY}")
    if not 16 <= thumb_px <= MAX_THUMB_PX:
        raise NcleanerError(f"--thumb-px {thumb_px}: must be between 16 and {MAX_THUMB_PX}")
    if truth_field is not None and truth_file is not None:
        raise NcleanerError("give at most one of --truth-field and --truth")
    out = Path(out)
    _check_out(out)
    urls = expand_shards(shards)
    # The page shows a few hundred cards of a pool of any size: the pool is held as the columns the
    # rule, the truth and the charts need; the shown cards' captions are read from their parts.
    columns = [
        *SCORE_COLUMNS,
        *(["shard"] if truth_file else []),  # a truth file tells repeated keys apart by shard
        *([truth_field] if truth_field else []),
        *(["image_sha1"] if dedup else []),
    ]
    reports, skipped = load_shard_reports(
        Path(report_dir), urls, on_bad_shard=on_bad_shard, columns=columns, where=where
    )
    if threshold is None and keep_fraction is None and not auto:
        auto = True
    rule = make_rule(list(reports.values()), threshold=threshold, keep_fraction=keep_fraction, auto=auto, column=column)
    groups = load_groups(dedup, reports, DEDUP_COLUMNS) if dedup is not None else None
    pool = _pool(reports, rule, groups)
    if pool.empty:
        raise NcleanerError(f"{report_dir}: the report holds no rows for these shards")
    noisy = _truth(pool, truth_field, truth_file)
    model = _model_info(pool, model_dir)

    kept = pool["_ncl_outcome"].map(is_kept).to_numpy(dtype=bool)
    truth = None
    if noisy is not None:
        from .evaluate import kept_set_metrics  # scikit-learn and torch: loaded only for ground truth

        pool["_ncl_noisy"] = noisy
        truth = {
            "field": truth_field or str(truth_file),
            "noisy": int(noisy.sum()),
            **kept_set_metrics(kept, noisy),
        }
    chosen = _galleries(pool, rule, per_gallery, seed)
    galleries = list(GALLERIES)
    if groups is not None:
        chosen["duplicates"] = _group_rows(pool, per_gallery)
        galleries.append(DUPLICATES_GALLERY)
    parts = part_paths(Path(report_dir), reports)
    thumbs, captions = _shown(pool, parts, sorted({i for rows in chosen.values() for i in rows}), thumb_px)

    # --auto's column, clean_prob, is nearly 0 or 1: the charts and the slider show the continuous
    # score it is a posterior of, with the cut where the rule's kept set begins on it.
    shown = "score" if rule.mode == "auto" and "score" in pool.columns else rule.column
    cut = rule.threshold if shown == rule.column else _cut_on(pool, shown)
    ok = (pool["status"] == schema.OK).to_numpy()
    values = pool[shown].to_numpy(dtype=np.float64)
    finite = ok & np.isfinite(values)
    noisy_total = int(noisy.sum()) if noisy is not None else 0
    charts = _charts(values[finite], cut, noisy[finite] if noisy is not None else None, noisy_total)
    if charts is not None:
        charts["slider"] = _slider(
            pool, shown, cut, noisy, noisy_total, command=_command(shards, report_dir, shown, where, dedup)
        )
    key_counts = pool["key"].value_counts()
    shown_rule = describe(rule, where)
    context = {
        "generator": GENERATOR,
        "title": f"ncleaner inspect: {shown_rule}",
        "pool": len(pool),
        "shards": len(reports),
        "skipped": skipped,
        "statuses": _status_rows(pool),
        "model": model,
        "rule": shown_rule,
        "rule_column": shown,
        "kept": int(kept.sum()),
        "rejected": int((~kept).sum()),
        "rejected_by_reason": pool.loc[~kept, "_ncl_outcome"].value_counts().sort_index().to_dict(),
        "truth": truth,
        "charts": charts,
        "columns": [c for c in SCORE_COLUMNS if c in pool.columns],
        "galleries": [
            {
                "id": gid,
                "title": title,
                "about": about.format(column=rule.column, seed=seed),
                "cards": [_card(pool, i, thumbs, captions, key_counts, rule) for i in chosen[gid]],
            }
            for gid, title, about in galleries
        ],
        "thumbs": [{"cls": cls, "uri": uri} for cls, uri in sorted(thumbs.values())],
        "per_gallery": per_gallery,
    }
    html = _render(context)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(html.encode("utf-8")))
    return InspectResult(
        out=out,
        size_bytes=out.stat().st_size,
        pool=len(pool),
        kept=context["kept"],
        rejected=context["rejected"],
        rule=rule,
        cards={g["id"]: len(g["cards"]) for g in context["galleries"]},
        thumbnails=len(thumbs),
        truth=truth,
        unreadable_shards=skipped,
    )


def _check_out(out: Path) -> None:
    """Refuse to replace a file this command did not write: --out is often typed next to data."""
    if out.is_dir():
        raise NcleanerError(f"{out}: is a directory; --out names the HTML file to write")
    if not out.parent.is_dir():
        raise NcleanerError(f"{out}: no such directory {out.parent}")
    # Found unwritable now, not after the work; and what a killed run of this page left is removed.
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise NcleanerError(f"--out {out}: cannot write in {out.parent}: {exc.strerror or first_line(exc)}") from exc
    remove_stale_partials(out.parent, of=out.name)
    if not out.exists():
        return
    try:
        with out.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise NcleanerError(f"{out}: cannot read the existing file: {exc.strerror or first_line(exc)}") from exc
    if b'<meta name="generator" content="ncleaner inspect' not in head:
        raise NcleanerError(f"{out}: exists and was not written by ncleaner inspect; refusing to replace it")


def _pool(reports: dict[str, pd.DataFrame], rule: Rule, groups: dict | None = None) -> pd.DataFrame:
    """Every report row in shard order, with its shard URL and what ``route`` (filter's router) makes
    of it; with ``groups`` (``dedup.load_groups``), its duplicate group's columns as ``_ncl_<column>``,
    and its duplicates rejected as ``filter --dedup`` rejects them."""
    parts = []
    for url, report in reports.items():
        part = report.assign(_ncl_shard=url)
        repeats = frozenset()
        if groups is not None:
            for column in DEDUP_COLUMNS:
                part[f"_ncl_{column}"] = groups[url].column(column).to_pylist()
            repeats = frozenset(np.flatnonzero(part["_ncl_duplicate_of"].notna().to_numpy()).tolist())
        part["_ncl_outcome"] = route(report, rule, duplicate_rows=repeats)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["key", "status", "_ncl_outcome", rule.column])
    pool = pd.concat(parts, ignore_index=True)
    return pool.astype({"_ncl_shard": "category"})


def _truth(pool: pd.DataFrame, field: str | None, path: str | Path | None) -> np.ndarray | None:
    if field is None and path is None:
        return None
    from . import evaluate  # scikit-learn and torch: loaded only for ground truth

    return evaluate.truth_from_file(pool, path) if path is not None else evaluate.truth_from_report(pool, field)


def _model_info(pool: pd.DataFrame, model_dir: str | Path | None) -> dict:
    ids = sorted(pool["model_id"].dropna().unique().tolist())
    info = {"id": ids[0] if ids else None, "backbone": None, "pretrained": None}
    if model_dir is None:
        return info
    d = Path(model_dir)
    from .model import CONFIG_FILE, MODEL_FILES, model_id

    missing = [f for f in MODEL_FILES if not (d / f).is_file()]
    if missing:
        raise NcleanerError(f"{d}: not a model directory (no {', '.join(missing)})")
    if info["id"] is not None and model_id(d) != info["id"]:
        raise NcleanerError(f"{d}: model {model_id(d)} did not score this report (its rows say {info['id']})")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise NcleanerError(f"{d / CONFIG_FILE}: cannot read the model's config: {first_line(exc)}") from exc
    info["backbone"] = config.get("backbone") if isinstance(config, dict) else None
    info["pretrained"] = config.get("pretrained") if isinstance(config, dict) else None
    return info


def _status_rows(pool: pd.DataFrame) -> list[dict]:
    counts = pool["status"].value_counts()
    order = [s for s in STATUSES if s in counts] + sorted(s for s in counts.index if s not in STATUSES)
    return [{"status": s, "count": int(counts[s]), "why": STATUSES.get(s, "")} for s in order]


def _galleries(pool: pd.DataFrame, rule: Rule, n: int, seed: int) -> dict[str, list[int]]:
    """Row positions of ``pool`` shown in each gallery, in display order."""
    values = pool[rule.column].to_numpy(dtype=np.float64)
    ok = (pool["status"] == schema.OK).to_numpy() & np.isfinite(values)
    scored = np.flatnonzero(ok)
    ascending = scored[np.argsort(values[scored], kind="stable")]
    below = ascending[values[ascending] < rule.threshold]
    above = ascending[values[ascending] >= rule.threshold]
    kept = np.flatnonzero(pool["_ncl_outcome"].map(is_kept).to_numpy(dtype=bool))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(kept, size=min(n, len(kept)), replace=False)) if len(kept) else kept
    return {
        "lowest": ascending[:n].tolist(),
        "below": below[::-1][:n].tolist(),
        "above": above[:n].tolist(),
        "kept": sample.tolist(),
        "not_ok": _round_robin(pool, n),
    }


def _group_rows(pool: pd.DataFrame, n: int) -> list[int]:
    """Up to ``n`` rows of whole duplicate groups, the first groups first: each representative
    followed by the samples that repeat it (a group larger than what is left is cut)."""
    grouped = pool["_ncl_dup_group"].notna().to_numpy()
    rows = np.flatnonzero(grouped)
    order = rows[
        np.lexsort((pool["_ncl_duplicate_of"].notna().to_numpy()[rows], pool["_ncl_dup_group"].to_numpy()[rows]))
    ]
    return order[:n].tolist()


def _round_robin(pool: pd.DataFrame, n: int) -> list[int]:
    """Up to ``n`` non-ok rows taking each status in turn, so that a rare status is not crowded out."""
    by_status = {
        s: np.flatnonzero((pool["status"] == s).to_numpy()).tolist()
        for s in sorted(set(pool["status"].tolist()) - {schema.OK})
    }
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(rows) for rows in by_status.values()):
        out.extend(rows[depth] for rows in by_status.values() if depth < len(rows))
        depth += 1
    return sorted(out[:n])


def _shown(pool: pd.DataFrame, parts: dict[str, str], rows: list[int], px: int) -> tuple[dict, dict]:
    """For the shown rows: row position -> (CSS class, JPEG data URI) where the image can be shown,
    and row position -> caption (read from the shard's report part, ``rules.route_rows``).

    Each shard is read once, up to its last shown sample; a sample is checked against its row
    (position, key, caption, image hash) as ``filter`` checks it.
    """
    wanted: dict[str, dict[int, int]] = {}
    for i in rows:
        wanted.setdefault(pool["_ncl_shard"].iat[i], {})[int(pool["index"].iat[i])] = i
    thumbs: dict[int, tuple[str, str]] = {}
    captions: dict[int, str | None] = {}
    for url, by_index in wanted.items():
        last = max(by_index)
        part = route_rows(parts[url])
        for index, i in by_index.items():
            captions[i] = part["caption"].iat[index]
        scored = ScoredSamples(url, part)
        try:
            for raw in read_shard(url):
                i = by_index.get(raw.index)
                if i is not None:
                    scored.check(raw.index, raw)
                    uri = _thumbnail(raw, pool["status"].iat[i], px)
                    if uri is not None:
                        thumbs[i] = (f"t{len(thumbs)}", uri)
                if raw.index >= last:
                    break
        except UnreadableShard as exc:
            logger.warning("%s; its cards are shown without images", exc)
    return thumbs, captions


def _thumbnail(raw: RawSample, status: str, px: int) -> str | None:
    """A JPEG data URI of the sample's image (the member ``score`` decodes), or None when there is none
    or it cannot be decoded safely."""
    if status == schema.TOO_LARGE:
        return None  # a decompression bomb is not decoded here either
    data = image_member(raw)
    if data is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > DEFAULT_MAX_IMAGE_PIXELS:
                    return None
                img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale, far cheaper for big images
                small = img.convert("RGB")
                small.thumbnail((px, px))
                buf = io.BytesIO()
                small.save(buf, format="JPEG", quality=80, optimize=True)
    except Exception:  # PIL raises many types for corrupt or truncated files
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(pool: pd.DataFrame, i: int, thumbs: dict, captions: dict, key_counts: pd.Series, rule: Rule) -> dict:
    row = pool.iloc[i]
    key, url = str(row["key"]), str(row["_ncl_shard"])
    status, outcome = str(row["status"]), str(row["_ncl_outcome"])
    scores = []
    for c in SCORE_COLUMNS:
        v = row.get(c)
        v = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        scores.append({"column": c, "value": v, "text": "-" if v is None else f"{v:.4f}", "rule": c == rule.column})
    caption = captions.get(i)
    return {
        "row": i,
        "key": key,
        "shard": url,
        "shard_name": os.path.basename(url) or url,
        # A key found in several shards of the pool is copied with its shard, so that an
        # override names this sample and no other.
        "copy_text": key if key_counts.get(key, 0) <= 1 else f"{url}\t{key}",
        "caption": _shown_caption(caption),
        "status": status,
        "why": STATUSES.get(status, ""),
        "kept": is_kept(outcome),
        "outcome": "kept" if outcome == KEPT else outcome,
        "scores": scores,
        "noisy": bool(row["_ncl_noisy"]) if "_ncl_noisy" in pool.columns else None,
        "dup": _dup_note(row) if "_ncl_dup_group" in pool.columns else None,
        "thumb": thumbs[i][0] if i in thumbs else None,
    }


def _dup_note(row) -> str | None:
    """How the card's sample stands in its duplicate group, or None when it has no duplicate."""
    group = row["_ncl_dup_group"]
    if group is None or (isinstance(group, float) and math.isnan(group)):
        return None
    of = row["_ncl_duplicate_of"]
    if of is None:
        return f"group {int(group)}: the one kept"
    similarity = row["_ncl_dup_similarity"]
    return f"group {int(group)}: {row['_ncl_dup_kind']} duplicate of {of['key']} ({similarity:.3f})"


def _shown_caption(caption) -> str | None:
    """A caption as its card shows it: control characters escaped (``\\n``, ``\\x1b``), so that it
    stays one block of text, and cut at ``MAX_CAPTION_CHARS`` with the count of what was left out."""
    if not isinstance(caption, str):
        return None  # none, or NaN as pandas reads a null
    text = printable(caption)
    if len(text) <= MAX_CAPTION_CHARS:
        return text
    return f"{text[:MAX_CAPTION_CHARS]}… ({len(text) - MAX_CAPTION_CHARS:,} more characters)"


# -- charts: inline SVG geometry computed here, drawn by the template ---------------------------

_W, _H = 640, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 26, 40


def _charts(values: np.ndarray, cut: float, noisy: np.ndarray | None, noisy_total: int) -> dict | None:
    """Histogram of ``values`` (stacked clean / noisy with truth) and kept share against the threshold.

    ``noisy`` holds the truth of each value; ``noisy_total`` counts noisy pairs of the whole
    pool, so that the noise-removed curve meets the header's figure at the cut.
    """
    if len(values) == 0:
        return None
    edges = np.histogram_bin_edges(values, bins=HISTOGRAM_BINS)
    lo, hi = float(edges[0]), float(edges[-1])
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(v: float) -> float:
        return round(_LEFT + (min(max(v, lo), hi) - lo) / (hi - lo) * plot_w, 2)

    layers = [("all", values)] if noisy is None else [("clean", values[~noisy]), ("noisy", values[noisy])]
    counts = [np.histogram(v, bins=edges)[0] for _, v in layers]
    top = max(1, int(np.sum(counts, axis=0).max()))
    bars, base = [], np.zeros(len(edges) - 1)
    for (name, _), c in zip(layers, counts, strict=True):
        for b in range(len(c)):
            if c[b]:
                y0, y1 = base[b] / top, (base[b] + c[b]) / top
                bars.append(
                    {
                        "x": x(edges[b]),
                        "w": max(round(x(edges[b + 1]) - x(edges[b]) - 1, 2), 0.5),
                        "y": round(_TOP + plot_h * (1 - y1), 2),
                        "h": round(plot_h * (y1 - y0), 2),
                        "cls": name,
                        "tip": f"{edges[b]:.4g} to {edges[b + 1]:.4g}: {int(c[b])} {name if noisy is not None else ''}",
                    }
                )
        base = base + c
    ts = np.linspace(lo, hi, CURVE_POINTS)
    ordered = np.sort(values)
    kept_share = 1 - np.searchsorted(ordered, ts, side="left") / len(values)
    curves = [{"cls": "kept", "label": "kept share of scored pairs", "points": _points(ts, kept_share, x)}]
    if noisy is not None and noisy_total:
        noisy_sorted = np.sort(values[noisy])
        kept_noisy = len(noisy_sorted) - np.searchsorted(noisy_sorted, ts, side="left")
        kept_all = len(values) - np.searchsorted(ordered, ts, side="left")
        precision = np.where(kept_all > 0, 1 - kept_noisy / np.maximum(kept_all, 1), np.nan)
        removed = 1 - kept_noisy / noisy_total
        curves.append({"cls": "precision", "label": "precision (clean in kept)", "points": _points(ts, precision, x)})
        curves.append({"cls": "removed", "label": "noise removed", "points": _points(ts, removed, x)})
    ticks = [{"x": x(t), "label": _tick_label(t)} for t in _nice_ticks(lo, hi)]
    yticks = [{"y": round(_TOP + plot_h * (1 - v), 2), "label": f"{v:g}"} for v in (0, 0.25, 0.5, 0.75, 1)]
    return {
        "w": _W,
        "h": _H,
        "left": _LEFT,
        "right": _W - _RIGHT,
        "top": _TOP,
        "bottom": _H - _BOTTOM,
        "bars": bars,
        "ymax": top,
        "lo": lo,
        "hi": hi,
        "cut_x": x(cut) if math.isfinite(cut) else _LEFT,
        "cut_inside": lo <= cut <= hi,
        "cut_label": f"{cut:.4g}" if math.isfinite(cut) else "none (the rule keeps nothing)",
        "ticks": ticks,
        "yticks": yticks,
        "curves": curves,
        "kept_at_cut": float((values >= cut).mean()) if math.isfinite(cut) else 0.0,
    }


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) within [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.6g}"


def _cut_on(pool: pd.DataFrame, column: str) -> float:
    """Where a rule on another column cuts ``column``: the lowest value of it that the rule keeps
    (NaN when it keeps none)."""
    kept = pool.loc[pool["_ncl_outcome"] == KEPT, column].to_numpy(dtype=np.float64)
    kept = kept[np.isfinite(kept)]
    return float(kept.min()) if len(kept) else math.nan


# The slider's data: every value of a pool this small, else this many quantiles (its counts are
# then estimates, to about a 5,000th of the pool), so the page stays small for a pool of any size.
SLIDER_VALUES = 5000


def _slider(pool: pd.DataFrame, column: str, cut: float, noisy, noisy_total: int, *, command: str) -> dict:
    """What the page's cut slider recomputes from: the sorted ``column`` values of the pairs a
    threshold decides (ok, meeting --where, not a --dedup duplicate; overrides aside), those of the
    noisy ones with truth, and a key per sampled value for the pairs nearest the cut."""
    values = pool[column].to_numpy(dtype=np.float64)
    eligible = (pool["status"] == schema.OK).to_numpy() & np.isfinite(values)
    if WHERE_HOLDS in pool.columns:
        eligible &= pool[WHERE_HOLDS].to_numpy(dtype=bool)
    if "_ncl_duplicate_of" in pool.columns:
        eligible &= pool["_ncl_duplicate_of"].isna().to_numpy()
    rows = np.flatnonzero(eligible)
    rows = rows[np.argsort(values[rows], kind="stable")]
    n = len(rows)
    exact = n <= SLIDER_VALUES
    picked = rows if exact else rows[np.linspace(0, n - 1, SLIDER_VALUES).round().astype(int)]
    noisy_values = []
    if noisy is not None:
        nv = np.sort(values[rows][noisy[rows]])
        noisy_values = (
            nv if len(nv) <= SLIDER_VALUES else nv[np.linspace(0, len(nv) - 1, SLIDER_VALUES).round().astype(int)]
        )
    return {
        "column": column,
        "n": n,
        "exact": exact,
        "sampled": len(picked),
        "cut": None if math.isnan(cut) else cut,
        # Exact, not rounded: the page's count at a cut must be the one filter keeps at that threshold.
        "sorted_values": json.dumps([float(v) for v in values[picked]]),
        "sorted_keys": json.dumps([str(k) for k in pool["key"].to_numpy()[picked]]),
        "noisy_n": int(noisy[rows].sum()) if noisy is not None else 0,
        "noisy_values": json.dumps([float(v) for v in noisy_values]),
        "noisy_total": noisy_total,
        "command": command,
    }


def _quantiles(ordered: np.ndarray) -> np.ndarray:
    """``ordered`` itself, or ``SLIDER_VALUES`` of it evenly spaced by rank."""
    if len(ordered) <= SLIDER_VALUES:
        return ordered
    return ordered[np.linspace(0, len(ordered) - 1, SLIDER_VALUES).round().astype(int)]


def _command(shards, report_dir, column: str, where: str | None, dedup) -> str:
    """The ``filter`` command line the slider's cut stands for, with THRESHOLD where the page puts it."""
    given = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    words = ["ncleaner", "filter", *map(str, given), "--report", str(report_dir), "--out", "CLEAN_DIR"]
    words += ["--column", column, "--threshold", "THRESHOLD"]
    if where:
        words += ["--where", where]
    if dedup is not None:
        words += ["--dedup", str(dedup)]
    return " ".join(w if w == "THRESHOLD" else shlex.quote(w) for w in words)


def _points(ts: np.ndarray, ys: np.ndarray, x) -> str:
    plot_h = _H - _TOP - _BOTTOM
    return " ".join(
        f"{x(t)},{round(_TOP + plot_h * (1 - y), 2)}" for t, y in zip(ts, ys, strict=True) if np.isfinite(y)
    )


# -- rendering -----------------------------------------------------------------------------------


def _render(context: dict) -> str:
    import jinja2
    from markupsafe import Markup

    files = resources.files("ncleaner") / "templates"
    guard = (files / "inspect_errors.js").read_text(encoding="utf-8")
    script = (files / "inspect.js").read_text(encoding="utf-8")
    if any("</script" in s.lower() for s in (guard, script)):
        raise RuntimeError("a page script must not hold '</script': it would end its own tag")
    # The page's policy runs no script but these two, by hash: even markup that slipped through
    # escaping could not run.
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode("ascii") + "'"
        for s in (guard, script)
    )
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (files / name).read_text(encoding="utf-8")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("inspect.html.j2").render(
        **context, guard=Markup(guard), script=Markup(script), script_hashes=hashes
    )
