"""The ``ncleaner`` command: a thin layer over ``ncleaner.fit``, ``score`` and ``filter_shards``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import typing
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__
from .config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_NEAR_SIMILARITY, DERIVED_FIELDS, PRECISIONS, DisNCLConfig
from .engine import ENGINES, RunOptions
from .errors import NcleanerError, first_line, printable
from .schema import OK, SCORE_COLUMNS, TRUNCATED_SHARD

EXIT_INTERRUPTED = 130


def user_errors(fn):
    """Bad input, an unwritable output or Ctrl-C end in one line, never a traceback.

    NcleanerError and OSError exit 1 with the message; Ctrl-C exits 130. Every
    output is written under a temporary name first, so an interrupted command
    leaves nothing incomplete under a final name.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NcleanerError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or first_line(exc)}") from None
        except KeyboardInterrupt:
            click.echo("interrupted: nothing incomplete was left under a final name", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class _EchoHandler(logging.Handler):
    """Library log records on stderr, through click so that the current stderr is used."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        click.echo(prefix + record.getMessage(), err=True)


# Where ``verbosity`` leaves whether progress bars show, for ``run_options`` to read.
_PROGRESS = "ncleaner.progress"


def verbosity(command):
    """``-q`` / ``-v`` for a command: they set how much of the library's log shows, and whether
    progress bars do (``run_options`` below reads it).

    The library itself logs through ``logging.getLogger(__name__)`` and shows no progress bar
    unless asked: this is the one place that turns them on. While the command runs the package's
    records stop at this handler: open_clip logs through the root logger's module functions
    (``logging.info``), which call ``logging.basicConfig()`` and so give the root a stderr
    handler that would print every record a second time. The logger is restored afterwards, so
    an in-process caller (a test, a notebook) keeps its own logging set-up.
    """

    @click.option("--quiet", "-q", is_flag=True, help="Warnings and errors only: no progress bars, no per-epoch lines.")
    @click.option("--verbose", "-v", is_flag=True, help="Also debug messages.")
    @functools.wraps(command)
    def wrapper(*args, quiet: bool, verbose: bool, **kwargs):
        package = logging.getLogger("ncleaner")
        level, propagate = package.level, package.propagate
        handler = _EchoHandler()
        package.addHandler(handler)
        package.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
        package.propagate = False
        click.get_current_context().meta[_PROGRESS] = not quiet
        try:
            return command(*args, **kwargs)
        finally:
            package.removeHandler(handler)
            package.setLevel(level)
            package.propagate = propagate

    return wrapper


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


device_option = click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (CUDA when present)."
)
bad_shard_option = click.option(
    "--on-bad-shard",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="A shard that cannot be read: fail stops with its name; skip records it and goes on.",
)
max_pixels_option = click.option(
    "--max-image-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_IMAGE_PIXELS,
    show_default=True,
    help="Images with more pixels are not decoded (status too_large): a guard against decompression bombs.",
)


def _stacked(options):
    """One decorator applying several click options, in the order given (as --help lists them)."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


_run_option_decls = {
    "device": device_option,
    "workers": click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Processes decoding images while the main one encodes (default: one per core, at most one per shard; "
        "0: decode in the main process). Results do not depend on it.",
    ),
    "engine": click.option(
        "--engine",
        type=click.Choice(ENGINES),
        default="local",
        show_default=True,
        help="local: this machine; ray: one work item per shard on a Ray cluster (pip install 'ncleaner[ray]'). "
        "The output is the same.",
    ),
    "ray_address": click.option(
        "--ray-address",
        default=None,
        help="With --engine ray: auto joins the cluster ray start made; HOST:PORT another one; "
        "left out, a local Ray is started for the run.",
    ),
    "actors_per_gpu": click.option(
        "--ray-actors-per-gpu",
        "actors_per_gpu",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="With --engine ray on GPUs: workers sharing each GPU, each decoding on its own CPU.",
    ),
}


def run_options(*fields: str):
    """The ``RunOptions`` fields a command offers as options (all of them when none are named),
    handed to the command as one ``run`` argument: the command forwards one object, and a new
    run option is declared here once. Goes below ``verbosity``, which decides ``progress``."""
    chosen = fields or tuple(_run_option_decls)

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            given = {f: kwargs.pop(f) for f in chosen}
            progress = click.get_current_context().meta.get(_PROGRESS, False)
            return command(*args, run=RunOptions(progress=progress, **given), **kwargs)

        return _stacked([_run_option_decls[f] for f in chosen])(wrapper)

    return decorate


embeddings_options = [
    click.option(
        "--embeddings",
        type=click.Path(file_okay=False),
        default=None,
        help="Embeddings directory (ncleaner embed): shards it holds are not encoded again; "
        "the others are encoded and added to it.",
    ),
    click.option(
        "--embeddings-backbone",
        default=None,
        help="The open_clip backbone that computed --embeddings, for a directory without embeddings.json "
        "(written by clip-retrieval).",
    ),
]


embeddings_option = _stacked(embeddings_options)


def rule_options(*, preview: bool):
    """--threshold, --keep-fraction, --auto, --column: the rule filter applies and inspect shows."""
    lead = "Show the rule: keep" if preview else "Keep"
    auto = (
        "Show the model's own split, clean_prob >= 0.5 (the default with no rule)."
        if preview
        else "Keep pairs the model judges clean (clean_prob >= 0.5)."
    )
    return _stacked(
        [
            click.option(
                "--threshold",
                type=float,
                default=None,
                callback=_finite,
                help=f"{lead} pairs whose --column is >= this.",
            ),
            click.option(
                "--keep-fraction",
                type=click.FloatRange(0, 1, min_open=True),
                default=None,
                help=f"{lead} this fraction of pairs, best --column first.",
            ),
            click.option("--auto", is_flag=True, help=auto),
            click.option(
                "--column",
                type=click.Choice(SCORE_COLUMNS),
                default="score",
                show_default=True,
                help="Report column --threshold and --keep-fraction apply to.",
            ),
            click.option(
                "--where",
                default=None,
                metavar="SQL",
                help="Also require this SQL predicate over the report's columns, kept json fields included "
                "(DuckDB; e.g. \"clip_sim >= 0.28 AND punsafe < 0.1\"); rows it rejects are counted as 'where'.",
            ),
        ]
    )


def _not_ok_note(statuses, what: str) -> str:
    """ "; not scored: 2 bad_image, 1 missing_caption" for the samples whose status is not ok, or ""."""
    not_ok = sorted((k, v) for k, v in statuses.items() if k != OK)
    return f"; {what}: " + ", ".join(f"{v} {k}" for k, v in not_ok) if not_ok else ""


def _shard_notes(skipped: dict[str, str], truncated: list[str]) -> str:
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} unreadable shard(s) skipped")
    if truncated:
        notes.append(f"{len(truncated)} truncated shard(s) flagged: {', '.join(truncated[:3])}")
    return ("; " + "; ".join(notes)) if notes else ""


allow_download_option = click.option(
    "--allow-download",
    is_flag=True,
    help="Let open_clip download the backbone the model names (hf-hub: names, pretrained tags); off by default.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ncleaner")
def main():
    """Find image-caption pairs whose caption does not describe the image, and write a clean copy.

    fit trains a DisNCL model on your shards, score writes a Parquet report with one row per
    pair, filter writes new shards holding the pairs you keep.
    """


def config_options(command):
    """One option per ``DisNCLConfig`` field a user sets (``config.setting``): ``--epochs`` for
    ``epochs``, ``--soft-targets/--no-soft-targets`` for a bool, with the field's type, default,
    choices, lowest value and help. The command receives them as keyword arguments; a new field
    needs no edit here."""
    hints = typing.get_type_hints(DisNCLConfig)
    for f in reversed(dataclasses.fields(DisNCLConfig)):
        if "help" not in f.metadata:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        kind = hints[f.name]
        if kind is bool:
            decls, kwargs = (f"{flag}/--no-{flag[2:]}",), {"is_flag": True}
        elif f.metadata["choices"]:
            decls, kwargs = (flag,), {"type": click.Choice(f.metadata["choices"])}
        else:
            base = next(t for t in (int, float, str) if kind is t or t in typing.get_args(kind))
            low = f.metadata["min"]
            decls, kwargs = (flag,), {"type": click.IntRange(min=low) if low is not None else base}
        command = click.option(
            *decls, f.name, default=f.default, show_default=f.default is not None, help=f.metadata["help"], **kwargs
        )(command)
    return command


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@config_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Start from this DisNCLConfig JSON (e.g. an earlier model's config.json); options given here override it.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Set any DisNCLConfig field (repeatable), e.g. --set lambda_reg=0.02 --set soft_targets=false.",
)
@click.option("--force", is_flag=True, help="Replace an existing model directory (only the files fit writes).")
@bad_shard_option
@max_pixels_option
@embeddings_option
@verbosity
@run_options()
@user_errors
@click.pass_context
def fit(
    ctx, shards, out_dir, config_file, overrides, force, on_bad_shard, max_image_pixels, embeddings,
    embeddings_backbone, run, **options,
):  # fmt: skip
    """Train a DisNCL model on SHARDS (no clean labels needed) and save it to --out.

    \b
    SHARDS: directories of .tar files, globs, brace patterns or URL / pipe: specs.
    The configuration is DisNCLConfig's defaults, then --config, then the options given here,
    then --set; it is saved as the model's config.json. With --engine ray (a frozen --pretrained
    backbone and --embeddings), the shards are encoded on the cluster; the heads train here.
    """
    from .fitting import fit as run_fit

    config = fit_config(ctx, config_file, options, overrides)
    result = run_fit(
        shards,
        out_dir,
        config,
        force=force,
        on_bad_shard=on_bad_shard,
        max_image_pixels=max_image_pixels,
        embeddings=embeddings,
        embeddings_backbone=embeddings_backbone,
        run=run,
    )
    unused = sum(v for k, v in result.statuses.items() if k != OK)
    truncated = result.statuses.get(TRUNCATED_SHARD, 0)
    held = result.pairs_held_out
    sampled = result.pairs_used + (0 if result.retrained else held) < result.statuses.get(OK, 0)
    if result.retrained:
        held_note = f" (a first training left {held} out for the self-check; this one used them all)"
    else:
        held_note = f", {held} held out for the self-check" if held else ""
    click.echo(
        f"model {result.model_id} saved to {result.model_dir}: trained on {result.pairs_used} pairs"
        + held_note
        + (f" (a uniform sample of {result.statuses.get(OK, 0)})" if sampled else "")
        + (f" ({unused} could not be used)" if unused else "")
        + (f"; {truncated} pairs of truncated shards left out" if truncated else "")
        + _shard_notes(result.unreadable_shards, [])
    )
    if result.selfcheck is not None:
        click.echo(f"self-check (AUROC of finding injected noise, held-out half B):\n{result.selfcheck.table()}")
    click.echo(result.score_rule)


def fit_config(ctx: click.Context, config_file: str | None, options: dict, overrides: tuple[str, ...]) -> DisNCLConfig:
    """DisNCLConfig's defaults, then --config, then the options the user typed, then --set."""
    try:
        config = DisNCLConfig()
        if config_file:
            # The derived fields of an earlier model's config.json are this fit's to fill in.
            derived = {f: getattr(config, f) for f in DERIVED_FIELDS}
            config = dataclasses.replace(DisNCLConfig.load(config_file), **derived)
        typed = {k: v for k, v in options.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
        config = config.with_overrides(typed).with_overrides(overrides)
    except ValueError as exc:
        raise click.UsageError(f"{config_file or '--set'}: {first_line(exc)}") from None
    if "warmup_epochs" not in typed and not any(o.startswith("warmup_epochs=") for o in overrides):
        config = config.with_overrides({"warmup_epochs": min(config.warmup_epochs, config.epochs)})
    return config


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model directory written by fit.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report directory to write.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Pairs encoded at a time."
)
@click.option(
    "--overwrite", is_flag=True, help="Re-score shards the report already holds, also those of another model."
)
@click.option(
    "--keep-json-fields",
    default="",
    help="Comma-separated json fields of each sample to copy into the report as text columns.",
)
@bad_shard_option
@max_pixels_option
@embeddings_option
@allow_download_option
@verbosity
@run_options()
@user_errors
def score(
    shards, model_dir, out_dir, batch_size, overwrite, keep_json_fields, on_bad_shard, max_image_pixels,
    embeddings, embeddings_backbone, allow_download, run,
):  # fmt: skip
    """Score every pair of SHARDS and write a Parquet report (one row per pair, one file per shard).

    Pairs that cannot be scored (corrupt image, missing caption...) get a row too, with a status
    saying why. Shards already in the report are skipped, so an interrupted run can be resumed.
    """
    from .scoring import score as run_score

    fields = [f.strip() for f in keep_json_fields.split(",") if f.strip()]
    result = run_score(
        shards,
        model_dir,
        out_dir,
        batch_size=batch_size,
        overwrite=overwrite,
        keep_json_fields=fields,
        on_bad_shard=on_bad_shard,
        max_image_pixels=max_image_pixels,
        embeddings=embeddings,
        embeddings_backbone=embeddings_backbone,
        allow_download=allow_download,
        run=run,
    )
    click.echo(
        f"report {result.report_dir}: {result.rows} rows from {len(result.done_now) + len(result.done_before)}"
        f" shard(s), model {result.model_id}"
        + _not_ok_note(result.statuses, "not scored")
        + _shard_notes(result.unreadable_shards, result.truncated_shards)
    )


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--backbone", required=True, help="open_clip model name.")
@click.option("--pretrained", required=True, help="open_clip pretrained tag or a local checkpoint file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Embeddings directory.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Pairs encoded at a time."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Backbone precision on CUDA (fp16/bf16 autocast).",
)
@bad_shard_option
@max_pixels_option
@allow_download_option
@verbosity
@run_options()
@user_errors
def embed(shards, backbone, pretrained, out_dir, batch_size, precision, on_bad_shard, max_image_pixels,
          allow_download, run):  # fmt: skip
    """Encode every pair of SHARDS once and write the embeddings in clip-retrieval's layout.

    \b
    OUT/img_emb/img_emb_N.npy, OUT/text_emb/text_emb_N.npy (float16, L2-normalised),
    OUT/metadata/metadata_N.parquet (row i = row i of both), OUT/skipped/ (samples without
    an embedding, with their status), OUT/embeddings.json; one part per shard, so an
    interrupted run resumes. fit --embeddings and score --embeddings read them.
    """
    from .embeddings import embed as run_embed

    result = run_embed(
        shards,
        out_dir,
        backbone=backbone,
        pretrained=pretrained,
        batch_size=batch_size,
        precision=precision,
        on_bad_shard=on_bad_shard,
        max_image_pixels=max_image_pixels,
        allow_download=allow_download,
        run=run,
    )
    click.echo(
        f"embeddings {result.out_dir}: {result.statuses.get(OK, 0)} pairs embedded from "
        f"{len(result.done_now)} shard(s)"
        + (
            f" ({len(result.reembedded_shards)} again: their parts were from other bytes)"
            if result.reembedded_shards
            else ""
        )
        + (f", {len(result.done_before)} shard(s) already there" if result.done_before else "")
        + _not_ok_note(result.statuses, "not embedded")
        + _shard_notes(result.unreadable_shards, result.truncated_shards)
    )


@main.command(name="filter")
@click.argument("shards", nargs=-1, required=True)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(),
    default=None,
    help="Report directory written by score (required unless --keep-uids is the whole rule).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for kept shards.")
@rule_options(preview=False)
@click.option(
    "--rejected-out",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write the rejected pairs here, as shards.",
)
@click.option(
    "--subset-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the kept pairs' uids as a DataComp subset file (.npy of u8,u8, sorted).",
)
@click.option(
    "--rejected-subset-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Likewise for the rejected pairs.",
)
@click.option(
    "--keep-keys",
    type=click.Path(dir_okay=False),
    default=None,
    help="File of keys to keep whatever the rule says (KEY or SHARD<TAB>KEY a line; inspect's copy keys).",
)
@click.option(
    "--reject-keys",
    type=click.Path(dir_okay=False),
    default=None,
    help="File of keys to reject whatever the rule says (same format as --keep-keys).",
)
@click.option(
    "--keep-uids",
    type=click.Path(dir_okay=False),
    default=None,
    help="DataComp subset file (.npy of u8,u8, or headerless): keep the samples whose uid it lists whatever the "
    "rule says; with no --report, it is the whole rule, as in DataComp's resharder.",
)
@click.option(
    "--reject-uids",
    type=click.Path(dir_okay=False),
    default=None,
    help="DataComp subset file: reject the samples whose uid it lists whatever the rule says.",
)
@click.option(
    "--dedup",
    "dedup_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory ncleaner dedup wrote for these shards: reject every sample whose group's representative "
    "is another (reason 'duplicate').",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what the rule would keep and reject, per reason and per shard, from the report; write nothing.",
)
@click.option(
    "--maxcount", type=click.IntRange(min=1), default=10_000, show_default=True, help="Samples per output shard."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace what an earlier filter run wrote to --out / --rejected-out (per its manifest).",
)
@bad_shard_option
@verbosity
@run_options("engine", "ray_address")
@user_errors
def filter_cmd(
    shards,
    report_dir,
    out_dir,
    threshold,
    keep_fraction,
    auto,
    column,
    where,
    rejected_out,
    subset_out,
    rejected_subset_out,
    keep_keys,
    reject_keys,
    keep_uids,
    reject_uids,
    dedup_dir,
    dry_run,
    maxcount,
    force,
    on_bad_shard,
    run,
):
    """Write the pairs of SHARDS that pass the rule as new shards, byte for byte, with a manifest.json.

    Give exactly one rule: --threshold, --keep-fraction or --auto. Pairs that could not be scored
    are always rejected. kept + rejected = input, and the counts are in --out/manifest.json.
    --keep-keys / --reject-keys override the rule for the samples they name (counted apart in the
    manifest); a sample that could not be scored stays rejected even when --keep-keys names it.
    """
    from .filtering import filter_shards
    from .rules import describe

    rules = (threshold is not None) + (keep_fraction is not None) + auto
    if report_dir is None and keep_uids is not None:
        if rules:
            raise click.UsageError("with no --report, --keep-uids is the whole rule: give no other")
    elif rules != 1:
        raise click.UsageError("give exactly one of --threshold, --keep-fraction or --auto")
    result = filter_shards(
        shards,
        report_dir,
        out_dir,
        threshold=threshold,
        keep_fraction=keep_fraction,
        auto=auto,
        column=column,
        where=where,
        rejected_out=rejected_out,
        subset_out=subset_out,
        rejected_subset_out=rejected_subset_out,
        keep_keys=keep_keys,
        reject_keys=reject_keys,
        keep_uids=keep_uids,
        reject_uids=reject_uids,
        dedup=dedup_dir,
        dry_run=dry_run,
        maxcount=maxcount,
        force=force,
        on_bad_shard=on_bad_shard,
        run=run,
    )
    rule = result.rule
    reasons = _reasons(result.rejected_by_reason)
    overridden = (
        f"; {result.kept_by_override} kept and {result.rejected_by_override} rejected by override"
        if any(result.overrides.get(k) for k in ("keep_keys", "reject_keys", "keep_uids", "reject_uids"))
        and result.rule.mode != "keep_uids"
        else ""
    )
    if dry_run:
        click.echo(_dry_run_table(result))
        click.echo(
            f"dry run: would keep {result.kept_count} of {result.input_count} pairs by "
            f"{describe(rule, result.where)}; would reject {result.rejected_count}"
            + (f" ({reasons})" if reasons else "")
            + overridden
            + _shard_notes(result.unreadable_shards, [])
            + "; nothing written"
        )
        return
    click.echo(
        f"kept {result.kept_count} of {result.input_count} pairs ({describe(rule, result.where)}) "
        + f"in {len(result.kept_shards)} shard(s) under {result.out_dir}; rejected {result.rejected_count}"
        + (f" ({reasons})" if reasons else "")
        + overridden
        + _shard_notes(result.unreadable_shards, result.truncated_shards)
    )


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(by_reason.items()))


def _dry_run_table(result) -> str:
    """One line per shard: input, kept (of which by override), rejected with the reasons."""
    shown = {url: printable(url) for url in result.per_shard}
    width = max([len("shard"), *map(len, shown.values())])
    lines = [f"{'shard':<{width}}  {'input':>7}  {'kept':>7}  {'rejected':>8}  reasons"]
    for url, c in result.per_shard.items():
        rejected = sum(c["rejected_by_reason"].values())
        kept = f"{c['kept']}" + (f" ({c['kept_by_override']} by override)" if c["kept_by_override"] else "")
        reasons = _reasons(c["rejected_by_reason"]) or "-"
        lines.append(f"{shown[url]:<{width}}  {c['input']:>7}  {kept:>7}  {rejected:>8}  {reasons}")
    return "\n".join(lines)


@main.command(name="inspect")
@click.argument("shards", nargs=-1, required=True)
@click.option("--report", "report_dir", required=True, type=click.Path(), help="Report directory written by score.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HTML file to write (e.g. report.html).")
@rule_options(preview=True)
@click.option(
    "--per-gallery",
    type=click.IntRange(1, 500),
    default=24,
    show_default=True,
    help="Cards in each of the five galleries (bounds the page's size).",
)
@click.option(
    "--truth-field", default=None, help="Report column true for noisy pairs (as in evaluate): cards marked, precision."
)
@click.option(
    "--truth",
    "truth_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Parquet with key and noisy columns (inject-noise's noise_truth.parquet) instead.",
)
@click.option("--model", "model_dir", type=click.Path(), default=None, help="The model that scored the report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sample of kept pairs.")
@click.option(
    "--thumb-px", type=click.IntRange(16, 512), default=160, show_default=True, help="Largest side of a thumbnail."
)
@click.option(
    "--dedup",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory ncleaner dedup wrote: reject its duplicates as filter --dedup does, and show the groups.",
)
@bad_shard_option
@verbosity
@user_errors
def inspect_cmd(shards, report_dir, out, threshold, keep_fraction, auto, column, where, **options):
    """Write one self-contained HTML page showing what a rule keeps and rejects, to look before you cut.

    \b
    The header gives the pool, the statuses, the model and the rule with its counts; a histogram
    of the column with the cut drawn and the kept share against the threshold; galleries of the
    lowest pairs, those just below and above the cut, a random sample of kept pairs and the pairs
    that could not be scored. The page filters, sorts, and copies the selected keys for
    filter --keep-keys / --reject-keys. It is resolved exactly as filter resolves the rule.
    """
    from .inspection import inspect_report
    from .rules import describe

    if (threshold is not None) + (keep_fraction is not None) + auto > 1:
        raise click.UsageError("give at most one of --threshold, --keep-fraction or --auto")
    result = inspect_report(
        shards,
        report_dir,
        out,
        threshold=threshold,
        keep_fraction=keep_fraction,
        auto=auto,
        column=column,
        where=where,
        **options,
    )
    rule = result.rule
    truth = result.truth
    click.echo(
        f"wrote {result.out} ({result.size_bytes / 1024:.0f} KiB, {sum(result.cards.values())} cards, "
        f"{result.thumbnails} images): {result.pool} pairs, {describe(rule, where)} keeps {result.kept}, "
        f"rejects {result.rejected}"
        + (
            f"; kept set {100 * truth['kept_precision']:.1f}% clean, "
            f"{100 * truth['noise_removed']:.1f}% of the noise removed"
            if truth
            else ""
        )
        + _shard_notes(result.unreadable_shards, [])
    )


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dedup directory to write.")
@click.option(
    "--near/--no-near",
    default=True,
    show_default=True,
    help="Also group near duplicates: re-encoded, resized or slightly cropped copies (perceptual hash).",
)
@click.option(
    "--near-similarity",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_NEAR_SIMILARITY,
    show_default=True,
    help="Share of the 256 perceptual-hash bits two near duplicates agree in.",
)
@click.option(
    "--semantic",
    "semantic_threshold",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Also group pictures whose image embeddings (--embeddings) have at least this cosine "
    "(SemDeDup: distinct pictures of one thing, by design). Off by default.",
)
@click.option(
    "--embeddings",
    type=click.Path(file_okay=False),
    default=None,
    help="Embeddings directory (ncleaner embed) of these shards, for --semantic.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="A report of these shards: each group keeps its best score (default: the first in shard order).",
)
@bad_shard_option
@max_pixels_option
@verbosity
@run_options("engine", "ray_address")
@user_errors
def dedup(shards, out_dir, near, near_similarity, semantic_threshold, embeddings, report_dir, on_bad_shard,
          max_image_pixels, run):  # fmt: skip
    """Find the samples of SHARDS that repeat another's picture, and the one of each group to keep.

    \b
    Writes OUT/<shard>.parquet, one row per sample: image_sha256, dup_group, duplicate_of (shard and
    key of the group's representative), dup_kind (exact, near, semantic) and dup_similarity.
    filter --dedup OUT then rejects every duplicate. Hashes are kept, so a re-run over more shards
    hashes only the new ones; the grouping is always over the whole pool given.
    """
    from .dedup import dedup as run_dedup

    result = run_dedup(
        shards,
        out_dir,
        near=near,
        near_similarity=near_similarity,
        semantic_threshold=semantic_threshold,
        embeddings=embeddings,
        report=report_dir,
        max_image_pixels=max_image_pixels,
        on_bad_shard=on_bad_shard,
        run=run,
    )
    found = sum(result.duplicates.values())
    kinds = ", ".join(f"{result.duplicates[k]} {k}" for k in ("exact", "near", "semantic") if result.duplicates[k])
    click.echo(
        f"dedup {result.out_dir}: {result.rows} samples from {len(result.done_now)} shard(s)"
        f" ({len(result.rehashed)} hashed now): {found} duplicate(s) in {result.groups} group(s)"
        + (f" ({kinds})" if kinds else "")
        + _not_ok_note(result.statuses, "not compared")
        + _shard_notes(result.unreadable_shards, result.truncated_shards)
        + (f"; filter --dedup {result.out_dir} rejects them" if found else "")
    )


@main.command(name="inject-noise")
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for noisy shards.")
@click.option(
    "--rate",
    type=click.FloatRange(0, 1),
    required=True,
    help="Fraction of captioned pairs whose caption is made noisy.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
@click.option(
    "--mode",
    type=click.Choice(["permute", "hard", "partial", "boilerplate", "mix"]),
    default="permute",
    show_default=True,
    help="permute: the chosen captions are shuffled among themselves (NCR, NeurIPS 2021). hard: each takes the most "
    "similar caption that states other facts (a near miss). partial: one colour, count, object or position word is "
    "changed. boilerplate: alt-text that describes nothing. mix: equal shares of the four.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace what an earlier inject-noise run wrote to --out (only the files its manifest lists).",
)
@verbosity
@user_errors
def inject_noise_cmd(shards, out_dir, rate, seed, mode, force):
    """Copy SHARDS with a known fraction of captions made noisy, recording the truth in each json.

    Each json gets ncleaner_noisy (and ncleaner_original_caption and ncleaner_noise_kind when noisy);
    --out/noise_truth.parquet holds the same truth for `ncleaner evaluate --truth`. Every other member is
    copied byte for byte. A chosen caption a mode cannot change (partial: no word it knows) stays clean
    and is counted.
    """
    from .noise import NOT_CHANGED_REASONS, inject_noise

    result = inject_noise(shards, out_dir, rate=rate, seed=seed, mode=mode, force=force)
    if mode == "permute":
        made = "permuted"
    else:
        made = "made noisy (" + ", ".join(f"{k} {v}" for k, v in result.kinds.items()) + ")"
    left = "".join(f"; {v} chosen for {k} left clean ({NOT_CHANGED_REASONS[k]})" for k, v in result.not_changed.items())
    click.echo(
        f"wrote {result.samples} pairs to {len(result.shards)} shard(s) in {result.out_dir}: "
        f"{result.noisy} of {result.with_caption} captions {made}{left}; truth in {result.truth_file}"
    )


@main.command()
@click.option("--report", "report_dir", type=click.Path(), default=None, help="Report directory written by score.")
@click.option(
    "--truth-field",
    default="ncleaner_noisy",
    show_default=True,
    help="Report column (kept with score --keep-json-fields) that is true for noisy pairs.",
)
@click.option(
    "--truth",
    "truth_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Parquet with key and noisy columns (inject-noise writes noise_truth.parquet) instead; "
    "its kind column, when present, gives the noise kinds.",
)
@click.option(
    "--kind-field",
    default="ncleaner_noise_kind",
    show_default=True,
    help="Report column (kept with score --keep-json-fields) naming each noisy pair's kind: "
    "AUROC and AP by kind when present.",
)
@click.option(
    "--retrieval",
    "retrieval_shards",
    multiple=True,
    help="Clean held-out SHARDS: report image-text retrieval R@1/5/10 of --model on them.",
)
@click.option("--model", "model_dir", type=click.Path(), default=None, help="Model directory (with --retrieval).")
@embeddings_option
@device_option
@allow_download_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the numbers here.")
@verbosity
@user_errors
def evaluate(
    report_dir,
    truth_field,
    truth_file,
    kind_field,
    retrieval_shards,
    model_dir,
    embeddings,
    embeddings_backbone,
    device,
    allow_download,
    json_out,
):
    """Measure noise detection against ground truth, and retrieval on a clean split.

    With --report: AUROC and average precision of every score column at finding the noisy pairs, and
    for the automatic rule (clean_prob >= 0.5) the share of clean pairs in the kept set and the share
    of noise removed; when the truth names each noisy pair's kind, AUROC and AP per kind (on the clean
    pairs plus the noisy pairs of that kind). With --retrieval SHARDS --model M: R@1/5/10 both ways, in
    the MII subspace and in the raw backbone space.
    """
    from . import evaluate as ev
    from .scoring import read_report

    if report_dir is None and not retrieval_shards:
        raise click.UsageError("give --report, --retrieval SHARDS --model M, or both")
    if retrieval_shards and model_dir is None:
        raise click.UsageError("--retrieval needs --model")
    results = {}
    if report_dir is not None:
        # Only what the metrics read: a pool's captions never need to be in memory for them.
        needed = ["key", "shard", "index", "status", *SCORE_COLUMNS, truth_field, kind_field]
        report = read_report(report_dir, columns=needed)
        if truth_file:
            noisy = ev.truth_from_file(report, truth_file)
            kinds, source = ev.noise_kinds_from_file(report, truth_file), f"{truth_file}: column kind"
        else:
            noisy = ev.truth_from_report(report, truth_field)
            kinds, source = ev.noise_kinds_from_report(report, kind_field), f"report column {kind_field!r}"
        results["detection"] = ev.evaluate_report(report, noisy, kinds, source)
        click.echo(ev.format_detection(results["detection"]))
    if retrieval_shards:
        results["retrieval"] = ev.retrieval_metrics(
            list(retrieval_shards),
            model_dir,
            device=device,
            allow_download=allow_download,
            embeddings=embeddings,
            embeddings_backbone=embeddings_backbone,
        )
        click.echo(ev.format_retrieval(results["retrieval"]))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
