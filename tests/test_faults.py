"""Fault injection: processes killed at chosen points, concurrent runs, and fuzzed shards.

A killed process is a real subprocess that SIGKILLs itself at a chosen point
(the point is chosen by wrapping one of the package's functions before the CLI
runs), so nothing in the package knows it is being tested.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, run_cli, write_tar

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test here starts interpreters or runs many commands


def ncleaner_command(args: list, patch: str = "") -> list[str]:
    """The command line of the CLI in a fresh interpreter after ``patch`` (code that may wrap package functions)."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        # A shell running in the background starts its children with SIGINT ignored, and Python then
        # leaves it ignored: the Ctrl-C tests need the handler a terminal's command gets.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        {patch}
        from ncleaner.cli import main
        sys.argv = ["ncleaner", *sys.argv[1:]]
        main()
        """
    ).format(patch=textwrap.indent(textwrap.dedent(patch), ""))
    return [sys.executable, "-c", code, *map(str, args)]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run_ncleaner(args: list, patch: str = "") -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter after ``patch``; wait for it to end."""
    return subprocess.run(ncleaner_command(args, patch), capture_output=True, text=True, env=ENV)


def report_frame(report_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(report_dir).sort_values(["shard", "index"]).reset_index(drop=True)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def reference_report(small_shards, small_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "report"
    run_cli("score", small_shards, "--model", small_model, "--out", out, "--batch-size", "8", "--quiet")
    return out


def on_nth_call(owner: str, name: str, n: int, signal_name: str = "SIGKILL") -> str:
    """Patch code: the process sends itself ``signal_name`` on the n-th call of ``owner.name``.

    ``owner`` is ``module`` or ``module:Class``.
    """
    module, _, cls = owner.partition(":")
    return f"""
        import importlib
        target = importlib.import_module("{module}")
        target = getattr(target, "{cls}") if "{cls}" else target
        real = getattr(target, "{name}")
        calls = []
        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == {n}:
                os.kill(os.getpid(), signal.{signal_name})
            return real(*a, **k)
        setattr(target, "{name}", wrapped)
    """


# Scoring 3 shards of 32 pairs in batches of 8: the 8th encoded batch is the second shard's last, after
# the first shard was written, with one decode worker (shards one after the other) or two (blocks taken
# from each in turn: the first shard's last block is the 7th).
SECOND_SHARD_BATCH = ("ncleaner.encode:Encoder", "__call__", 8)
# Filtering with --maxcount 10: the second output shard is being closed.
SECOND_OUTPUT_SHARD = ("ncleaner.writer:ShardFile", "close", 2)

KILL_POINTS = {
    "during a shard": on_nth_call(*SECOND_SHARD_BATCH),
    # The second shard's Parquet part is in place, its marker is not.
    "between part and marker": """
        import ncleaner.scoring
        real = ncleaner.scoring.write_json
        def write_json(path, data):
            if str(path).endswith("_00001.done.json"):
                die()
            return real(path, data)
        ncleaner.scoring.write_json = write_json
    """,
    # The second shard's Parquet part is written under its temporary name, not yet renamed.
    "before the rename": """
        import ncleaner.scoring
        real = ncleaner.scoring.pq.write_table
        class pq:
            @staticmethod
            def write_table(table, where):
                real(table, where)
                if "00001" in str(where):
                    die()
        ncleaner.scoring.pq = pq
    """,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_score_killed_then_rerun_gives_the_uninterrupted_report(point, small_shards, small_model, reference_report,
                                                                 tmp_path):  # fmt: skip
    out = tmp_path / "report"
    args = ["score", small_shards, "--model", small_model, "--out", out, "--batch-size", "8", "--quiet"]
    killed = run_ncleaner(args, KILL_POINTS[point])
    assert killed.returncode == -9, killed.stderr
    assert not (out / "_00001.done.json").exists()
    rerun = run_ncleaner(args)
    assert rerun.returncode == 0, rerun.stderr
    pd.testing.assert_frame_equal(report_frame(out), report_frame(reference_report))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_report.iterdir())


def test_filter_killed_midway_leaves_no_shard_under_a_final_name_and_rerun_is_identical(
    small_shards, reference_report, tmp_path
):
    args = ["filter", small_shards, "--report", reference_report, "--keep-fraction", "0.5", "--maxcount", "10"]
    run_cli(*args, "--out", tmp_path / "reference")
    out = tmp_path / "clean"
    killed = run_ncleaner([*args, "--out", out], on_nth_call(*SECOND_OUTPUT_SHARD))
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # not a directory of finished-looking shards without a manifest
    rerun = run_ncleaner([*args, "--out", out])
    assert rerun.returncode == 0, rerun.stderr
    assert files(out) == files(tmp_path / "reference")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".clean.")]  # the dead run's staging is gone


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_score_killed_leaves_no_decode_worker_alive(small_model, tmp_path):
    # The main process stops at its first batch, as a process the OOM killer picks stops: the workers
    # have decoded blocks that nobody reads, and go on decoding until their queue is full.
    held = """
        import time
        import ncleaner.encode
        def held(*a, **k):
            print("encoding", flush=True)
            time.sleep(300)
        ncleaner.encode.Encoder.__call__ = held
    """
    # Long captions make each decoded block larger than a pipe holds, so a worker's queue thread
    # blocks writing it: the case DataLoader's own check of its parent does not end.
    for s in range(4):
        write_tar(tmp_path / "in" / f"{s:05d}.tar",
                  [(f"{s}_{i}.{ext}", data) for i in range(16) for ext, data in
                   (("jpg", jpeg_bytes((16 * i, 40 * s, 90))), ("txt", f"a photo {i} ".encode() * 800))])  # fmt: skip
    args = ["score", tmp_path / "in", "--model", small_model, "--out", tmp_path / "r", "--workers", "2", "-q"]
    proc = subprocess.Popen(ncleaner_command(args, held), stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline() == "encoding\n"
        workers = children_of(proc.pid)
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while (alive := [w for w in workers if running(w)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for w in alive:
        os.kill(w, signal.SIGKILL)  # not left behind by the test either
    assert alive == [], "decode workers outlived their killed parent"


def test_two_score_processes_on_one_report_directory(small_shards, small_model, reference_report, tmp_path):
    out = tmp_path / "report"
    args = [sys.executable, "-m", "ncleaner.cli", "score", str(small_shards), "--model", str(small_model),
            "--out", str(out), "--batch-size", "8", "--quiet"]  # fmt: skip
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in "ab"]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for code, stderr in results:
        assert code == 0 or (code == 1 and len(stderr.strip().splitlines()) == 1), stderr
    assert any(code == 0 for code, _ in results)
    pd.testing.assert_frame_equal(report_frame(out), report_frame(reference_report))
    assert not list(out.glob(".*.partial"))


# -- fuzzed shards ---------------------------------------------------------------------------------


def header_keys(path: Path) -> list[str]:
    """Sample keys by plain tarfile, reading headers only until the archive stops making sense."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                if m.isdir():
                    continue
                head, _, base = m.name.rpartition("/")
                key = (head + "/" if head else "") + base.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except (tarfile.TarError, EOFError):
        pass
    return keys


def output_sample_count(directory: Path) -> int:
    count = 0
    for shard in directory.glob("*.tar"):
        with tarfile.open(shard) as tf:
            keys = [m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tf.getmembers()]
        count += sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)
    return count


def fuzz(source: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(source)
    if seed % 3 == 0:
        return bytes(data[: int(rng.integers(1, len(data)))])  # truncated anywhere
    flips = int(rng.integers(1, 4)) if seed % 3 == 2 else int(rng.integers(1, 40))  # few flips: headers may survive
    for position in rng.integers(0, len(data), size=flips):
        data[position] ^= 1 << int(rng.integers(0, 8))  # flipped bits, headers included
    if seed % 3 == 1:
        data = data[: int(rng.integers(len(data) // 2, len(data)))]
    return bytes(data)


@pytest.mark.parametrize("seed", range(16))
def test_fuzzed_shard_gives_a_report_or_one_line_and_filter_accounts_for_every_sample(
    seed, small_shards, small_model, tmp_path
):
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(fuzz((small_shards / "00000.tar").read_bytes(), seed))
    score = run_cli("score", shard, "--model", small_model, "--out", tmp_path / "r", "--quiet", ok=False)
    if score.exit_code != 0:
        assert score.exit_code == 1 and len(score.output.strip().splitlines()) == 1, score.output
        assert str(shard) in score.output
        return
    report = pd.read_parquet(tmp_path / "r")
    assert report["key"].tolist() == header_keys(shard)
    run_cli("filter", shard, "--report", tmp_path / "r", "--out", tmp_path / "k", "--rejected-out", tmp_path / "x",
            "--threshold", "0.5")  # fmt: skip
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    kept, rejected = output_sample_count(tmp_path / "k"), output_sample_count(tmp_path / "x")
    assert kept + rejected == len(report) == manifest["input_count"]


def test_the_fuzzer_reaches_intact_damaged_and_unreadable_shards(small_shards, tmp_path):
    source = (small_shards / "00000.tar").read_bytes()
    lengths = []
    for seed in range(16):
        path = tmp_path / f"{seed}.tar"
        path.write_bytes(fuzz(source, seed))
        lengths.append(len(header_keys(path)))
    assert any(n == 32 for n in lengths) and any(0 < n < 32 for n in lengths) and any(n == 0 for n in lengths)


def test_pipe_named_shard_in_a_directory_is_not_executed_by_any_command(small_shards, small_model, tmp_path):
    d = tmp_path / "downloaded"
    d.mkdir()
    name = "pipe:touch PWNED; cat 00000.tar; echo x.tar"
    shutil.copy(small_shards / "00000.tar", d / name)
    shutil.copy(small_shards / "00000.tar", d / "00000.tar")
    for args in (
        ["score", d, "--model", small_model, "--out", tmp_path / "r", "--quiet"],
        ["filter", d, "--report", tmp_path / "r", "--out", tmp_path / "c", "--auto"],
        ["inject-noise", d, "--out", tmp_path / "n", "--rate", "0.5"],
        ["fit", d, "--out", tmp_path / "m", "--epochs", "1", "--warmup-epochs", "0", "--quiet"],
    ):
        result = subprocess.run([sys.executable, "-m", "ncleaner.cli", *map(str, args)], cwd=d, capture_output=True,
                                text=True, env=ENV)  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert not (d / "PWNED").exists() and not (tmp_path / "PWNED").exists()


INTERRUPT_DURING_SECOND_SHARD = {
    "score": on_nth_call(*SECOND_SHARD_BATCH, signal_name="SIGINT"),
    "filter": on_nth_call(*SECOND_OUTPUT_SHARD, signal_name="SIGINT"),
}


@pytest.mark.parametrize("command", list(INTERRUPT_DURING_SECOND_SHARD))
def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing_incomplete(
    command, small_shards, small_model, reference_report, tmp_path
):
    out = tmp_path / "out"
    args = {
        "score": ["score", small_shards, "--model", small_model, "--out", out, "--batch-size", "8", "--quiet"],
        "filter": [
            "filter",
            small_shards,
            "--report",
            reference_report,
            "--out",
            out,
            "--auto",
            "--maxcount",
            "10",
            "-q",
        ],  # fmt: skip
    }[command]
    result = run_ncleaner(args, INTERRUPT_DURING_SECOND_SHARD[command])
    assert result.returncode == 130, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "interrupted" in result.stderr
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".staging"))]
    assert leftovers == []
    if command == "score":  # the first shard is finished and marked, the second not started under its name
        assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "_00000.done.json"]
    else:
        assert not out.exists()
