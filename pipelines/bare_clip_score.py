"""The loop a user would write instead of ncleaner: open_clip cosine similarity of every pair, to one Parquet.

    python pipelines/bare_clip_score.py 'shards/{00000..00015}.tar' --model ViT-B-32 --pretrained ckpt.pt \\
        --batch-size 256 --threads 2 --out clip_sim.parquet

webdataset reads and decodes the shards (PIL), open_clip's own preprocess and tokenizer prepare
them, both towers encode batches of --batch-size under torch.inference_mode, and the cosine of
each pair goes to one Parquet file (shard, key, cosine). It is the baseline of
pipelines/benchmark_speed.py: what ncleaner's score and embed are measured against, with the
same checkpoint, data, batch size and threads. --workers N moves reading, decoding and
preprocessing into N DataLoader processes (default 0: all in this process, the plain loop).
"""

from __future__ import annotations

import argparse
import json
import time

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import webdataset as wds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    parser.add_argument("--pretrained", required=True, help="open_clip pretrained tag or local checkpoint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes (0: decode in this process)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config-dir", default=None, help="extra open_clip model configs (e.g. ncleaner's)")
    parser.add_argument("--out", required=True, help="Parquet file to write")
    parser.add_argument("--timing", default=None, help="write the time spent preparing and encoding here (JSON)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.model_config_dir:
        open_clip.add_model_config(args.model_config_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.model, pretrained=args.pretrained, device=args.device
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)

    urls = [u for spec in args.shards for u in wds.shardlists.expand_urls(spec)]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("__url__", "__key__", "jpg;png;jpeg;webp", "txt")
        .map_tuple(None, None, preprocess, None)
    )
    if args.workers:
        batches = wds.WebLoader(dataset.batched(args.batch_size), batch_size=None, num_workers=args.workers)
    else:
        batches = dataset.batched(args.batch_size)

    shards, keys, cosines = [], [], []
    # Where the time goes, for benchmark_speed.py: preparing a batch (read, decode, preprocess, tokenise
    # when --workers 0) and encoding it; CPU time counts every thread of this process.
    timing = {"prepare_s": 0.0, "prepare_cpu_s": 0.0, "encode_s": 0.0, "encode_cpu_s": 0.0}
    start = time.perf_counter()
    batch_iter = iter(batches)
    with torch.inference_mode():
        while True:
            t0, c0 = time.perf_counter(), time.process_time()
            batch = next(batch_iter, None)
            if batch is None:
                break
            url, key, images, captions = batch
            tokens = tokenizer(list(captions))
            t1, c1 = time.perf_counter(), time.process_time()
            image_features = model.encode_image(images.to(args.device))
            text_features = model.encode_text(tokens.to(args.device))
            cosine = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)
            shards.extend(url)
            keys.extend(key)
            cosines.append(cosine.float().cpu())
            t2, c2 = time.perf_counter(), time.process_time()
            timing["prepare_s"] += t1 - t0
            timing["prepare_cpu_s"] += c1 - c0
            timing["encode_s"] += t2 - t1
            timing["encode_cpu_s"] += c2 - c1
    table = pa.table({"shard": shards, "key": keys, "cosine": torch.cat(cosines).numpy() if cosines else []})
    pq.write_table(table, args.out)
    loop = time.perf_counter() - start
    print(f"{len(keys)} pairs in {loop:.1f} s after loading -> {args.out}")
    if args.timing:
        timing.update(pairs=len(keys), loop_s=loop, workers=args.workers)
        with open(args.timing, "w") as f:
            json.dump(timing, f)


if __name__ == "__main__":
    main()
