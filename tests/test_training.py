"""The fit loop's bookkeeping: every training pair is seen exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

from ncleaner.train import epoch_batches


@pytest.mark.parametrize("batch_size", [2, 32, 128])
@pytest.mark.parametrize("n", [4, 31, 32, 33, 40, 64, 65, 200, 255, 256, 257, 1600])
def test_every_pair_is_used_exactly_once_per_epoch(n, batch_size):
    batches = epoch_batches(n, batch_size, np.random.default_rng(0))
    seen = np.concatenate([b.numpy() for b in batches])
    assert sorted(seen.tolist()) == list(range(n))
    # The schedule is built for this many steps, and no batch is smaller than the batch size
    # unless there is only one.
    assert len(batches) == max(1, n // batch_size)
    assert len(batches) == 1 or min(len(b) for b in batches) >= batch_size


def test_fit_with_between_one_and_two_batches_of_pairs(small_shards, tmp_path):
    # 32 pairs at batch size 24: one full batch and a short one (this crashed with IndexError).
    out = tmp_path / "model"
    run_cli("fit", small_shards / "00000.tar", "--out", out, "--epochs", "1", "--warmup-epochs", "0",
            "--batch-size", "24", "--quiet")  # fmt: skip
    assert (out / "config.json").is_file()
