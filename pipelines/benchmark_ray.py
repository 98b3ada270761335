"""Ray engine benchmark: ``score`` and ``filter`` with --engine local against --engine ray on this machine,
per-stage rates, and a scaling model for N GPU workers built from them.

    python pipelines/benchmark_ray.py                   # ViT-B-32 (random weights), 4 x 48 pairs; tiny, 8 x 200
    python pipelines/benchmark_ray.py --quick           # a smoke run: tiny backbone only, 2 x 16 pairs

Each command runs as its own process (``python -m ncleaner ...``) and is timed from outside; --engine ray
starts a local Ray for the run (no --ray-address), as a user on one machine would, so its start-up is
part of the time. Both engines score the same pool with the same model and batch size; the reports
are checked to agree before a number is written. Rows:

1. score, ViT-B-32 (open_clip's random initialisation saved as a local checkpoint: speed real, quality
   meaningless): local against Ray, the ratio of their pairs/s.
2. score, the tiny demo backbone on a larger pool: the same, where encoding is cheap and Ray's fixed
   costs show.
3. filter (--keep-fraction 0.8 with --rejected-out) local against Ray; the outputs are checked byte
   for byte.
4. Stage rates measured in one process on one core: reading + decoding + preprocessing (pairs/s per
   core), encoding with each backbone (pairs/s per core), writing one shard's report part; and Ray's
   fixed costs: ``ray.init`` of a local Ray, and an actor's start (process, imports, model load).

From these, the scaling model (in the results file) for N GPU workers; the GPU's encode rate is not
measured here (no GPU on this machine): it is an assumption, labelled as such, taken from
benchmark_speed.py's. Results go to --out (markdown) and the same name with .json, with the command,
the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmark_speed as speed  # the sibling benchmark: checkpoints, generated pools, machine facts

HERE = Path(__file__).resolve().parent
TINY = speed.TINY


def run(name: str, command: list, env: dict, log_dir: Path) -> float:
    """Wall seconds of ``command`` run to the end (its output goes to LOG_DIR/NAME.log)."""
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        start = time.perf_counter()
        done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} exited {done.returncode}: {log.read_text()[-800:]}")
    print(f"  {name}: {wall:.1f} s", flush=True)
    return wall


def same_report(a: Path, b: Path) -> None:
    """The two engines' reports agree (rows, keys, statuses; scores within float tolerance)."""
    import numpy as np
    import pandas as pd

    x = pd.read_parquet(a).sort_values(["shard", "index"]).reset_index(drop=True)
    y = pd.read_parquet(b).sort_values(["shard", "index"]).reset_index(drop=True)
    assert x[["key", "shard", "status"]].equals(y[["key", "shard", "status"]]), "reports differ"
    for column in ("clip_sim", "mii_sim", "soft_agreement", "score", "clean_prob"):
        np.testing.assert_allclose(x[column].to_numpy(float), y[column].to_numpy(float), atol=1e-4)


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == sorted(p.name for p in b.glob("*.tar")) and names, "filter outputs differ"
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def stage_rates(spec: dict) -> dict:
    """Per-core rates of the stages of one shard, and Ray's fixed costs (run in its own process)."""
    import torch

    torch.set_num_threads(1)
    import ray

    from ncleaner.backbone import build_backbone
    from ncleaner.decode import decode_blocks
    from ncleaner.embeddings import compute_features
    from ncleaner.encode import Encoder
    from ncleaner.model import NcleanerModel
    from ncleaner.scoring import write_shard_report

    out = {}
    urls = spec["urls"]
    for backbone, checkpoint in spec["checkpoints"].items():
        model = build_backbone(backbone, checkpoint, torch.device("cpu"))
        blocks = decode_blocks(urls, model.preprocess, model.tokenizer, batch_size=32, max_pixels=10**9, threads=1)
        start, pairs, inputs = time.perf_counter(), 0, []
        for block in blocks:
            pairs += len(block.pairs)
            if block.images is not None:
                inputs.append((block.images, block.tokens))
        decode = pairs / (time.perf_counter() - start)
        encoder = Encoder(model, torch.device("cpu"))
        start, encoded = time.perf_counter(), 0
        for images, tokens in inputs[: spec["encode_blocks"]]:
            encoder(images, tokens)
            encoded += len(images)
        out[backbone] = {"decode_pairs_per_s_per_core": decode, "encode_pairs_per_s_per_core": encoded / (
            time.perf_counter() - start)}  # fmt: skip
    model = NcleanerModel.load(spec["tiny_model"], "cpu")
    features = next(
        compute_features(
            urls[:1], model.encoder(), preprocess=model.backbone.preprocess, tokenizer=model.tokenize,
            batch_size=64, workers=0, max_pixels=10**9,
        )
    )  # fmt: skip
    report = Path(spec["scratch"]) / "part"
    report.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_shard_report(model, features, report, "00000")
    out["report_part_write_s"] = time.perf_counter() - start
    out["report_part_pairs"] = len(features)
    start = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=128 << 20, logging_level="error")
    out["ray_init_s"] = time.perf_counter() - start

    class Probe:
        def __init__(self, model_dir):
            from ncleaner.model import NcleanerModel

            self.model = NcleanerModel.load(model_dir, "cpu")

        def ready(self):
            return True

    for name, model_dir in (("tiny", spec["tiny_model"]), ("main", spec["main_model"])):
        start = time.perf_counter()
        actor = ray.remote(Probe).options(num_cpus=1).remote(model_dir)
        ray.get(actor.ready.remote())
        out[f"actor_start_s_{name}"] = time.perf_counter() - start
        ray.kill(actor)
    ray.shutdown()
    return out


def main() -> None:
    if sys.argv[1:2] == ["--helper"]:
        print(json.dumps(stage_rates(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B-32", help="open_clip model of row 1 (random weights)")
    parser.add_argument("--shards", type=int, default=4, help="shards of row 1's pool")
    parser.add_argument("--shard-pairs", type=int, default=48, help="pairs per shard of row 1's pool")
    parser.add_argument("--tiny-shards", type=int, default=8, help="shards of row 2's pool")
    parser.add_argument("--tiny-shard-pairs", type=int, default=200, help="pairs per shard of row 2's pool")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke size: tiny backbone only, 2 x 16 pairs")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ncleaner-bench"))
    parser.add_argument("--workdir", default=None, help="keep pools, models and reports here (default: temporary)")
    parser.add_argument("--out", default=str(HERE / "results" / "ray_benchmark.md"))
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.shards, args.shard_pairs, args.tiny_shards, args.tiny_shard_pairs = TINY, 2, 16, 2, 16
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ncleaner-ray-bench-")).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(speed.PACKAGE.parent), os.environ.get("PYTHONPATH")) if p)
    py = [sys.executable, "-m", "ncleaner"]
    started = time.strftime("%Y-%m-%d %H:%M %Z")

    print("preparing pools and models", flush=True)
    checkpoints = {b: speed.random_checkpoint(b, args.seed, args.cache_dir) for b in {args.backbone, TINY}}
    pools = {}
    sizes = {"main": (args.shards, args.shard_pairs), "tiny": (args.tiny_shards, args.tiny_shard_pairs)}
    for name, (shards, per) in sizes.items():
        pools[name] = work / f"pool_{name}"
        if not pools[name].exists():
            speed.generate(str(pools[name]), shards * per, per, 256, args.seed)
    models = {}
    for name, backbone in (("main", args.backbone), ("tiny", TINY)):
        models[name] = work / f"model_{name}"
        if not models[name].exists():
            fit = [*py, "fit", pools[name], "--out", models[name], "--backbone", backbone]
            fit += ["--pretrained", checkpoints[backbone], "--epochs", "2", "--warmup-epochs", "1"]
            run(f"fit_{name}", [*fit, "--batch-size", "32", "--embeddings", work / f"emb_{name}", "-q"], env, logs)

    rows, timings = [], {}
    for name, backbone in (("main", args.backbone), ("tiny", TINY)):
        pairs = (args.shards * args.shard_pairs) if name == "main" else (args.tiny_shards * args.tiny_shard_pairs)
        for engine in ("local", "ray"):
            report = work / f"report_{name}_{engine}"
            shutil.rmtree(report, ignore_errors=True)
            timings[f"score_{name}_{engine}"] = run(
                f"score_{name}_{engine}",
                [*py, "score", pools[name], "--model", models[name], "--out", report,
                 "--batch-size", args.batch_size, "--engine", engine, "-q"],
                env, logs,
            )  # fmt: skip
        same_report(work / f"report_{name}_local", work / f"report_{name}_ray")
        local, ray_ = timings[f"score_{name}_local"], timings[f"score_{name}_ray"]
        rows.append({
            "short": f"score ({backbone})",
            "row": f"score, {backbone}, {pairs} pairs in {len(list(pools[name].glob('*.tar')))} shards",
            "local_s": local, "ray_s": ray_, "local_pairs_per_s": pairs / local, "ray_pairs_per_s": pairs / ray_,
            "ray_over_local_throughput": local / ray_,
        })  # fmt: skip
    for engine in ("local", "ray"):
        out = work / f"filter_{engine}"
        shutil.rmtree(out, ignore_errors=True)
        timings[f"filter_{engine}"] = run(
            f"filter_{engine}",
            [*py, "filter", pools["tiny"], "--report", work / "report_tiny_local", "--out", out / "kept",
             "--rejected-out", out / "rejected", "--keep-fraction", "0.8", "--engine", engine, "-q"],
            env, logs,
        )  # fmt: skip
    for role in ("kept", "rejected"):
        same_files(work / "filter_local" / role, work / "filter_ray" / role)
    tiny_pairs = args.tiny_shards * args.tiny_shard_pairs
    rows.append({
        "short": "filter",
        "row": f"filter, {tiny_pairs} pairs in {args.tiny_shards} shards (outputs byte-identical)",
        "local_s": timings["filter_local"], "ray_s": timings["filter_ray"],
        "local_pairs_per_s": tiny_pairs / timings["filter_local"],
        "ray_pairs_per_s": tiny_pairs / timings["filter_ray"],
        "ray_over_local_throughput": timings["filter_local"] / timings["filter_ray"],
    })  # fmt: skip

    print("stage rates (one core)", flush=True)
    spec = {
        "urls": speed.tar_list(pools["main"]),
        "checkpoints": checkpoints,
        "encode_blocks": 3,
        "tiny_model": str(models["tiny"]),
        "main_model": str(models["main"]),
        "scratch": str(work / "scratch"),
    }
    helper = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--helper", json.dumps(spec)],
        env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
    )  # fmt: skip
    if helper.returncode != 0:
        sys.exit(f"stage rates failed: {helper.stderr[-800:]}")
    stages = json.loads(helper.stdout.strip().splitlines()[-1])
    facts = speed.backbone_facts(args.backbone, checkpoints[args.backbone])
    doc = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": started,
        "machine": speed.machine_info(),
        "versions": {**speed.versions(), "ray": _ray_version()},
        "rows": rows,
        "stages": stages,
        "backbone": {"name": args.backbone, **facts},
        "model": scaling_model(args.backbone, stages, facts, rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.write_text(markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _ray_version() -> str:
    import ray

    return ray.__version__


def scaling_model(backbone: str, stages: dict, facts: dict, rows: list[dict]) -> dict:
    """Pairs/s of a cluster of N GPU workers, from the measured per-core rates and an assumed GPU rate.

    A worker (actor) decodes its shard on one core and encodes on its share of a GPU; k workers
    share each GPU. A GPU's encode rate is assumed (benchmark_speed.py's: an A100 at 30 % of its
    dense bf16 peak, divided by the backbone's FLOPs per pair). Per GPU, the rate is the smaller
    of that and k decoding cores; the pool's time adds Ray's start, the actors' model load, and
    the last shard's tail.
    """
    rates = stages[backbone]
    gpu_rate = speed.ASSUMED_GPU_PEAK_TFLOPS * 1e12 * speed.ASSUMED_GPU_UTILISATION / facts["flops_per_pair"]
    decode = rates["decode_pairs_per_s_per_core"]
    k_needed = gpu_rate / decode
    table = []
    for gpus in (1, 8, 64):
        host = speed.ASSUMED_HOST_CORES // 8  # the cores per GPU of an 8-GPU host
        for k in sorted({1, 8, host, 32, max(1, min(64, int(round(k_needed))))}):
            per_gpu = min(gpu_rate, k * decode)
            pool = 100_000_000
            hours = (pool / (gpus * per_gpu) + stages["ray_init_s"] + stages["actor_start_s_main"]) / 3600
            table.append({"gpus": gpus, "workers_per_gpu": k, "cores": gpus * k, "pairs_per_s": gpus * per_gpu,
                          "bound": "GPU" if gpu_rate <= k * decode else "decode", "hours_for_100M": hours})  # fmt: skip
    return {
        "assumed_gpu": speed.ASSUMED_GPU,
        "assumed_gpu_utilisation": speed.ASSUMED_GPU_UTILISATION,
        "assumed_gpu_pairs_per_s": gpu_rate,
        "measured_decode_pairs_per_s_per_core": decode,
        "measured_cpu_encode_pairs_per_s_per_core": rates["encode_pairs_per_s_per_core"],
        "decoding_cores_per_gpu_needed": k_needed,
        "table": table,
    }


def markdown(doc: dict) -> str:
    m, s, model = doc["machine"], doc["stages"], doc["model"]
    lines = [
        "# Ray engine benchmark",
        "",
        f"Command: `python pipelines/{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB, {m['platform']}, Python {m['python']}, "
        f"ncleaner {m['ncleaner']} ({m['ncleaner_commit']})  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        "",
        "Each command ran as its own process, timed from outside; `--engine ray` started a local Ray of this",
        "machine's cores for the run (no `--ray-address`), so Ray's start-up and the workers' model loads are",
        "in its time. The two engines' reports were checked to agree (keys, statuses, scores within 1e-4) and",
        "the filtered shards to be byte-identical before any number was written.",
        "",
        "| step | local (s) | Ray (s) | local pairs/s | Ray pairs/s | Ray / local throughput |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['row']} | {r['local_s']:.1f} | {r['ray_s']:.1f} | {r['local_pairs_per_s']:.1f} | "
            f"{r['ray_pairs_per_s']:.1f} | {r['ray_over_local_throughput']:.2f} |"
        )
    tiny, main = s[TINY], s[doc["backbone"]["name"]]
    costs = ", ".join(f"{r['ray_s'] - r['local_s']:.1f} s on {r['short']}" for r in doc["rows"])
    lines += [
        "",
        f"**What Ray costs here:** {costs} (Ray's time minus the local engine's). Most of it is fixed per run:",
        f"`ray.init` of a local Ray ({s['ray_init_s']:.1f} s), shipping the package, starting the workers (each",
        "a new process importing torch and loading the model, below), and shutting Ray down. The per-pair work",
        "gets no more CPU on Ray than locally on one machine (two workers of one core each here, against two",
        "decoding processes and two torch threads): Ray cannot be faster here; it is for many machines.",
        "",
        "## Stages, one core each (measured here)",
        "",
        "| stage | rate |",
        "|---|---:|",
        f"| read + decode + preprocess + tokenise | {main['decode_pairs_per_s_per_core']:.1f} pairs/s per core |",
        f"| encode, {doc['backbone']['name']} on CPU | {main['encode_pairs_per_s_per_core']:.2f} pairs/s per core |",
    ]
    if doc["backbone"]["name"] != TINY:
        lines.append(f"| encode, {TINY} on CPU | {tiny['encode_pairs_per_s_per_core']:.1f} pairs/s per core |")
    lines += [
        f"| one shard's report part ({s['report_part_pairs']} pairs: heads, bank, Parquet, marker) "
        f"| {s['report_part_write_s'] * 1000:.0f} ms |",
        f"| `ray.init` of a local Ray | {s['ray_init_s']:.1f} s |",
        f"| a worker's start (process, imports, model load): {TINY} / {doc['backbone']['name']} "
        f"| {s['actor_start_s_tiny']:.1f} s / {s['actor_start_s_main']:.1f} s |",
        "",
        "## Scaling model for N GPU workers",
        "",
        f"For {doc['backbone']['name']}. A worker (one Ray actor: one CPU, a share of a GPU) reads and decodes its "
        "shard on its core and",
        "encodes it on its GPU share, then writes the shard's report part and marker; k workers share a GPU.",
        "Per GPU the rate is min(GPU encode rate, k x decode rate per core); a run adds Ray's start and one",
        "worker start (all start together), and at the end one shard's time as a tail. Writing is small:",
        f"one report part of {s['report_part_pairs']} pairs took {s['report_part_write_s'] * 1000:.0f} ms here.",
        "",
        f"**Assumption, not measured** (no GPU here): a GPU encodes {model['assumed_gpu_pairs_per_s']:.0f} pairs/s "
        f"of {doc['backbone']['name']} ({model['assumed_gpu']} at {model['assumed_gpu_utilisation']:.0%} "
        "of peak, as in benchmark_speed.py). Measured: decoding "
        f"{model['measured_decode_pairs_per_s_per_core']:.1f} pairs/s per core, so a GPU needs about "
        f"**{model['decoding_cores_per_gpu_needed']:.0f} decoding cores** (`--ray-actors-per-gpu`) to be the bound.",
        "",
        "| GPUs | workers per GPU | cores | pairs/s | bound | hours for 100 M pairs |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for t in model["table"]:
        lines.append(
            f"| {t['gpus']} | {t['workers_per_gpu']} | {t['cores']} | {t['pairs_per_s']:.0f} | {t['bound']} | "
            f"{t['hours_for_100M']:.1f} |"
        )
    lines += [
        "",
        "What the model leaves out, and would change its numbers:",
        "",
        f"- An 8-GPU host with {speed.ASSUMED_HOST_CORES} cores (a DGX A100) has "
        f"{speed.ASSUMED_HOST_CORES // 8} cores per GPU: by the measured decode rate that host is "
        "decode-bound, not GPU-bound, for this backbone.",
        "- The decode rate is of generated 256-pixel JPEGs; web images of a crawl (often 512 px and more, some",
        "  PNG) decode slower, which moves the bound further to the CPUs.",
        "- Workers sharing a GPU are separate processes, each with its own CUDA context and a copy of the",
        "  model (ViT-B-32: about 0.6 GB in float32); the GPU time-slices between them, at a cost not measured",
        "  here (no GPU), and not counted.",
        "- Storage: every worker reads its shards and writes its parts on a shared file system; at 100 M pairs",
        "  of ~50 KB images that is about 5 TB read, which at the rates above needs 1-3 GB/s from it.",
        "- `filter` on Ray writes every output byte twice (pieces, then shards): it is I/O-bound and the",
        "  fixed cost of starting Ray dominates on small pools (the row above).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
