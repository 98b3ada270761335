"""The Ray engine (issue 9): the same report, embeddings and filtered shards as the local engine,
a worker killed in the middle of a shard, and one-line errors.

Every Ray test runs on one local Ray of two CPUs started for the module (ncleaner uses a
connection that exists), so Ray starts once. A worker is killed by a setup hook that Ray runs
in every worker process: it wraps the shard reader so that the process SIGKILLs itself in the
middle of a shard while a flag file exists, and removes the flag first, so it happens once.
Nothing in the package knows it is being tested.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import MESSY_STATUSES, run_cli

from ncleaner.engine import DEFAULT_RUN, RunOptions, ShardJob, ShardTally, check_engine, run_shard_jobs
from ncleaner.errors import NcleanerError, UnreadableShard
from ncleaner.schema import OK
from ncleaner.shards import expand_shards, read_shard, shard_names
from ncleaner.writer import ShardPiece, ShardSink, shard_layout, write_json, write_shard_from_pieces

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'ncleaner[ray]'; make test does)")
SCORES = ["clip_sim", "mii_sim", "soft_agreement", "score", "clean_prob"]
# Features are rounded to float16 (encode.canonical); a Ray worker encodes with one torch thread, the
# local engine with the machine's, and the float32 sums that differ in their last bits can round a
# feature to the neighbouring float16 (a relative 2**-11): scores then move by about that much.
SCORE_ATOL = 2e-3
KILL_AFTER_SAMPLES = 10  # the killed worker has read this far into its shard


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _report(report_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(report_dir).sort_values(["shard", "index"]).reset_index(drop=True)


def _markers(report_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(report_dir.glob("_*.json"))}


def _assert_same_report(got: Path, want: Path) -> None:
    a, b = _report(got), _report(want)
    assert len(a) == len(b) > 0
    for column in [c for c in b.columns if c not in SCORES]:
        # Nullable integer columns (width, caption_chars...) read back as floats with NaN for null.
        pd.testing.assert_series_equal(a[column], b[column], check_names=False, obj=column)
    for column in SCORES:
        assert a[column].isna().tolist() == b[column].isna().tolist(), column
        np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=0, atol=SCORE_ATOL)
    assert _markers(got) == _markers(want)


# -- pieces: what lets per-shard tasks write the local engine's shards (no Ray needed) ----------


def test_pieces_cut_into_the_shards_a_sink_writes(tmp_path):
    rng = random.Random(0)
    samples = [
        {"__key__": f"k{i:03d}", "jpg": rng.randbytes(rng.randint(0, 3000)), "txt": b"x" * rng.randint(0, 300)}
        for i in range(57)
    ]
    with ShardSink(tmp_path / "sink", maxcount=10) as sink:
        for s in samples:
            sink.write(s)
    pieces = []
    cuts = [0, 5, 5, 23, 24, 57]  # an empty piece, a one-sample piece, shards spanning pieces
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece = ShardPiece(tmp_path / f"piece{a}.tar")
        for s in samples[a:b]:
            piece.write(s)
        piece.close()
        pieces.append((str(piece.path), piece.ends))
    out = tmp_path / "stitched"
    out.mkdir()
    for j, ranges in enumerate(shard_layout(pieces, 10)):
        write_shard_from_pieces(out / f"{j:05d}.tar", ranges)
    assert _files(out) == _files(tmp_path / "sink")
    assert len(_files(out)) == 6


def test_ray_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(NcleanerError, match=r"pip install 'ncleaner\[ray\]'") as exc:
        check_engine("ray", None)
    assert "\n" not in str(exc.value)


def test_address_without_ray_engine_is_refused():
    with pytest.raises(NcleanerError, match="only with --engine ray"):
        check_engine("local", "auto")


# -- the engine on a local Ray ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A 2-CPU local Ray for the module, with the kill hook installed in every worker."""
    if not HAS_RAY:
        pytest.skip("Ray is not installed (pip install 'ncleaner[ray]'; make test does)")
    import ray

    flag = tmp_path_factory.mktemp("kill") / "kill-once"

    def kill_hook(flag=str(flag), after=KILL_AFTER_SAMPLES):
        import os
        import signal

        import ncleaner.shards

        real = ncleaner.shards.read_shard

        class KillingReader:
            """The shard's reader (``damage`` and all), killing its process ``after`` samples in."""

            def __init__(self, url):
                self.reader = real(url)

            def __getattr__(self, name):
                return getattr(self.reader, name)

            def __iter__(self):
                for n, raw in enumerate(self.reader):
                    if n == after and os.path.exists(flag):
                        try:
                            os.unlink(flag)  # whoever removes the flag dies; the restarted worker goes on
                        except FileNotFoundError:
                            pass
                        else:
                            os.kill(os.getpid(), signal.SIGKILL)
                    yield raw

        # Bound by name where decode and filtering import it, so patched before they are imported.
        ncleaner.shards.read_shard = KillingReader

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 << 20,
        logging_level="warning",
        runtime_env={"worker_process_setup_hook": kill_hook},
    )
    yield flag
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(small_shards, messy_shard) -> list[str]:
    """Three generated shards and one with every kind of bad sample."""
    return [str(small_shards), str(messy_shard)]


@pytest.fixture(scope="module")
def local_report(pool, small_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "report"
    run_cli("score", *pool, "--model", small_model, "--out", out, "--batch-size", "8", "--workers", "0", "-q")
    return out


# -- a new stage on both engines, with no edit of the engine modules ----------------------------
# The smallest per-shard stage, as docs/design.md section 12 shows it: each shard's samples per
# reader status, written by the worker as OUT/<shard>.json and counted by the driver.


class CountJob(ShardJob):
    def _setup(self, out_dir: str) -> None:
        self.out = Path(out_dir)

    def _shard(self, url: str, name: str) -> dict:
        try:
            reader = read_shard(url)
            statuses = Counter(raw.problem or OK for raw in reader)
        except UnreadableShard as exc:
            return {"shard": url, "error": str(exc)}
        answer = {"shard": url, "statuses": dict(statuses), "damage": reader.damage}
        write_json(self.out / f"{name}.json", answer)
        return answer


def count_samples(shards, out_dir: Path, *, on_bad_shard: str = "fail", run: RunOptions = DEFAULT_RUN) -> ShardTally:
    urls = expand_shards(shards)
    todo = list(zip(urls, shard_names(urls), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = run_shard_jobs(CountJob, (str(out_dir),), todo, run=run, desc="counting")
    tally = ShardTally()
    for _, name in todo:  # in input order, whatever order the workers finished in
        tally.count(answers[name], on_bad_shard=on_bad_shard, log=logging.getLogger("count"))
    return tally


@pytest.fixture(scope="module")
def pool_with_junk(pool, tmp_path_factory) -> list[str]:
    junk = tmp_path_factory.mktemp("junk") / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 100)
    return [*pool, str(junk)]


def test_a_new_stage_runs_locally_with_the_one_tally(pool_with_junk, tmp_path):
    tally = count_samples(pool_with_junk, tmp_path / "local", on_bad_shard="skip")
    assert sum(tally.statuses.values()) == 96 + len(MESSY_STATUSES) and tally.statuses[OK] > 96
    urls = expand_shards(pool_with_junk)
    assert tally.done_now == urls[:-1] and not tally.truncated_shards
    assert list(tally.unreadable_shards) == urls[-1:] and "junk.tar" in tally.unreadable_shards[urls[-1]]
    with pytest.raises(UnreadableShard, match="junk.tar"):
        count_samples(pool_with_junk, tmp_path / "fails")


@needs_ray
def test_a_new_stage_runs_on_ray_as_it_runs_locally(ray_session, pool_with_junk, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    local = count_samples(pool_with_junk, tmp_path / "local", on_bad_shard="skip")
    on_ray = count_samples(pool_with_junk, tmp_path / "ray", on_bad_shard="skip", run=RunOptions(engine="ray"))
    assert on_ray == local
    assert _files(tmp_path / "ray") == _files(tmp_path / "local") and len(_files(tmp_path / "ray")) == 4


@needs_ray
def test_score_on_ray_gives_the_local_report(ray_session, pool, small_model, local_report, tmp_path):
    out = tmp_path / "report"
    result = run_cli("score", *pool, "--model", small_model, "--out", out, "--batch-size", "8", "--engine", "ray", "-q")
    _assert_same_report(out, local_report)
    assert "4 shard(s)" in result.output
    # A re-run schedules nothing: every shard has its marker.
    again = run_cli("score", *pool, "--model", small_model, "--out", out, "--engine", "ray", "-q")
    assert again.output == result.output


@needs_ray
def test_filter_on_ray_writes_the_local_shards_byte_for_byte(ray_session, pool, local_report, tmp_path):
    def run(engine: str) -> Path:
        out = tmp_path / engine
        run_cli(
            "filter", *pool, "--report", local_report, "--out", out / "kept", "--rejected-out", out / "rejected",
            "--keep-fraction", "0.6", "--maxcount", "10", "--engine", engine, "-q",
        )  # fmt: skip
        return out

    local, on_ray = run("local"), run("ray")
    for role in ("kept", "rejected"):
        want, got = _files(local / role), _files(on_ray / role)
        assert sorted(got) == sorted(want) and len(want) > 3  # shards of 10 cut across input shards
        for name in want:
            if name == "manifest.json":
                manifests = [json.loads(d[name]) for d in (got, want)]
                for m in manifests:
                    m.pop("rejected_out")
                assert manifests[0] == manifests[1]
            else:
                assert got[name] == want[name], name
        assert not list((on_ray / role).glob(".*")), "pieces left behind"
    manifest = json.loads((on_ray / "kept" / "manifest.json").read_text())
    assert manifest["kept_count"] + manifest["rejected_count"] == manifest["input_count"] == 96 + 8


@needs_ray
def test_worker_killed_in_the_middle_of_a_shard(ray_session, pool, small_model, local_report, tmp_path):
    flag = ray_session
    flag.write_text("kill once")
    out = tmp_path / "report"
    run_cli("score", *pool, "--model", small_model, "--out", out, "--batch-size", "8", "--engine", "ray", "-q")
    assert not flag.exists(), "no worker was killed: the test proved nothing"
    _assert_same_report(out, local_report)


@needs_ray
def test_embed_and_fit_on_ray(ray_session, small_shards, tmp_path):
    import open_clip
    import torch

    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("ncleaner-tiny", pretrained=None).state_dict(), checkpoint)
    embed = ["embed", small_shards, "--backbone", "ncleaner-tiny", "--pretrained", checkpoint, "-q"]
    run_cli(*embed, "--out", tmp_path / "local", "--workers", "0")
    run_cli(*embed, "--out", tmp_path / "ray", "--engine", "ray")
    # fit encodes on the cluster into --embeddings, then trains here.
    frozen = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32", "--set", f"pretrained={checkpoint}"]
    run_cli("fit", small_shards, "--out", tmp_path / "model", *frozen, "--embeddings", tmp_path / "fit", "-q",
            "--engine", "ray")  # fmt: skip
    assert (tmp_path / "model" / "model.safetensors").is_file()
    want = sorted((tmp_path / "local").rglob("*.*"))
    assert len(want) == 3 * 4 + 1
    for other in ("ray", "fit"):
        for path in want:
            twin = tmp_path / other / path.relative_to(tmp_path / "local")
            if path.suffix == ".npy":
                np.testing.assert_allclose(np.load(twin), np.load(path), rtol=0, atol=2e-3)
            elif path.suffix == ".parquet":
                assert pd.read_parquet(twin).equals(pd.read_parquet(path)), twin
            else:
                assert json.loads(twin.read_text()) == json.loads(path.read_text())


def test_fit_on_ray_needs_embeddings_and_a_frozen_backbone(small_shards, tmp_path):
    pytest.importorskip("ray", reason="the check comes after the one for Ray itself")
    result = run_cli("fit", small_shards, "--out", tmp_path / "m", "--engine", "ray", ok=False)
    assert result.exit_code == 1 and "trains its backbone" in result.output
    result = run_cli(
        "fit", small_shards, "--out", tmp_path / "m", "--engine", "ray", "--set", "pretrained=x.pt", ok=False
    )
    assert result.exit_code == 1 and "needs --embeddings DIR" in result.output


@needs_ray
def test_unreachable_ray_address_is_one_line(small_shards, small_model, tmp_path):
    result = run_cli(
        "score", small_shards, "--model", small_model, "--out", tmp_path / "r", "--engine", "ray",
        "--ray-address", "127.0.0.1:9", ok=False,
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--ray-address 127.0.0.1:9: no Ray cluster reachable" in lines[0], result.output
    assert not (tmp_path / "r").exists()  # refused before any work


@needs_ray
def test_dedup_on_ray_writes_the_local_parts(ray_session, pool, tmp_path):
    run_cli("dedup", *pool, "--out", tmp_path / "local", "-q")
    run_cli("dedup", *pool, "--out", tmp_path / "ray", "--engine", "ray", "-q")
    parts = sorted(p.name for p in (tmp_path / "local").glob("*.parquet"))
    assert len(parts) == 4 and parts == sorted(p.name for p in (tmp_path / "ray").glob("*.parquet"))
    for name in parts:
        assert pd.read_parquet(tmp_path / "ray" / name).equals(pd.read_parquet(tmp_path / "local" / name)), name
    assert _files(tmp_path / "ray" / ".hashes").keys() == _files(tmp_path / "local" / ".hashes").keys()
    assert json.loads((tmp_path / "ray" / "_dedup.json").read_text())["rows"] == 96 + len(MESSY_STATUSES)
