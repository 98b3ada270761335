"""Speed benchmark: ncleaner's steps against a bare open_clip loop and a plain copy, on a generated pool.

    python pipelines/benchmark_speed.py                 # the full run: ViT-B-32, 1,000 pairs, scales 1,4,16
    python pipelines/benchmark_speed.py --quick         # CI size: tiny backbone, 64 pairs, scales 1,2

The backbone's weights are random (open_clip's initialisation with a fixed seed, saved once as a local
checkpoint under --cache-dir and given as --pretrained, i.e. the frozen regime a pretrained backbone
gets): the speed is real, the quality meaningless. The pool is generated shards (ncleaner.synthetic,
--image-size pixels, img2dataset's default resize being 256) replicated under new shard names and
keys. Every step runs as its own process (``python -m ncleaner ...``, pipelines/bare_clip_score.py),
with --threads torch threads, and is measured from outside: wall time, CPU time, the peak RSS of the
largest process (os.wait4's ru_maxrss) and the peak PSS of its whole process tree (sampled).

Rows (issue 8): 1) score and embed against the bare loop (pairs/s ratio); 2) fit --embeddings then
score --embeddings against fit then score (total time ratio); 3) scoring from embeddings alone
(pairs/s) on the largest pool, from row 2's embeddings replicated as its shards were; 4) fit and
score time and peak memory at each --scales multiple of the pool, with --scale-backbone (the tiny
one by default, so that 16x stays within minutes on 2 cores); every fit gets --max-fit-pairs = the
1x pool; 5) filter against shutil.copyfile of the same shards. A row whose command or option the
installed ncleaner lacks is marked "not available in this version". The results, with the command,
the machine and the date, and an extrapolation to 100 M pairs on one
8-GPU machine, go to --out (markdown) and the same name with .json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import ncleaner  # light: the package imports its modules on first use

HERE = Path(__file__).resolve().parent
BARE = HERE / "bare_clip_score.py"
TINY = "ncleaner-tiny"
PACKAGE = Path(ncleaner.__file__).resolve().parent  # the ncleaner measured: every step imports this one
MODEL_CONFIGS = PACKAGE / "model_configs"
NOT_AVAILABLE = "not available in this version"
OPTIONS = {  # what each row needs beyond fit / score / filter, as (command, option or None for the command)
    "embed": ("embed", None),
    "fit --embeddings": ("fit", "--embeddings"),
    "score --embeddings": ("score", "--embeddings"),
    "fit --max-fit-pairs": ("fit", "--max-fit-pairs"),
    "fit --workers": ("fit", "--workers"),
    "score --workers": ("score", "--workers"),
    "embed --workers": ("embed", "--workers"),
}
# Assumptions of the extrapolation (no GPU on the machine this runs on): say so wherever they are used.
ASSUMED_GPU = "NVIDIA A100 (312 TFLOP/s dense bf16)"
ASSUMED_GPU_PEAK_TFLOPS = 312.0
ASSUMED_GPU_UTILISATION = 0.3
ASSUMED_HOST_CORES = 128  # a DGX A100 has 2 x 64 cores; a DGX H100 2 x 56
TARGET_PAIRS = 100_000_000


def main() -> None:
    if sys.argv[1:2] == ["--helper"]:  # a step that needs torch, run as its own process (see Bench.helper)
        print(json.dumps(HELPERS[sys.argv[2]](*json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B-32", help="open_clip model of rows 1-3 (random weights)")
    parser.add_argument("--scale-backbone", default=TINY, help="open_clip model of row 4 (random weights)")
    parser.add_argument("--pairs", type=int, default=1000, help="pairs in the 1x pool")
    parser.add_argument("--shard-pairs", type=int, default=250, help="pairs per shard")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--scales", default="1,4,16", help="pool multiples of row 4")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every step")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="ncleaner's --workers (default: its own); the bare loop decodes inline",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="encode batch of score, embed and the bare loop")
    parser.add_argument("--epochs", type=int, default=None, help="fit --epochs (default: ncleaner's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the data")
    parser.add_argument("--quick", action="store_true", help="CI size: tiny backbone, 64 pairs, scales 1,2, 1 epoch")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ncleaner-bench"))
    parser.add_argument("--workdir", default=None, help="keep pools, models and reports here (default: temporary)")
    parser.add_argument("--out", default=str(HERE / "results" / "speed_benchmark.md"))
    parser.add_argument("--notes", default=None, help="markdown appended under Notes (why a goal is missed...)")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.pairs, args.shard_pairs, args.image_size = TINY, 64, 32, 64
        args.scales, args.epochs, args.batch_size = "1,2", 1, 32
    scales = sorted({int(s) for s in args.scales.split(",")})
    if scales[0] != 1:
        parser.error("--scales must include 1 (the pool the other rows use)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ncleaner-speed-")).resolve()
    args.cache_dir = str(Path(args.cache_dir).resolve())
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    bench.run_all(scales)
    bench.write(Path(args.out))
    failed = [r for r in bench.rows if isinstance(r["value"], str) and r["value"].startswith("failed")]
    if failed:
        sys.exit(f"{len(failed)} row(s) failed: " + "; ".join(f"{r['row']}: {r['value']}" for r in failed))


@dataclass
class Run:
    """One measured process."""

    name: str
    command: list[str]
    wall_s: float
    cpu_s: float
    max_rss_mb: float  # the largest single process (the step or a reaped child of it)
    tree_pss_mb: float  # the whole process tree, sampled every 0.1 s
    pairs: int
    returncode: int
    tail: str

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.wall_s


class StepFailed(RuntimeError):
    pass


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH")) if p)
        self.available = {name: self._has(cmd, opt) for name, (cmd, opt) in OPTIONS.items()}
        self.runs: dict[str, Run] = {}
        self.rows: list[dict] = []
        self.scale_rows: list[dict] = []
        self.facts: dict = {}
        self.prepared: dict = {}
        self.scale_summary: dict = {}

    # ---- measurement -------------------------------------------------------------------------

    def _has(self, command: str, option: str | None) -> bool:
        help_command = [sys.executable, "-m", "ncleaner", command, "--help"]
        done = subprocess.run(help_command, env=self.env, cwd=self.work, capture_output=True, text=True)
        if done.returncode != 0:
            return False
        return option is None or re.search(rf"(^|[\s,]){re.escape(option)}\b", done.stdout) is not None

    def measure(self, name: str, command: list[str], pairs: int) -> Run:
        """Run ``command`` to the end; its wall time, CPU time and peak memory from outside."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.work)
            sampler = PssSampler(proc.pid)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.stop()
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        run = Run(
            name=name,
            command=command,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            max_rss_mb=usage.ru_maxrss / 1024,
            tree_pss_mb=sampler.peak_kb / 1024,
            pairs=pairs,
            returncode=proc.returncode,
            tail=tail[0][-300:],
        )
        self.runs[name] = run
        print(
            f"  {name}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} CPU s, {run.pairs_per_s:.1f} pairs/s, "
            f"max RSS {run.max_rss_mb:.0f} MB, tree PSS {run.tree_pss_mb:.0f} MB",
            flush=True,
        )
        if run.returncode != 0:
            raise StepFailed(f"{name} exited {run.returncode}: {run.tail} (log: {log})")
        return run

    def ncleaner(self, name: str, pairs: int, *cli: str) -> Run:
        return self.measure(name, [sys.executable, "-m", "ncleaner", *map(str, cli)], pairs)

    # ---- inputs ------------------------------------------------------------------------------

    def helper(self, name: str, *helper_args):
        """Run HELPERS[name] in a new process: this one stays small (no torch), because a child's ru_maxrss
        starts from its parent's peak RSS at fork (Linux keeps it across exec)."""
        command = [sys.executable, str(Path(__file__).resolve()), "--helper", name, json.dumps(helper_args)]
        done = subprocess.run(command, env=self.env, cwd=self.work, capture_output=True, text=True)
        if done.returncode != 0:
            raise StepFailed(f"helper {name} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def prepare(self) -> None:
        """Checkpoints, generated shards, FLOPs and versions: everything that needs torch, in one helper process."""
        a = self.args
        generated = self.work / "generated"
        data = None if generated.exists() else str(generated.with_name("generated.tmp"))
        if data:
            shutil.rmtree(data, ignore_errors=True)
        spec = {"backbones": sorted({a.backbone, a.scale_backbone}), "main": a.backbone, "seed": a.seed}
        spec |= {"cache_dir": a.cache_dir, "data": data, "pairs": a.pairs, "shard_pairs": min(a.shard_pairs, a.pairs)}
        self.prepared = self.helper("prepare", spec | {"image_size": a.image_size})
        if data:
            Path(data).rename(generated)

    def checkpoint(self, backbone: str) -> str:
        return self.prepared["checkpoints"][backbone]

    def pool(self, scale: int) -> tuple[Path, int]:
        """The pool at ``scale`` x: the generated shards replicated under new names and keys."""
        a = self.args
        sources = sorted((self.work / "generated").glob("*.tar"))
        pool = self.work / f"pool_{scale}x"
        if not pool.exists():
            tmp = pool.with_name(pool.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for j in range(scale * len(sources)):
                replicate_shard(sources[j % len(sources)], tmp / f"{j:05d}.tar", f"{j:05d}")
            tmp.rename(pool)
        return pool, scale * a.pairs

    def fit_args(self, backbone: str) -> list[str]:
        a = self.args
        extra = ["--epochs", a.epochs] if a.epochs else []
        if not self.missing("fit --max-fit-pairs"):  # the 1x pool: every fit samples at most that many pairs
            extra += ["--max-fit-pairs", a.pairs]
        return ["--set", f"backbone={backbone}", "--set", f"pretrained={self.checkpoint(backbone)}", *extra, "-q"]

    def workers(self, option: str) -> list[str]:
        w = self.args.workers
        return ["--workers", str(w)] if w is not None and self.available[option] else []

    # ---- rows --------------------------------------------------------------------------------

    def run_all(self, scales: list[int]) -> None:
        a = self.args
        for old in ["models", "reports", "filtered", "rejected", "copy", "logs", *self.work.glob("emb_*")]:
            shutil.rmtree(self.work / old, ignore_errors=True)  # outputs of an earlier run in --workdir: redo all
        self.prepare()
        pool, pairs = self.pool(1)
        self.facts = self.describe_inputs(pool, pairs)
        print(f"pool {pool}: {pairs} pairs; backbone {a.backbone}, threads {a.threads}", flush=True)
        self.guard("import", self.measure_imports)
        self.guard("1a", self.row_score_vs_bare, pool, pairs)
        self.guard("1b", self.row_embed_vs_bare, pool, pairs)
        self.guard("2", self.row_embeddings_reuse, pool, pairs)
        self.guard("3", self.row_score_from_embeddings, scales)
        self.guard("4", self.rows_scale, scales)
        self.guard("5", self.row_filter_vs_copy)

    def guard(self, row: str, fn, *fn_args) -> None:
        """Run one row; a failure marks it failed (and the harness exits non-zero) instead of stopping the rest."""
        try:
            fn(*fn_args)
        except Exception as exc:  # a bug or a failed step: the row says so, the harness exits non-zero
            if not isinstance(exc, StepFailed):
                traceback.print_exc()
            print(f"  row {row} failed: {exc}", flush=True)
            self.rows = [r for r in self.rows if r["row"] != row]
            self.add(row, "failed", f"failed: {exc}", "", "")

    def add(self, row: str, what: str, value, unit: str, goal: str, **detail) -> None:
        verdict = against_goal(value, goal)
        self.rows.append({"row": row, "what": what, "value": value, "unit": unit, "goal": goal, **detail, **verdict})

    def missing(self, *options: str) -> list[str]:
        return [o for o in options if not self.available[o]]

    def bare(self, name: str, pool: Path, pairs: int) -> Run:
        """The bare loop as a user writes it: everything in one process (its own --workers left at 0)."""
        a = self.args
        cmd = [sys.executable, str(BARE), *tar_list(pool), "--model", a.backbone]
        cmd += ["--pretrained", str(self.checkpoint(a.backbone)), "--batch-size", str(a.batch_size)]
        cmd += ["--threads", str(a.threads), "--out", str(self.work / f"{name}.parquet")]
        cmd += ["--timing", str(self.work / f"{name}.timing.json")]
        if a.backbone == TINY:
            cmd += ["--model-config-dir", str(MODEL_CONFIGS)]
        run = self.measure(name, cmd, pairs)
        self.facts["bare_timing"] = json.loads((self.work / f"{name}.timing.json").read_text())
        return run

    def fitted_model(self, pool: Path, pairs: int, backbone: str, tag: str) -> Run:
        """fit on ``pool`` (once per tag); rows 1a, 2 and 4 share it."""
        if f"fit_{tag}" in self.runs:
            return self.runs[f"fit_{tag}"]
        cli = ["fit", pool, "--out", self.work / "models" / tag, *self.fit_args(backbone), "--force"]
        return self.ncleaner(f"fit_{tag}", pairs, *cli, *self.workers("fit --workers"))

    def scored(self, pool: Path, pairs: int, tag: str) -> Run:
        if f"score_{tag}" in self.runs:
            return self.runs[f"score_{tag}"]
        cli = ["score", pool, "--model", self.work / "models" / tag, "--out", self.work / "reports" / tag]
        cli += ["--batch-size", self.args.batch_size, "--overwrite", "-q"]
        return self.ncleaner(f"score_{tag}", pairs, *cli, *self.workers("score --workers"))

    def row_score_vs_bare(self, pool: Path, pairs: int) -> None:
        bare = self.bare("bare", pool, pairs)
        self.fitted_model(pool, pairs, self.args.backbone, "main")
        score = self.scored(pool, pairs, "main")
        measured = f"{score.pairs_per_s:.2f} vs {bare.pairs_per_s:.2f} pairs/s"
        what = "`score` pairs/s ÷ bare loop pairs/s"
        self.add("1a", what, score.pairs_per_s / bare.pairs_per_s, "x", "≥ 0.9", measured=measured)

    def row_embed_vs_bare(self, pool: Path, pairs: int) -> None:
        what, goal = "`embed` pairs/s ÷ bare loop pairs/s", "≥ 1.0"
        if self.missing("embed"):
            return self.add("1b", what, NOT_AVAILABLE, "", goal, needs=self.missing("embed"))
        bare = self.runs.get("bare") or self.bare("bare", pool, pairs)
        a = self.args
        cli = ["embed", pool, "--backbone", a.backbone, "--pretrained", self.checkpoint(a.backbone)]
        cli += ["--out", self.work / "emb_embed", "--batch-size", a.batch_size, "-q"]
        embed = self.ncleaner("embed", pairs, *cli, *self.workers("embed --workers"))
        measured = f"{embed.pairs_per_s:.2f} vs {bare.pairs_per_s:.2f} pairs/s"
        self.add("1b", what, embed.pairs_per_s / bare.pairs_per_s, "x", goal, measured=measured)

    def row_embeddings_reuse(self, pool: Path, pairs: int) -> None:
        what, goal = "(`fit` + `score`) time ÷ (`fit --embeddings` + `score --embeddings`) time", "close to 2"
        missing = self.missing("fit --embeddings", "score --embeddings")
        if missing:
            return self.add("2", what, NOT_AVAILABLE, "", goal, needs=missing)
        fit, score = self.fitted_model(pool, pairs, self.args.backbone, "main"), self.scored(pool, pairs, "main")
        emb, model = self.work / "emb_reuse", self.work / "models" / "emb"
        cli = ["fit", pool, "--out", model, "--embeddings", emb, *self.fit_args(self.args.backbone), "--force"]
        fit_e = self.ncleaner("fit_embeddings", pairs, *cli, *self.workers("fit --workers"))
        cli = ["score", pool, "--model", model, "--embeddings", emb, "--out", self.work / "reports" / "emb"]
        cli += ["--batch-size", self.args.batch_size, "--overwrite", "-q"]
        score_e = self.ncleaner("score_embeddings", pairs, *cli, *self.workers("score --workers"))
        plain, reuse = fit.wall_s + score.wall_s, fit_e.wall_s + score_e.wall_s
        measured = f"{fit.wall_s:.1f} + {score.wall_s:.1f} s vs {fit_e.wall_s:.1f} + {score_e.wall_s:.1f} s"
        self.add("2", what, plain / reuse, "x", goal, measured=measured)

    def row_score_from_embeddings(self, scales: list[int]) -> None:
        """score --embeddings on the largest pool, from row 2's embeddings replicated as the pool's shards are."""
        scale = scales[-1]
        pool, pairs = self.pool(scale)
        what = f"`score --embeddings` at {scale}x ({pairs} pairs) from complete embeddings "
        what += "(heads, bank, calibration, Parquet; no decode, no encode)"
        missing = self.missing("fit --embeddings", "score --embeddings")
        if missing:
            return self.add("3", what, NOT_AVAILABLE, "", "report", needs=missing)
        if "score_embeddings" not in self.runs:
            raise StepFailed("row 2 did not produce the embeddings and model this row scores with")
        emb = self.work / f"emb_{scale}x"
        shards = len(tar_list(self.pool(1)[0]))
        self.helper("replicate_embeddings", str(self.work / "emb_reuse"), str(emb), str(pool), shards, scale)
        cli = ["score", pool, "--model", self.work / "models" / "emb", "--embeddings", emb]
        cli += ["--out", self.work / "reports" / f"emb_{scale}x", "--batch-size", self.args.batch_size, "-q"]
        run = self.ncleaner(f"score_embeddings_{scale}x", pairs, *cli, *self.workers("score --workers"))
        if "encoding it again" in run.tail:  # the replicated parts were not matched: this was not scoring alone
            raise StepFailed(f"score did not find the replicated embeddings: {run.tail}")
        cpu = net(run, self.runs.get("import_score"))
        measured = f"{run.wall_s:.1f} s wall, {run.cpu_s:.1f} CPU s with process start and imports, "
        measured += f"{cpu:.1f} CPU s without ({pairs / cpu if cpu else float('inf'):,.0f} pairs a CPU second)"
        self.add(
            "3",
            what,
            run.pairs_per_s,
            "pairs/s",
            "report",
            measured=measured,
            pairs_per_cpu_s_net=pairs / cpu if cpu else None,
        )

    def rows_scale(self, scales: list[int]) -> None:
        a = self.args
        sample = "" if self.missing("fit --max-fit-pairs") else f", `--max-fit-pairs {a.pairs}`"
        for scale in scales:
            pool, pairs = self.pool(scale)
            tag = "main" if (scale == 1 and a.scale_backbone == a.backbone) else f"scale{scale}"
            fit = self.fitted_model(pool, pairs, a.scale_backbone, tag)
            score = self.scored(pool, pairs, tag)
            self.scale_rows.append({"scale": scale, "pairs": pairs, "fit": asdict(fit), "score": asdict(score)})
            for step, run in (("fit", fit), ("score", score)):
                what = f"`{step}` at {scale}x ({pairs} pairs, {a.scale_backbone}{sample if step == 'fit' else ''})"
                measured = f"{run.pairs_per_s:.1f} pairs/s, max RSS {run.max_rss_mb:.0f} MB, "
                measured += f"tree PSS {run.tree_pss_mb:.0f} MB"
                memory = {"peak_rss_mb": run.max_rss_mb, "tree_pss_mb": run.tree_pss_mb}
                self.add(f"4 {step} {scale}x", what, run.wall_s, "s", "linear in pairs", measured=measured, **memory)
        self.scale_summary = scale_summary(self.scale_rows, a.pairs)

    def row_filter_vs_copy(self) -> None:
        """filter on the largest pool of row 4, with its report, against copying its shards."""
        scale, pairs = self.scale_rows[-1]["scale"], self.scale_rows[-1]["pairs"]
        pool, _ = self.pool(scale)
        tag = "main" if (scale == 1 and self.args.scale_backbone == self.args.backbone) else f"scale{scale}"
        shards = tar_list(pool)
        mb = sum(os.path.getsize(s) for s in shards) / 1e6
        copy_dir = self.work / "copy"
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir()
        script = "import shutil, sys\nfor s in sys.argv[2:]: shutil.copyfile(s, sys.argv[1] + '/' + s.split('/')[-1])"
        copy = self.measure("copy", [sys.executable, "-c", script, str(copy_dir), *shards], pairs)
        cli = ["filter", pool, "--report", self.work / "reports" / tag, "--out", self.work / "filtered", "--auto"]
        filt = self.ncleaner("filter", pairs, *cli, "--rejected-out", self.work / "rejected", "--force", "-q")
        what = "`filter --auto --rejected-out` (every pair written) pairs/s ÷ `shutil.copyfile` pairs/s "
        what += f"({pairs} pairs, {mb:.0f} MB)"
        measured = f"{filt.wall_s:.2f} s ({mb / filt.wall_s:.0f} MB/s) vs {copy.wall_s:.2f} s "
        measured += f"({mb / copy.wall_s:.0f} MB/s), each a new process; filter's CPU s without its imports: "
        measured += f"{net(filt, self.runs.get('import_filter')):.2f}"
        self.add("5", what, filt.pairs_per_s / copy.pairs_per_s, "x", "report", measured=measured)

    def measure_imports(self) -> None:
        code = "import ncleaner.scoring, ncleaner.fitting"
        self.measure("import_score", [sys.executable, "-c", code], 0)
        code = "import sys, ncleaner.filtering; print('torch imported:', 'torch' in sys.modules)"
        run = self.measure("import_filter", [sys.executable, "-c", code], 0)
        self.facts["filter_imports_torch"] = "True" in run.tail

    # ---- inputs and results ------------------------------------------------------------------

    def describe_inputs(self, pool: Path, pairs: int) -> dict:
        shards = tar_list(pool)
        return {
            "pool_pairs": pairs,
            "pool_shards": len(shards),
            "bytes_per_pair": sum(os.path.getsize(s) for s in shards) / pairs,
            "backbone": self.prepared["backbone"],
            "options": self.available,
        }

    def write(self, out: Path) -> None:
        a = self.args
        command = " ".join(shlex.quote(x) for x in ["python", *sys.argv])
        machine = {**machine_info(), **self.prepared["versions"]}
        settings = {
            "backbone": a.backbone,
            "scale_backbone": a.scale_backbone,
            "pairs": a.pairs,
            "shard_pairs": a.shard_pairs,
            "image_size": a.image_size,
            "scales": a.scales,
            "threads": a.threads,
            "workers": a.workers,
            "batch_size": a.batch_size,
            "epochs": a.epochs,
            "seed": a.seed,
        }
        extrapolation = self.extrapolate()
        doc = {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine,
            "settings": settings,
            "inputs": self.facts,
            "rows": self.rows,
            "scale": self.scale_rows,
            "scale_summary": self.scale_summary,
            "runs": {k: asdict(v) for k, v in self.runs.items()},
            "extrapolation": extrapolation,
            "notes": Path(a.notes).read_text() if a.notes else "",
        }
        text = markdown(doc)
        print()
        print(text)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"written to {out} and {out.with_suffix('.json')}")

    def extrapolate(self) -> dict:
        """Per-pair costs measured here, scaled to TARGET_PAIRS on one 8-GPU machine (GPU side assumed)."""
        runs, facts = self.runs, self.facts
        timing = facts.get("bare_timing")
        if not timing or not timing["pairs"] or "backbone" not in facts:
            return {}
        pairs = timing["pairs"]
        decode_cpu = timing["prepare_cpu_s"] / pairs  # CPU-seconds a pair: read, decode, preprocess, tokenise
        encode_cpu = timing["encode_cpu_s"] / pairs
        flops = facts["backbone"]["flops_per_pair"]
        gpu_rate = ASSUMED_GPU_PEAK_TFLOPS * 1e12 * ASSUMED_GPU_UTILISATION / flops  # pairs/s per GPU
        machine_gpu_rate = 8 * gpu_rate
        cores_needed = machine_gpu_rate * decode_cpu
        cpu_rate = ASSUMED_HOST_CORES / decode_cpu  # pairs/s the host's cores decode
        rate = min(machine_gpu_rate, cpu_rate)
        heads_cpu = None
        from_embeddings = [r for name, r in runs.items() if name.startswith("score_embeddings")]
        if from_embeddings and "import_score" in runs:  # the largest of them: imports weigh least there
            run = max(from_embeddings, key=lambda r: r.pairs)
            heads_cpu = net(run, runs["import_score"]) / run.pairs
        dim = facts["backbone"]["embed_dim"]
        return {
            "decode_cpu_s_per_pair": decode_cpu,
            "encode_cpu_s_per_pair_here": encode_cpu,
            "heads_cpu_s_per_pair_from_embeddings": heads_cpu,
            "flops_per_pair": flops,
            "assumed_gpu": ASSUMED_GPU,
            "assumed_utilisation": ASSUMED_GPU_UTILISATION,
            "assumed_host_cores": ASSUMED_HOST_CORES,
            "gpu_pairs_per_s_each": gpu_rate,
            "gpus_pairs_per_s": machine_gpu_rate,
            "cores_needed_to_feed_gpus": cores_needed,
            "host_decode_pairs_per_s": cpu_rate,
            "bottleneck": "decode CPU cores" if cpu_rate < machine_gpu_rate else "GPU encode",
            "pairs_per_s": rate,
            "hours_per_encode_pass": TARGET_PAIRS / rate / 3600,
            "embed_dim": dim,
            "embeddings_gb": TARGET_PAIRS * dim * 2 * 2 / 1e9,
            "pool_tb": TARGET_PAIRS * facts["bytes_per_pair"] / 1e12,
        }


class PssSampler(threading.Thread):
    """Peak total PSS of a process and its descendants, read from /proc every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in process_tree(self.pid)))
            self._stop_event.wait(0.1)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def net(run: Run, imports: Run | None) -> float:
    """CPU seconds of ``run`` without those of importing its modules (measured on their own)."""
    return max(run.cpu_s - (imports.cpu_s if imports else 0.0), 0.0)


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def replicate_shard(source: Path, target: Path, prefix: str) -> None:
    """Copy a generated shard with every key's shard prefix (its first 5 digits) replaced, bytes unchanged."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            info.name = prefix + info.name[5:]
            dst.addfile(info, io.BytesIO(data))


def tar_list(pool: Path) -> list[str]:
    return [str(p) for p in sorted(pool.glob("*.tar"))]


def random_checkpoint(backbone: str, seed: int, cache_dir: str) -> str:
    """open_clip's random initialisation of ``backbone`` with ``seed``, saved once as a local checkpoint.

    The stand-in for pretrained weights: the same shapes and compute, meaningless features.
    """
    import open_clip
    import torch

    path = Path(cache_dir) / f"{backbone}-random-seed{seed}.pt"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(seed)
    model = open_clip.create_model(backbone, pretrained=None)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    open_clip.create_model_and_transforms(backbone, pretrained=str(tmp))  # it loads as --pretrained
    os.replace(tmp, path)
    return str(path)


def backbone_facts(backbone: str, checkpoint: str) -> dict:
    """FLOPs of one image and one full-length caption (torch's FLOP counter), and the feature width."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    open_clip.add_model_config(MODEL_CONFIGS)
    model = open_clip.create_model(backbone, pretrained=checkpoint).eval()
    context = int(getattr(model, "context_length", 77))
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.encode_image(torch.zeros(1, 3, *size))
        out = model.encode_text(torch.zeros(1, context, dtype=torch.long))
    return {
        "flops_per_pair": float(counter.get_total_flops()),
        "embed_dim": int(out.shape[-1]),
        "image_size": list(size),
        "context_length": context,
    }


def generate(out: str, pairs: int, shard_pairs: int, image_size: int, seed: int) -> int:
    """Generated shards with 20 % permuted captions (ncleaner.synthetic), images of ``image_size`` px."""
    from ncleaner.synthetic import SceneGenerator, write_synthetic_shards

    return len(write_synthetic_shards(out, pairs, shard_pairs, 0.2, seed, SceneGenerator(image_size=image_size)))


def versions() -> dict:
    import open_clip
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "gpu": gpu}


def prepare(spec: dict) -> dict:
    """The torch side of Bench.prepare, in its own process."""
    checkpoints = {b: random_checkpoint(b, spec["seed"], spec["cache_dir"]) for b in spec["backbones"]}
    if spec["data"]:
        generate(spec["data"], spec["pairs"], spec["shard_pairs"], spec["image_size"], spec["seed"])
    facts = backbone_facts(spec["main"], checkpoints[spec["main"]])
    return {"checkpoints": checkpoints, "backbone": facts, "versions": versions()}


def replicate_embeddings(source: str, target: str, pool: str, shards: int, scale: int) -> int:
    """Row 2's embeddings (one part per shard of the 1x pool) as the parts of the ``scale`` x pool.

    Parts are named after their shard and their rows joined on the sample key, so each copy gets
    its shard's name and the keys replicate_shard gave it; the arrays are copied as they are.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ncleaner.embeddings import rows_digest

    src, dst = Path(source), Path(target)
    for sub in ("img_emb", "text_emb", "metadata", "skipped"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "embeddings.json", dst / "embeddings.json")
    for j in range(scale * shards):
        old, new = f"{j % shards:05d}", f"{j:05d}"
        for sub in ("img_emb", "text_emb"):
            shutil.copyfile(src / sub / f"{sub}_{old}.npy", dst / sub / f"{sub}_{new}.npy")
        for sub in ("skipped", "metadata"):  # metadata last: it marks a part complete
            path = src / sub / f"{sub}_{old}.parquet"
            if not path.exists():
                continue
            table = pq.read_table(path)
            for column, values in (
                ("image_path", [new + k[5:] for k in table.column("image_path").to_pylist()]),
                ("shard", [str(Path(pool) / f"{new}.tar")] * table.num_rows),
            ):
                if column in table.column_names:
                    i = table.column_names.index(column)
                    table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
            if sub == "metadata":  # what the part records of its rows follows the new keys
                info = json.loads(table.schema.metadata[b"ncleaner"])
                arrays = [np.load(dst / s / f"{s}_{new}.npy") for s in ("img_emb", "text_emb")]
                keys, sha1s = table.column("image_path").to_pylist(), table.column("image_sha1").to_pylist()
                info.update(shard=str(Path(pool) / f"{new}.tar"), fingerprint=None)
                info["rows_sha256"] = rows_digest(keys, sha1s, *arrays)
                table = table.replace_schema_metadata({b"ncleaner": json.dumps(info).encode()})
            pq.write_table(table, dst / sub / f"{sub}_{new}.parquet")
    return scale * shards


HELPERS = {"prepare": prepare, "replicate_embeddings": replicate_embeddings}


def scale_summary(scale_rows: list[dict], fit_sample: int) -> dict:
    """Time per pair at the largest scale against 1x, and memory growth per 1,000 pairs beyond the fit sample."""
    first, last = scale_rows[0], scale_rows[-1]
    summary = {}
    for step in ("fit", "score"):
        a, b = first[step], last[step]
        extra = b["pairs"] - a["pairs"]
        summary[step] = {
            "seconds_per_pair_1x": a["wall_s"] / a["pairs"],
            "seconds_per_pair_largest": b["wall_s"] / b["pairs"],
            "rss_mb_per_1000_pairs": (b["max_rss_mb"] - a["max_rss_mb"]) / extra * 1000 if extra else None,
            "pss_mb_per_1000_pairs": (b["tree_pss_mb"] - a["tree_pss_mb"]) / extra * 1000 if extra else None,
        }
    summary["fit_sample"] = fit_sample
    return summary


def machine_info() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": nproc,
        "cpu": cpu,
        "ram_gib": round(ram_gb, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ncleaner": ncleaner.__version__,
        "ncleaner_commit": git_commit(),
    }


def git_commit() -> str:
    """The commit of the measured ncleaner's checkout, +dirty when its package has uncommitted changes."""
    git = ["git", "-C", str(PACKAGE)]
    done = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---- markdown ------------------------------------------------------------------------------------


def against_goal(value, goal: str) -> dict:
    """For a numeric goal ("≥ 0.9", "close to 2"): met or not, and by how much."""
    if isinstance(value, str):
        return {}
    if goal.startswith("≥ "):
        target = float(goal[2:])
        met = value >= target
        return {"met": met, "verdict": "met" if met else f"missed by {(target - value) / target:.0%}"}
    if goal.startswith("close to "):
        target = float(goal[len("close to ") :])
        met = value >= 0.9 * target
        return {"met": met, "verdict": f"{value / target:.0%} of {target:g}x" + ("" if met else ", missed")}
    return {}


def fmt(value, unit: str = "") -> str:
    if isinstance(value, str):
        return value
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g} {unit}".strip() if value < 100 else f"{value:,.0f} {unit}".strip()


def markdown(doc: dict) -> str:
    m, s, facts = doc["machine"], doc["settings"], doc["inputs"]
    workers = s["workers"] if s["workers"] is not None else "(ncleaner's default; bare loop in-process)"
    lines = [
        "# Speed benchmark",
        "",
        f"Command: `{doc['command']}`",
        f"Date: {doc['date']}. ncleaner {m['ncleaner']} at {m['ncleaner_commit']}.",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, GPU: {m['gpu']}; {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, open_clip {m['open_clip']}.",
        f"Settings: backbone `{s['backbone']}` with random weights saved as a local checkpoint (frozen, as a "
        f"pretrained one would be); {facts['pool_pairs']} pairs in {facts['pool_shards']} shards "
        f"({s['image_size']} px JPEGs, {facts['bytes_per_pair'] / 1e3:.1f} kB a pair); batch size "
        f"{s['batch_size']}; {s['threads']} torch threads; --workers {workers}; "
        f"fit epochs {s['epochs'] or '(default)'}. Row 4: `{s['scale_backbone']}` backbone, scales {s['scales']}.",
        "",
        "Every step is a new process measured from outside: wall time (process start, imports and model load "
        "included), CPU time, peak RSS of the largest process (`os.wait4`), peak PSS of the process tree.",
        "",
        "| row | what | value | goal | against the goal | measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        note = r.get("measured", "")
        if r["value"] == NOT_AVAILABLE:
            note = "needs " + ", ".join(f"`{n}`" for n in r.get("needs", []))
        value, verdict = fmt(r["value"], r["unit"]), r.get("verdict", "")
        lines.append(f"| {r['row']} | {r['what']} | {value} | {r['goal']} | {verdict} | {note} |")
    lines += ["", "## Every process", "", "| step | pairs | wall s | pairs/s | CPU s | max RSS MB | tree PSS MB |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name, r in doc["runs"].items():
        rate = f"{r['pairs'] / r['wall_s']:.1f}" if r["pairs"] else ""
        lines.append(
            f"| {name} | {r['pairs']} | {r['wall_s']:.1f} | {rate} | {r['cpu_s']:.1f} | {r['max_rss_mb']:.0f} "
            f"| {r['tree_pss_mb']:.0f} |"
        )
    summary = doc["scale_summary"]
    if summary:
        lines += ["", "## Growth with the pool (row 4)", ""]
        for step in ("fit", "score"):
            g = summary[step]
            lines.append(
                f"- `{step}`: {g['seconds_per_pair_1x'] * 1e3:.2f} ms a pair at 1x, "
                f"{g['seconds_per_pair_largest'] * 1e3:.2f} ms at the largest scale; peak memory grows by "
                f"{g['rss_mb_per_1000_pairs']:.2f} MB (RSS) / {g['pss_mb_per_1000_pairs']:.2f} MB (tree PSS) "
                f"per 1,000 pairs beyond 1x (fit sample: {summary['fit_sample']} pairs)."
            )
    if "filter_imports_torch" in facts:
        lines.append(f"- `import ncleaner.filtering` imports torch: {facts['filter_imports_torch']}.")
    lines += ["", "## Extrapolation to 100 M pairs on one 8-GPU machine", "", *extrapolation_text(doc)]
    if doc.get("notes"):
        lines += ["", "## Notes", "", doc["notes"].strip()]
    return "\n".join(lines) + "\n"


def extrapolation_text(doc: dict) -> list[str]:
    x = doc["extrapolation"]
    if not x:
        return ["Not computed: the bare loop's run is missing."]
    n = TARGET_PAIRS
    heads = x["heads_cpu_s_per_pair_from_embeddings"]
    lines = [
        f"Measured here ({doc['settings']['backbone']}, CPU): reading, decoding, preprocessing and tokenising cost "
        f"**{x['decode_cpu_s_per_pair'] * 1e3:.2f} ms CPU a pair** (the bare loop without its encode); the encode "
        f"costs {x['encode_cpu_s_per_pair_here'] * 1e3:.0f} ms CPU a pair on this CPU; one pair (image + "
        f"full-length caption) is **{x['flops_per_pair'] / 1e9:.2f} GFLOP** (torch's FLOP counter)."
        + (
            f" Scoring from embeddings costs {heads * 1e3:.3f} ms CPU a pair (net of imports)."
            if heads is not None
            else ""
        ),
        "",
        f"Assumed, not measured (no GPU on this machine): an {x['assumed_gpu']} sustaining "
        f"{x['assumed_utilisation']:.0%} of peak on this encode, and {x['assumed_host_cores']} host cores.",
        "",
        f"- GPU side: {ASSUMED_GPU_PEAK_TFLOPS:.0f}e12 x {x['assumed_utilisation']} / {x['flops_per_pair']:.3g} "
        f"= {x['gpu_pairs_per_s_each']:,.0f} pairs/s a GPU; x 8 = **{x['gpus_pairs_per_s']:,.0f} pairs/s**.",
        f"- CPU side: {x['assumed_host_cores']} cores / {x['decode_cpu_s_per_pair'] * 1e3:.2f} ms = "
        f"**{x['host_decode_pairs_per_s']:,.0f} pairs/s**; feeding 8 GPUs would take "
        f"{x['gpus_pairs_per_s']:,.0f} x {x['decode_cpu_s_per_pair'] * 1e3:.2f} ms = "
        f"{x['cores_needed_to_feed_gpus']:,.0f} cores.",
        f"- So **{x['bottleneck']}** run out first: one encode pass over {n / 1e6:.0f} M pairs takes "
        f"{n:.0e} / {x['pairs_per_s']:,.0f} = **{x['hours_per_encode_pass']:.1f} h**. With `fit --embeddings` "
        "then `score --embeddings` that is the whole job's encode (once); without, `fit` and `score` each "
        f"encode, {2 * x['hours_per_encode_pass']:.1f} h.",
        f"- Disk: the pool is {n:.0e} x {doc['inputs']['bytes_per_pair'] / 1e3:.1f} kB = "
        f"{x['pool_tb']:.2f} TB read per pass; embeddings are {n:.0e} x {x['embed_dim']} x 2 towers x 2 bytes "
        f"(float16) = {x['embeddings_gb']:.0f} GB.",
    ]
    if heads is not None:
        lines.append(
            f"- Scoring from embeddings on the host CPU: {n:.0e} x {heads * 1e3:.3f} ms / "
            f"{x['assumed_host_cores']} cores = {n * heads / x['assumed_host_cores'] / 3600:.2f} h."
        )
    lines.append(
        "- Caveat: the generated images are small, flat JPEGs; real photographs at the same size decode slower "
        "and real pools are often stored larger than 256 px, which moves the balance further towards decode."
    )
    return lines


if __name__ == "__main__":
    main()
