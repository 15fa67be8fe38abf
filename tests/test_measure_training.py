"""The training-step cost: a random cache laid out as cskd cache-teacher writes it, and images/s of the
real step with and without teacher targets (a tiny student, a few steps)."""

from __future__ import annotations

import pytest
import torch

from cskd.config import load_config
from cskd.data.datasets import build_dataset
from cskd.measure.training import random_cache, step_context, synthetic_batches, training_rates
from cskd.tasks import get_task


def test_a_random_cache_reads_back_maps_of_its_grid(tmp_path):
    cache = random_cache(tmp_path, 16, 10, (4, 4), None)
    assert cache.manifest.complete and cache.maps(torch.tensor([0, 15])).shape == (2, 10, 4, 4)
    topk = random_cache(tmp_path / "topk", 8, 100, (2, 2), 5)  # many classes: the k largest per cell, as the cache stores them
    assert topk.maps(torch.tensor([3])).shape == (1, 100, 2, 2)


def test_synthetic_batches_carry_what_the_loader_records():
    images, labels, meta = synthetic_batches(4, 2, 1, 32, 10, 16, torch.device("cpu"))[1]
    assert images.shape == (4, 1, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert labels.shape == (4,) and set(meta) == {"index", "box", "flip"} and int(meta["index"].max()) < 16


@pytest.mark.parametrize("overrides", [[], ["loss.deit_type=none", "loss.cskd_type=none"]])
def test_training_rates_are_measured_per_context_and_round(tmp_path, overrides):
    cfg = load_config(None, ["student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "train.batch_size=8", *overrides])
    _, info = build_dataset(cfg.data.name, "val")
    spec = get_task("student").spec(cfg, info)
    distils = get_task("student").distils(cfg)
    cache = random_cache(tmp_path, 64, info.num_classes, (4, 4), None) if distils else None
    contexts = [step_context(cfg, spec, cache, torch.device("cpu")) for _ in range(2)]
    batches = synthetic_batches(8, 2, 1, 32, 10, 64, torch.device("cpu"))
    rates = training_rates(contexts, batches, rounds=2, warmup=1)
    assert len(rates) == 2 and all(len(r) == 2 and min(r) > 0 for r in rates)  # per context, per round
