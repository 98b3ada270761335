"""Regenerate the picture of ``ncleaner inspect`` in docs/commands.md: the page for sample_data/, in headless Chromium.

    make demo                                           # fits and scores sample_data/ into demo_out/
    python pipelines/inspect_screenshot.py demo_out     # or: make screenshot

Writes DEMO_DIR/inspect_sample_data.html with the rule docs/commands.md shows (the best 80 % by
``score``, ground truth from ``ncleaner_noisy``), a screenshot of its top to
pipelines/results/inspect_sample_data.png, and prints the page's size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from ncleaner.inspection import inspect_report

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", nargs="?", default="demo_out", help="holds model/ and report/ (make demo)")
    parser.add_argument("--out", default=str(REPO / "pipelines" / "results" / "inspect_sample_data.png"))
    parser.add_argument("--keep-fraction", type=float, default=0.8)
    parser.add_argument("--size", default="1400,1100", help="browser window WIDTH,HEIGHT in CSS pixels")
    args = parser.parse_args()
    demo = Path(args.demo_dir)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (make browser installs the Debian package)")
    page = inspect_report(
        str(REPO / "sample_data"),
        demo / "report",
        demo / "inspect_sample_data.html",
        keep_fraction=args.keep_fraction,
        truth_field="ncleaner_noisy",
        model_dir=demo / "model",
    )
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={args.size}", f"--screenshot={out}",
             page.out.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    # A 256-colour palette keeps the committed picture a fraction of the size, with no visible loss.
    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
    cards = sum(page.cards.values())
    print(
        f"{page.out}: {page.size_bytes} bytes ({page.size_bytes / 1024:.0f} KiB) for {page.pool} pairs, "
        f"{cards} cards, {page.thumbnails} thumbnails; rule {page.rule.describe()}; screenshot {out}"
    )


if __name__ == "__main__":
    main()
