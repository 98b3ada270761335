"""The fit loop's bookkeeping: every training pair is seen exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

from ncleaner.fitting import epoch_batches


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


@pytest.mark.parametrize("epochs", [1, 3, 4, 12])
def test_fit_on_fewer_pairs_than_two_batches_with_default_epochs(small_shards, tmp_path, epochs):
    # 32 pairs at the default batch size 128 is one step per epoch: with 4 or more epochs the
    # schedule's warm-up was exactly one step long and OneCycleLR raised ZeroDivisionError.
    out = tmp_path / "model"
    run_cli("fit", small_shards / "00000.tar", "--out", out, "--epochs", str(epochs),
            "--warmup-epochs", str(min(3, epochs - 1)), "--quiet")  # fmt: skip
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 12, 180])
@pytest.mark.parametrize("epochs", [1, 4, 12])
def test_learning_rate_schedule_has_any_length(steps, epochs):
    import torch

    from ncleaner.fitting import one_cycle

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = one_cycle(optimizer, [1e-3], steps, epochs)
    rates = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(np.isfinite(rates)) and max(rates) <= 1e-3 + 1e-12
