"""``inspect`` (the HTML page), ``filter --dry-run`` and the override lists (docs/design.md section 11)."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import IMG_CAPTION, SCRIPT_CAPTION, run_cli, tar_members, write_tar

import ncleaner.inspection as inspection
from ncleaner.errors import NcleanerError
from ncleaner.evaluate import kept_set_metrics
from ncleaner.filtering import filter_shards
from ncleaner.inspection import inspect_report
from ncleaner.schema import STATUSES


class _Page(HTMLParser):
    """The cards of each gallery (their attributes and text), and every element seen."""

    def __init__(self):
        super().__init__()
        self.galleries: dict[str, list[dict]] = {}
        self.tags: list[tuple[str, dict]] = []
        self._gallery = None
        self._card = None
        self._field = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section" and "data-gallery" in a:
            self._gallery = self.galleries.setdefault(a["data-gallery"], [])
        elif tag == "article":
            self._card = {**a, "text": ""}
            self._gallery.append(self._card)
        elif self._card is not None and tag in ("p", "div") and a.get("class") in ("caption", "outcome", "shard"):
            self._field = a["class"]
            self._card[self._field] = ""

    def handle_endtag(self, tag):
        if tag == "article":
            self._card = None
        if tag in ("p", "div"):
            self._field = None

    def handle_data(self, data):
        if self._card is not None:
            self._card["text"] += data
            if self._field:
                self._card[self._field] += data


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _report(pool) -> pd.DataFrame:
    return pd.read_parquet(pool["report"])


def test_page_shows_the_rule_its_counts_and_the_right_galleries(inspect_pool, tmp_path):
    out = tmp_path / "page.html"
    result = run_cli(
        "inspect", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out", out,
        "--keep-fraction", "0.5", "--per-gallery", "5", "--truth-field", "ncleaner_noisy",
        "--model", inspect_pool["model"],
    )  # fmt: skip
    report = _report(inspect_pool)
    ok = report[report["status"] == "ok"]
    cut = np.sort(ok["score"].to_numpy())[::-1][int(round(0.5 * len(ok))) - 1]
    kept = (report["status"] == "ok") & (report["score"] >= cut)
    assert f"keeps {int(kept.sum())}, rejects {int((~kept).sum())}" in result.output
    html = out.read_text(encoding="utf-8")
    assert f"score &gt;= {cut:.4g} (--keep-fraction 0.5)" in html
    assert "ncleaner-tiny" in html  # the backbone, from --model
    assert report["model_id"].iloc[0] in html

    page = _parse(out)
    cards = {g: [c["data-key"] for c in cs] for g, cs in page.galleries.items()}
    lowest = ok.sort_values("score", kind="stable")
    assert cards["lowest"] == lowest["key"].head(5).tolist()
    assert cards["below"] == lowest[lowest["score"] < cut]["key"].tail(5).tolist()[::-1]
    assert cards["above"] == lowest[lowest["score"] >= cut]["key"].head(5).tolist()
    assert len(cards["kept"]) == 5 and set(cards["kept"]) <= set(report.loc[kept, "key"])
    assert sorted(cards["not_ok"]) == ["h2", "h3"]
    # Keys are unique in this pool: "copy keys" copies the bare key, the form filter --keep-keys reads.
    assert all(c["data-copy"] == c["data-key"] for cs in page.galleries.values() for c in cs)
    for card in page.galleries["not_ok"]:
        status = report.set_index("key").loc[card["data-key"], "status"]
        assert card["outcome"] == f"rejected: {status} ({STATUSES[status]})"
    for card in page.galleries["below"]:
        assert card["outcome"] == "rejected: below the threshold" and "rejected" in card["class"]
    for card in page.galleries["above"]:
        assert card["outcome"] == "kept" and "kept" in card["class"]

    noisy = report["ncleaner_noisy"].map(json.loads).to_numpy(dtype=bool)
    metrics = kept_set_metrics(kept.to_numpy(), noisy)
    assert f"{100 * metrics['kept_precision']:.1f}% clean (precision)" in html
    assert f"removes {100 * metrics['noise_removed']:.1f}% of the noise" in html
    truth_marks = [c for cs in page.galleries.values() for c in cs if "(truth)" in c["text"]]
    assert len(truth_marks) == sum(len(cs) for cs in page.galleries.values())

    assert len(re.findall(r'<rect class="bar (?:clean|noisy)"', html)) > 2  # histogram, stacked by truth
    assert '<line class="cut"' in html and '<polyline class="kept"' in html


def test_captions_and_keys_are_text_never_markup(inspect_pool, tmp_path):
    out = tmp_path / "page.html"
    inspect_report(inspect_pool["shards"], inspect_pool["report"], out, threshold=-1e9, per_gallery=200)
    html = out.read_text(encoding="utf-8")
    page = _parse(out)
    captions = {c["data-key"]: c["caption"] for cs in page.galleries.values() for c in cs}
    assert captions["h0"] == SCRIPT_CAPTION and captions["h1"] == IMG_CAPTION  # shown as written, as text
    assert 'h4"<b>x' in captions  # an attribute value, escaped, read back whole
    assert [t for t, _ in page.tags].count("script") == 2  # the page's own two, nothing injected
    assert "img" not in [t for t, _ in page.tags] and "b" not in [t for t, _ in page.tags]
    assert "&lt;script&gt;document.title=" in html
    # Nothing is fetched from the web: no element loads a URL, only inline data: images.
    assert not [a for _, a in page.tags if a.get("src") or a.get("href")]
    assert re.findall(r"url\((?!data:image/jpeg;base64,)", html) == []
    assert "default-src 'none'" in html


def test_inspect_and_filter_agree_on_every_rule(inspect_pool, tmp_path):
    args = (inspect_pool["shards"], inspect_pool["report"])
    for rule in ({"threshold": 0.3}, {"keep_fraction": 0.8, "column": "clip_sim"}, {"auto": True}):
        page = inspect_report(*args, tmp_path / "p.html", per_gallery=1, **rule)
        dry = filter_shards(*args, tmp_path / "never", dry_run=True, **rule)
        assert page.rule == dry.rule
        assert (page.kept, page.rejected) == (dry.kept_count, dry.rejected_count)
    default = inspect_report(*args, tmp_path / "p.html", per_gallery=1)
    assert default.rule.mode == "auto"  # no rule given: the model's own split


def test_images_are_read_once_per_shard_and_only_for_shown_pairs(inspect_pool, tmp_path, monkeypatch):
    opened = []
    real = inspection.read_shard

    def counting(url):
        opened.append(url)
        return real(url)

    monkeypatch.setattr(inspection, "read_shard", counting)
    result = inspect_report(inspect_pool["shards"], inspect_pool["report"], tmp_path / "p.html", per_gallery=2)
    assert len(opened) == len(set(opened)) and opened
    assert sum(result.cards.values()) <= 10
    # Every card with a decodable image has one; the two that have none are the non-ok pair without
    # an image and the corrupt one.
    html = (tmp_path / "p.html").read_text()
    assert result.thumbnails == len(set(re.findall(r'data-thumb="(t\d+)"', html)))
    assert html.count("data:image/jpeg;base64,") == result.thumbnails


def test_an_existing_file_is_replaced_only_when_inspect_wrote_it(inspect_pool, tmp_path):
    args = ("inspect", *inspect_pool["shards"], "--report", inspect_pool["report"], "--per-gallery", "1")
    mine = tmp_path / "page.html"
    run_cli(*args, "--out", mine)
    run_cli(*args, "--out", mine, "--auto")  # its own page: replaced
    theirs = tmp_path / "notes.html"
    theirs.write_text("<html>my notes</html>")
    result = run_cli(*args, "--out", theirs, ok=False)
    assert result.exit_code == 1 and "was not written by ncleaner inspect" in result.output
    assert theirs.read_text() == "<html>my notes</html>"


def test_bad_input_is_a_one_line_error_naming_the_file(inspect_pool, small_shards, tmp_path):
    missing = tmp_path / "no-report"
    result = run_cli("inspect", small_shards, "--report", missing, "--out", tmp_path / "p.html", ok=False)
    assert result.exit_code == 1 and str(missing) in result.output and len(result.output.splitlines()) == 1
    result = run_cli(
        "inspect", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out", tmp_path / "p.html",
        "--truth-field", "no_such_field", ok=False,
    )  # fmt: skip
    assert result.exit_code == 1 and "no_such_field" in result.output
    with pytest.raises(NcleanerError, match="--column bogus: not a score column"):
        inspect_report(inspect_pool["shards"], inspect_pool["report"], tmp_path / "p.html", threshold=0, column="bogus")
    result = run_cli(
        "inspect", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out", tmp_path / "p.html",
        "--threshold", "0", "--auto", ok=False,
    )  # fmt: skip
    assert result.exit_code == 2 and "at most one of" in result.output
    assert not (tmp_path / "p.html").exists()


# -- filter --dry-run and the override lists ----------------------------------------------------


def test_dry_run_counts_what_the_real_run_writes_and_writes_nothing(inspect_pool, tmp_path):
    args = ("filter", *inspect_pool["shards"], "--report", inspect_pool["report"], "--threshold", "0.4")
    out, rejected = tmp_path / "clean", tmp_path / "rejected"
    dry = run_cli(*args, "--out", out, "--rejected-out", rejected, "--dry-run")
    assert not out.exists() and not rejected.exists() and list(tmp_path.iterdir()) == []
    run_cli(*args, "--out", out, "--rejected-out", rejected)
    manifest = json.loads((out / "manifest.json").read_text())
    total = f"would keep {manifest['kept_count']} of {manifest['input_count']} pairs"
    assert total in dry.output and dry.output.rstrip().endswith("nothing written")
    reasons = ", ".join(f"{v} {k}" for k, v in sorted(manifest["rejected_by_reason"].items()))
    assert f"would reject {manifest['rejected_count']} ({reasons})" in dry.output
    hostile = next(line for line in dry.output.splitlines() if line.startswith(inspect_pool["shards"][1]))
    assert hostile.split()[1] == "5" and "1 bad_image" in hostile and "1 missing_image" in hostile
    assert len([line for line in dry.output.splitlines() if ".tar " in line]) == 4  # one line per shard

    # A dry run fails where the real run would: the outputs now hold an earlier run's files.
    again = run_cli(*args, "--out", out, "--dry-run", ok=False)
    assert again.exit_code == 1 and "directory is not empty" in again.output


def test_shards_named_with_spaces_unicode_or_a_newline_get_parts_of_their_own_and_one_table_line(
    small_shards, small_model, tmp_path
):
    # Such names gave report parts named "__" and "line": two shards could write one part.
    d = tmp_path / "pool"
    d.mkdir()
    names = ["my shard.tar", "my\nshard.tar", "caf\u00e9 \u2028.tar"]
    for name, source in zip(names, sorted(small_shards.glob("*.tar")), strict=True):
        shutil.copy(source, d / name)
    report = tmp_path / "report"
    run_cli("score", d, "--model", small_model, "--out", report, "-q")
    parts = sorted(p.name for p in report.glob("*.parquet"))
    assert len(parts) == 3 and all(re.fullmatch(r"(my_shard|caf___)-[0-9a-f]{8}\.parquet", p) for p in parts), parts
    frame = pd.read_parquet(report)
    assert sorted(frame["shard"].unique()) == sorted(str(d / n) for n in names) and len(frame) == 96

    dry = run_cli("filter", d, "--report", report, "--out", tmp_path / "clean", "--auto", "--dry-run")
    table = dry.output.splitlines()
    shown = [str(d / "my shard.tar"), str(d / "my\\nshard.tar"), str(d / "caf\u00e9 \\u2028.tar")]
    for name in shown:
        assert len([line for line in table if line.startswith(name + " ")]) == 1, dry.output


def test_key_lists_override_the_rule_and_are_counted_apart(inspect_pool, tmp_path):
    report = _report(inspect_pool)
    ok = report[report["status"] == "ok"].sort_values("score")
    low1, low2 = ok["key"].iloc[0], ok["key"].iloc[1]  # rejected by the rule below
    high = ok["key"].iloc[-1]  # kept by the rule
    shard_of_low2 = report.set_index("key").loc[low2, "shard"].rsplit("/", 1)[-1]
    keep = tmp_path / "keep.txt"
    keep.write_text(f"{low1}\n{shard_of_low2}\t{low2}\r\n\nh2\nnot-a-key\n")
    reject = tmp_path / "reject.txt"
    reject.write_text(f"{high}\n")
    cut = float(ok["score"].iloc[2])
    result = run_cli(
        "filter", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out", tmp_path / "k",
        "--rejected-out", tmp_path / "r", "--threshold", str(cut), "--keep-keys", keep, "--reject-keys", reject,
    )  # fmt: skip
    assert "2 kept and 1 rejected by override" in result.output
    assert "match no sample of the pool" in result.output and "'not-a-key'" in result.output
    assert "cannot be kept, they have no usable pair" in result.output
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["kept_by_override"] == 2 and manifest["rejected_by_override"] == 1
    assert manifest["rejected_by_reason"]["override"] == 1
    assert manifest["overrides"]["not_found"] == {"keep": ["not-a-key"], "reject": []}
    assert [(e["key"], e["status"]) for e in manifest["overrides"]["kept_not_ok"]] == [("h2", "bad_image")]
    assert manifest["kept_count"] + manifest["rejected_count"] == manifest["input_count"] == len(report)
    kept_keys = {n.split(".")[0] for p in (tmp_path / "k").glob("*.tar") for n in tar_members(p)}
    rejected_keys = {n.split(".")[0] for p in (tmp_path / "r").glob("*.tar") for n in tar_members(p)}
    assert {low1, low2} <= kept_keys and high in rejected_keys and "h2" in rejected_keys
    expected_kept = set(ok.loc[ok["score"] >= cut, "key"]) - {high} | {low1, low2}
    assert kept_keys == expected_kept


def test_bad_key_lists_are_one_line_errors(inspect_pool, tmp_path):
    args = ("filter", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out", tmp_path / "k", "--auto")
    both = tmp_path / "both.txt"
    both.write_text("h0\n")
    result = run_cli(*args, "--keep-keys", both, "--reject-keys", both, "--dry-run", ok=False)
    assert result.exit_code == 1 and "is also in" in result.output and "'h0'" in result.output
    result = run_cli(*args, "--keep-keys", tmp_path / "absent.txt", ok=False)
    assert result.exit_code == 1 and "absent.txt: cannot read key list" in result.output
    bad = tmp_path / "bad.txt"
    bad.write_text("h0\na\tb\tc\n")
    result = run_cli(*args, "--reject-keys", bad, ok=False)
    assert result.exit_code == 1 and "bad.txt: line 2: expected KEY or SHARD<TAB>KEY" in result.output
    assert not (tmp_path / "k").exists()


def test_copied_keys_name_one_sample_when_a_key_repeats_across_shards(hostile_shard, small_model, tmp_path):
    shards = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shards.append(str(shutil.copy(hostile_shard, tmp_path / d / "hostile.tar")))
    run_cli("score", *shards, "--model", small_model, "--out", tmp_path / "report", "-q")
    inspect_report(shards, tmp_path / "report", tmp_path / "p.html", threshold=1e9, per_gallery=50)
    copies = {c["data-copy"] for cs in _parse(tmp_path / "p.html").galleries.values() for c in cs}
    assert {f"{shards[0]}\th0", f"{shards[1]}\th0"} <= copies and "h0" not in copies
    keep = tmp_path / "keep.txt"
    keep.write_text(f"{shards[0]}\th0\n")
    result = run_cli("filter", *shards, "--report", tmp_path / "report", "--out", tmp_path / "k",
                     "--threshold", "1e9", "--keep-keys", keep)  # fmt: skip
    repeated = pd.read_parquet(tmp_path / "report")["key"].nunique()
    assert result.output.count("appear in more than one shard") == 1
    assert f"{repeated} key(s) appear in more than one shard (e.g. " in result.output
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["kept_count"] == manifest["kept_by_override"] == 1
    assert set(tar_members(tmp_path / "k" / "00000.tar")) == {"h0.jpg", "h0.txt", "h0.json"}


def _drop_clean_prob(frame):
    return frame.drop(columns="clean_prob")


def _set_first_ok(column, value):
    def edit(frame):
        frame.loc[frame.index[frame["status"] == "ok"][0], column] = value
        return frame

    return edit


def _unknown_status(frame):
    frame.loc[0, "status"] = "fine"
    return frame


def _duplicate_row(frame):
    return pd.concat([frame, frame.iloc[:1]], ignore_index=True)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_drop_clean_prob, "no column clean_prob"),
        (_set_first_ok("clean_prob", 5.0), "column clean_prob takes"),
        (_set_first_ok("score", float("nan")), "column score is missing or not finite on an ok row"),
        (_unknown_status, "unknown status 'fine'"),
        (_duplicate_row, "a key appears on more than one row"),
    ],
)
def test_every_command_that_reads_a_report_refuses_a_damaged_part_in_one_line(
    small_shards, small_model, tmp_path, edit, problem
):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_shards / "00000.tar", data / "00000.tar")
    report = tmp_path / "r"
    run_cli("score", data, "--model", small_model, "--out", report, "--keep-json-fields", "ncleaner_noisy", "-q")
    part = report / "00000.parquet"
    edit(pd.read_parquet(part)).to_parquet(part, index=False)
    commands = [
        ("filter", data, "--report", report, "--out", tmp_path / "c", "--auto"),
        ("filter", data, "--report", report, "--out", tmp_path / "c", "--auto", "--dry-run"),
        ("inspect", data, "--report", report, "--out", tmp_path / "p.html", "--auto"),
        ("evaluate", "--report", report, "--truth-field", "ncleaner_noisy"),
    ]
    for args in commands:
        result = run_cli(*args, "-q", ok=False)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, (args[0], result.output)
        assert f"{part}: not a report part ncleaner wrote: {problem}" in result.output, (args[0], result.output)
    assert not (tmp_path / "c").exists() and not (tmp_path / "p.html").exists()


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_page_shortens_huge_captions_escapes_control_characters_and_checks_out_first(
    small_shards, small_model, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    members = tar_members(small_shards / "00000.tar")
    keys = sorted({name.split(".")[0] for name in members})
    members[f"{keys[0]}.txt"] = b"x" * 1_000_000
    members[f"{keys[1]}.txt"] = b"red \x1b[2J square\nsecond line"
    write_tar(data / "00000.tar", sorted(members.items()))
    run_cli("score", data, "--model", small_model, "--out", tmp_path / "r", "-q")
    site = tmp_path / "site"
    site.mkdir()
    left = site / f".page.html.{_dead_pid()}-0123abcd.partial"  # what a killed inspect leaves
    left.write_text("half a page")
    other = site / f".notes.txt.{_dead_pid()}-0123abcd.partial"  # not this page's: left alone
    other.write_text("someone else's")
    run_cli("inspect", data, "--report", tmp_path / "r", "--out", site / "page.html", "--threshold", "1e9",
            "--per-gallery", "50", "-q")  # fmt: skip
    page = (site / "page.html").read_text()
    assert len(page) < 300_000 and "x" * 1001 not in page and "(999,000 more characters)" in page
    assert "\x1b" not in page and "red \\x1b[2J square\\nsecond line" in page
    assert not left.exists() and other.exists()

    refused = run_cli("inspect", data, "--report", tmp_path / "r", "--out", "/proc/ncleaner-page.html", ok=False)
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "--out /proc/ncleaner-page.html: cannot write in /proc" in refused.output


def test_where_ands_a_sql_predicate_with_the_rule_in_filter_dry_run_and_inspect(inspect_pool, tmp_path):
    report = pd.read_parquet(inspect_pool["report"])
    cut = float(f"{report['score'].quantile(0.3):.3f}")
    where = f"clip_sim <= {report['clip_sim'].quantile(0.9):.3f} AND ncleaner_noisy = 'false'"
    by_rule = (report["status"] == "ok") & (report["score"] >= cut)
    both = by_rule & (report["clip_sim"] <= report["clip_sim"].quantile(0.9).round(3))
    both &= report["ncleaner_noisy"] == "false"
    assert 0 < both.sum() < by_rule.sum()  # the predicate changes what the rule alone keeps
    args = ("filter", *inspect_pool["shards"], "--report", inspect_pool["report"], "--threshold", str(cut))
    run_cli(*args, "--where", where, "--out", tmp_path / "clean", "-q")
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["kept_count"] == both.sum() and manifest["where"] == where
    assert manifest["rejected_by_reason"]["where"] == (by_rule & ~both).sum()
    kept_keys = {name.split(".")[0] for shard in (tmp_path / "clean").glob("*.tar") for name in tar_members(shard)}
    assert kept_keys == set(report.loc[both, "key"])
    dry = run_cli(*args, "--where", where, "--out", tmp_path / "dry", "--dry-run")
    rule = f"score >= {cut:.4g} (--threshold) and --where {where}"
    assert f"would keep {both.sum()} of {len(report)} pairs by {rule}" in dry.output
    page = run_cli("inspect", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out",
                   tmp_path / "p.html", "--threshold", str(cut), "--where", where)  # fmt: skip
    assert f"keeps {both.sum()}, rejects {len(report) - both.sum()}" in page.output


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("no_such_column > 1", 'Referenced column "no_such_column" not found'),
        ("score > AND", "Parser Error"),
        ("score > 0; COPY report TO 'leak.csv'", "Parser Error"),
        # Closes the expression the predicate is wrapped in, to smuggle in a second statement.
        (
            "true) AS BOOLEAN), false) FROM report; COPY report TO 'leak.csv'; SELECT coalesce(CAST((true",
            "must be one expression over the report's columns",
        ),
        ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "disabled"),
    ],
)
def test_a_where_that_is_not_one_safe_expression_over_the_report_is_one_line(inspect_pool, tmp_path, where, problem):
    result = run_cli("filter", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out",
                     tmp_path / "clean", "--auto", "--where", where, ok=False)  # fmt: skip
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"--where {where!r}: " in result.output and problem in result.output, result.output
    assert not (tmp_path / "clean").exists() and not Path("leak.csv").exists()


def _with_uids(shard: Path, out: Path, *, seed: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """A copy of ``shard`` whose jsons carry a random DataComp-style uid each: (key -> uid, members)."""
    rng = np.random.default_rng(seed)
    members = tar_members(shard)
    uids = {}
    for name in sorted(members):
        if name.endswith(".json"):
            uids[name[:-5]] = f"{int(rng.integers(0, 2**63)):016x}{int(rng.integers(0, 2**63)):016x}"
            members[name] = json.dumps({**json.loads(members[name]), "uid": uids[name[:-5]]}).encode()
    write_tar(out, sorted(members.items()))
    return uids, members


def test_subset_files_hold_the_kept_and_rejected_uids_as_datacomp_writes_them(small_shards, small_model, tmp_path):
    data = tmp_path / "data"
    uids, members = _with_uids(small_shards / "00000.tar", data / "00000.tar", seed=0)
    run_cli("score", data, "--model", small_model, "--out", tmp_path / "r", "-q")
    assert set(pd.read_parquet(tmp_path / "r")["uid"]) == set(uids.values())
    run_cli("filter", data, "--report", tmp_path / "r", "--out", tmp_path / "clean", "--auto", "--subset-out",
            tmp_path / "kept.npy", "--rejected-subset-out", tmp_path / "rejected.npy", "-q")  # fmt: skip
    kept_keys = {name.split(".")[0] for name in tar_members(tmp_path / "clean" / "00000.tar")}

    def expected(keys):
        array = np.array([divmod(int(uids[k], 16), 2**64) for k in keys], np.dtype("u8,u8"))
        array.sort()
        return array

    for path, keys in (("kept.npy", kept_keys), ("rejected.npy", set(uids) - kept_keys)):
        saved = np.load(tmp_path / path)
        assert saved.dtype == np.dtype("u8,u8") and np.array_equal(saved, expected(keys)), path

    # A kept sample without a uid cannot be named in a subset file: one line, nothing written.
    members[f"{min(kept_keys)}.json"] = b'{"url": null}'
    write_tar(data / "00000.tar", sorted(members.items()))
    run_cli("score", data, "--model", small_model, "--out", tmp_path / "r2", "-q")
    result = run_cli("filter", data, "--report", tmp_path / "r2", "--out", tmp_path / "c2", "--auto",
                     "--subset-out", tmp_path / "k2.npy", ok=False)  # fmt: skip
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--subset-out: 1 kept sample(s) have no uid in their json" in result.output
    assert not (tmp_path / "c2").exists() and not (tmp_path / "k2.npy").exists()


def test_uid_lists_override_the_rule_and_alone_are_the_rule(small_shards, small_model, tmp_path):
    data = tmp_path / "data"
    uids, _ = _with_uids(small_shards / "00000.tar", data / "00000.tar", seed=1)
    run_cli("score", data, "--model", small_model, "--out", tmp_path / "r", "-q")
    chosen = sorted(uids)[:5]
    pairs = np.array([divmod(int(uids[k], 16), 2**64) for k in chosen], np.dtype("u8,u8"))
    np.save(tmp_path / "chosen.npy", np.sort(pairs))
    # The headerless form, with one uid listed twice and one that names no sample.
    stranger = np.array([(7, 7)], np.dtype("u8,u8"))
    np.concatenate([pairs, pairs[:1], stranger]).tofile(tmp_path / "chosen.bin")

    run_cli("filter", data, "--report", tmp_path / "r", "--out", tmp_path / "c", "--threshold", "-2",
            "--reject-uids", tmp_path / "chosen.npy", "-q")  # fmt: skip
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["rejected_by_reason"] == {"override": 5} and manifest["overrides"]["reject_uids"].endswith("npy")
    kept = {name.split(".")[0] for name in tar_members(tmp_path / "c" / "00000.tar")}
    assert kept == set(uids) - set(chosen)

    # No report: the subset file is the whole rule, as in DataComp's resharder.
    alone = run_cli("filter", data, "--out", tmp_path / "alone", "--keep-uids", tmp_path / "chosen.bin",
                    "--subset-out", tmp_path / "again.npy")  # fmt: skip
    assert "kept 5 of 32 pairs (uid listed in --keep-uids)" in alone.output
    assert "1 uid(s) match no sample of the pool" in alone.output
    kept = {name.split(".")[0] for name in tar_members(tmp_path / "alone" / "00000.tar")}
    assert kept == set(chosen)
    manifest = json.loads((tmp_path / "alone" / "manifest.json").read_text())
    assert manifest["rejected_by_reason"] == {"not_listed": 27} and manifest["report"] is None
    assert manifest["overrides"]["uids_not_found"]["keep"] == 1
    assert np.array_equal(np.load(tmp_path / "again.npy"), np.sort(pairs))

    usage = run_cli("filter", data, "--out", tmp_path / "x", "--keep-uids", tmp_path / "chosen.npy", "--auto", ok=False)
    assert "with no --report, --keep-uids is the whole rule" in usage.output
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 17)
    bad = run_cli("filter", data, "--out", tmp_path / "y", "--keep-uids", tmp_path / "odd.bin", ok=False)
    assert "odd.bin: neither a .npy file nor a whole number of 16-byte uids" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "y").exists()


def test_with_auto_the_page_shows_the_score_it_cuts_with_round_ticks_and_a_slider(inspect_pool, tmp_path):
    out = tmp_path / "page.html"
    run_cli("inspect", *inspect_pool["shards"], "--report", inspect_pool["report"], "--out", out, "--auto",
            "--where", "caption_words > 3", "-q")  # fmt: skip
    report = _report(inspect_pool)
    page = _parse(out)
    svg = next(a for tag, a in page.tags if tag == "svg" and a.get("id") == "histogram")
    assert svg["aria-label"] == "histogram of score over the scored pairs"
    slider = next(a for tag, a in page.tags if a.get("id") == "slider")
    assert slider["data-column"] == "score"
    # --auto keeps clean_prob >= 0.5: on the score axis its cut is the lowest score it keeps.
    kept = report[(report["clean_prob"] >= 0.5) & (report["caption_words"] > 3)]
    assert float(slider["data-cut"]) == pytest.approx(kept["score"].min(), abs=1e-6)
    # The slider counts the pairs a threshold decides: ok ones meeting --where, every value of them.
    decided = report[(report["status"] == "ok") & (report["caption_words"] > 3)]
    assert slider["data-n"] == str(len(decided)) and slider["data-exact"] == "1"
    assert sorted(json.loads(slider["data-values"])) == pytest.approx(sorted(decided["score"]), abs=1e-5)
    assert "--column score --threshold THRESHOLD --where 'caption_words > 3'" in slider["data-command"]
    # Tick labels are round numbers (a step of 1, 2 or 5 times a power of ten), not 0.399, 0.599.
    html = out.read_text(encoding="utf-8")
    section = html[html.index('id="histogram"') : html.index("</svg>")]
    labels = [float(t) for t in re.findall(r'text-anchor="middle">(-?[0-9.]+)</text>', section)]
    steps = {round(b - a, 9) for a, b in zip(labels, labels[1:], strict=False)}
    assert len(labels) >= 3 and len(steps) == 1
    step = steps.pop()
    assert round(step / 10 ** np.floor(np.log10(step)), 6) in (1, 2, 5)
