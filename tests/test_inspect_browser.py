"""The inspect page run in a real browser: headless Chromium, the Debian package (``make browser``).

Chromium is driven through its command line only (``--dump-dom`` prints the DOM once the page's
scripts have run), so no driver or browser download is needed. The page's first script writes any
JavaScript error (``data-js-errors``) or blocked content (``data-csp-violations``) onto <html>, and
its last one sets ``data-ready``: the dumped DOM says whether the page ran, and ran cleanly.
Without Chromium every test here is skipped with the reason, never passed.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from conftest import IMG_CAPTION, SAMPLE_DATA, SCRIPT_CAPTION, run_cli

from ncleaner.inspection import inspect_report

BROWSERS = ("chromium", "chromium-browser")


# Session-scoped like the fixtures it guards, so that it is resolved, and skips, before they run.
@pytest.fixture(scope="session")
def chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "chromium is not installed, so the inspect page was not run in a browser: `make browser` installs "
        "the Debian package (it needs apt-get and root)"
    )


@pytest.fixture(scope="module")
def sample_page(chromium, hostile_shard, small_model, tmp_path_factory):
    """The page for sample_data/ plus the hostile shard, scored by the small model."""
    root = tmp_path_factory.mktemp("browser")
    shards = [str(SAMPLE_DATA), str(hostile_shard)]
    run_cli("score", *shards, "--model", small_model, "--out", root / "report", "--keep-json-fields", "ncleaner_noisy",
            "-q")  # fmt: skip
    result = inspect_report(
        shards, root / "report", root / "page.html", keep_fraction=0.8, per_gallery=12, truth_field="ncleaner_noisy"
    )
    return result


class _Dom(HTMLParser):
    """What a test needs from a dumped DOM: <html>'s attributes, the title, the cards, every tag."""

    def __init__(self):
        super().__init__()
        self.root: dict = {}
        self.title = ""
        self.cards: list[dict] = []
        self.tags: list[str] = []
        self.keys_text = ""
        self._in = None
        self._in_body = False
        self._gallery = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "html":
            self.root = a
        elif tag == "section" and "data-gallery" in a:
            self._gallery = a["data-gallery"]
        elif tag == "article":
            self.cards.append({**a, "gallery": self._gallery, "caption": ""})
        elif tag == "body":
            self._in_body = True
        elif (tag == "title" and not self._in_body) or tag == "textarea":  # not the charts' <title> tips
            self._in = tag
        elif tag == "p" and a.get("class") == "caption" and self.cards:
            self._in = tag

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None
        if tag == "section":
            self._gallery = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in == "textarea":
            self.keys_text += data
        elif self._in == "p" and self._gallery is not None:
            self.cards[-1]["caption"] += data


def _dump(chromium: str, url: str, tmp_path) -> _Dom:
    run = subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and "<html" in run.stdout, run.stderr[-2000:]
    dom = _Dom()
    dom.feed(run.stdout)
    return dom


def test_page_runs_cleanly_with_every_card_and_the_histogram(chromium, sample_page, tmp_path):
    dom = _dump(chromium, sample_page.out.resolve().as_uri(), tmp_path)
    assert dom.root.get("data-ready") == "1"
    assert "data-js-errors" not in dom.root and "data-csp-violations" not in dom.root
    assert dom.title == f"ncleaner inspect: {sample_page.rule.describe()}"
    by_gallery = {g: sum(c["gallery"] == g for c in dom.cards) for g in sample_page.cards}
    assert by_gallery == {"lowest": 12, "below": 12, "above": 12, "kept": 12, "not_ok": 2}
    assert not any("hidden" in c for c in dom.cards) and dom.root["data-shown"] == str(len(dom.cards))
    assert "svg" in dom.tags and dom.tags.count("rect") > 10 and "polyline" in dom.tags
    # The slider starts at the rule's cut and counts exactly what the rule keeps.
    assert dom.root["data-cut-kept"] == str(sample_page.kept)


def test_text_filter_from_the_url_hides_cards_and_selection_lists_keys(chromium, sample_page, tmp_path):
    url = sample_page.out.resolve().as_uri() + "#q=" + quote("PWNED") + "&select=shown"
    dom = _dump(chromium, url, tmp_path)
    assert dom.root.get("data-ready") == "1" and "data-js-errors" not in dom.root
    shown = [c for c in dom.cards if "hidden" not in c]
    hidden = [c for c in dom.cards if "hidden" in c]
    assert hidden and shown and dom.root["data-shown"] == str(len(shown))
    assert all("pwned" in c["caption"] for c in shown) and not any("pwned" in c["caption"] for c in hidden)
    assert {"h2", "h3"} <= {c["data-key"] for c in shown}
    # "select shown" picked exactly the shown cards: their keys, one a line, for filter --keep-keys.
    assert sorted(dom.keys_text.split()) == sorted({c["data-copy"] for c in shown})


def test_markup_in_a_caption_is_shown_as_text_and_never_runs(chromium, sample_page, tmp_path):
    dom = _dump(chromium, sample_page.out.resolve().as_uri(), tmp_path)
    assert "pwned" not in dom.title
    captions = {c["data-key"]: c["caption"] for c in dom.cards}
    assert captions["h2"] == SCRIPT_CAPTION and captions["h3"] == IMG_CAPTION
    assert "img" not in dom.tags and dom.tags.count("script") == 2  # the page's own two
    assert "data-csp-violations" not in dom.root  # nothing was even attempted


def test_the_cut_slider_recounts_and_writes_the_filter_command(chromium, sample_page, tmp_path):
    report = pd.read_parquet(sample_page.out.parent / "report")
    scores = report.loc[report["status"] == "ok", "score"].to_numpy()
    cut = float(np.quantile(scores, 0.3))
    dom = _dump(chromium, sample_page.out.resolve().as_uri() + f"#cut={cut}", tmp_path)
    assert dom.root.get("data-ready") == "1" and "data-js-errors" not in dom.root
    # Every value of a pool this small is on the page: the count is exact.
    assert dom.root["data-cut-kept"] == str(int((scores >= cut).sum()))
    command = dom.root["data-cut-command"]
    assert command.startswith("ncleaner filter ") and f"--column score --threshold {cut!r}" in command
