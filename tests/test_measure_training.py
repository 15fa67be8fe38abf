"""The training-step cost: a random cache laid out as cskd cache-teacher writes it, images/s of the
real step with and without teacher targets (a tiny student, a few steps), and what an epoch of a run
costs on its own loaders (the budget of cskd plan's equal-time proxies)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from cskd.config import load_config
from cskd.data.datasets import build_dataset
from cskd.distributed import DistEnv
from cskd.measure.training import EpochCost, epoch_cost, random_cache, step_context, synthetic_batches, training_rates
from cskd.tasks import get_task
from cskd.train import build_loaders


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


def test_a_budget_of_seconds_is_whole_epochs_then_a_cut_short_one_once_its_validation_is_paid_for():
    cost = EpochCost(step_s=0.25, val_s=3.0, steps_per_epoch=100)  # 28 s an epoch
    assert cost.epoch_s == 28.0 and cost.seconds(168) == 48.0  # 100 steps + 3 s, then 68 steps + 3 s
    assert cost.steps_in(48.0) == 168 and cost.steps_in(56.0) == 200 and cost.steps_in(3 * 28.0) == 300
    assert cost.steps_in(30.0) == 100  # 2 s left: less than a validation pass, so no cut-short epoch
    assert cost.steps_in(1.0) == 1  # at least one step
    assert all(cost.seconds(cost.steps_in(s)) == pytest.approx(s, abs=0.25) for s in (40.0, 48.0, 75.5, 112.0))


class Slow:
    """A loader whose every batch costs ``seconds`` more: what loading and augmentation add to a real step."""

    def __init__(self, loader, seconds: float) -> None:
        self.loader, self.seconds = loader, seconds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.seconds)
            yield batch


def test_the_epoch_cost_is_timed_on_the_runs_own_loaders_loading_and_validation_included():
    cfg = load_config(None, ["student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "train.batch_size=8", "data.max_train=64",
                             "data.max_val=32", "data.workers=0", "loss.deit_type=none", "loss.cskd_type=none"])
    _, info = build_dataset(cfg.data.name, "val")
    device = torch.device("cpu")
    loaders = build_loaders(cfg, DistEnv(0, 1, 0, device), 32)
    slow = replace(loaders, train=Slow(loaders.train, 0.05), val=Slow(loaders.val, 0.1))  # 64 images: 8 steps; 32: 1 batch
    cost = epoch_cost(step_context(cfg, get_task("student").spec(cfg, info), None, device), slow, steps=4, warmup=2)
    assert cost.steps_per_epoch == 8
    assert 0.05 <= cost.step_s < 0.05 + 0.5 and 0.1 <= cost.val_s < 0.1 + 0.5  # the loading the synthetic step leaves out
