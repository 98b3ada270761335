"""Regenerate sample_data/: rendered scenes with 20 % permuted captions and ground truth in each json.

    python pipelines/make_sample_data.py [--out sample_data] [--seed 0]

The same seed always gives the same bytes (tests rely on the committed shards
matching this script).
"""

from __future__ import annotations

import argparse

from ncleaner.synthetic import write_synthetic_shards
from ncleaner.writer import StagedDir

SAMPLES = 1600
SHARD_SIZE = 400
NOISE_RATE = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sample_data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Only the shards this script writes are replaced; anything else in --out is a refusal.
    names = {f"{i:05d}.tar" for i in range(-(-SAMPLES // SHARD_SIZE))}
    with StagedDir(args.out, force=True, owned=lambda _: names) as stage:
        paths = write_synthetic_shards(stage.path, SAMPLES, SHARD_SIZE, NOISE_RATE, args.seed, jpeg_quality=85)
        stage.commit()
    print(f"wrote {SAMPLES} pairs ({NOISE_RATE:.0%} with permuted captions) to {len(paths)} shards in {args.out}")


if __name__ == "__main__":
    main()
