"""cskd.loss against formulas written out independently here (numpy loops, hand-made tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from cskd.loss import CSKDLoss, align_grids, ckf_ratio, cskd_loss, deit_loss


def log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


@pytest.mark.parametrize(
    "decay, expected",
    [
        ("linear", [1.0, 0.75, 0.5, 0.0]),
        ("x2", [1.0, 0.5625, 0.25, 0.0]),
        ("cos", [1.0, math.cos(math.pi / 8), math.sqrt(0.5), 0.0]),
        ("none", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_ckf_ratio_at_progress_points(decay, expected):
    got = [ckf_ratio(x, decay) for x in (0.0, 0.25, 0.5, 1.0)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_ckf_ratio_clamps_progress_and_rejects_unknown_decay():
    assert ckf_ratio(1.5, "linear") == 0.0 and ckf_ratio(-1, "linear") == 1.0
    with pytest.raises(ValueError, match="decay"):
        ckf_ratio(0.5, "exp")


def test_align_grids_equal_sizes_is_identity():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s2, t2 = align_grids(s, t)
    assert s2 is s and t2 is t


def test_align_grids_two_to_one_averages_2x2_blocks():
    student = torch.arange(16.0).reshape(1, 1, 4, 4)
    teacher = torch.zeros(1, 1, 2, 2)
    s, t = align_grids(student, teacher)
    # blocks: [0,1,4,5] [2,3,6,7] [8,9,12,13] [10,11,14,15]
    assert s.squeeze().tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert t is teacher


def test_align_grids_non_integer_ratio_uses_adaptive_bins():
    # 5 -> 3 adaptive bins: [0,2), [1,4), [3,5) along each axis; here the teacher is the finer grid.
    teacher = torch.arange(25.0).reshape(1, 1, 5, 5)
    student = torch.zeros(1, 1, 3, 3)
    s, t = align_grids(student, teacher)
    bins = [(0, 2), (1, 4), (3, 5)]
    grid = np.arange(25.0).reshape(5, 5)
    expected = [[grid[a:b, c:d].mean() for (c, d) in bins] for (a, b) in bins]
    assert np.allclose(t.squeeze().numpy(), expected)
    assert s is student


def test_deit_hard_is_cross_entropy_against_teacher_argmax():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])  # argmax: 1, 0
    expected = -(log_softmax_np(z[0].numpy())[1] + log_softmax_np(z[1].numpy())[0]) / 2
    assert deit_loss(z, teacher, "hard").item() == pytest.approx(expected, rel=1e-6)


def test_deit_soft_is_summed_kl_over_numel_times_tau_squared():
    torch.manual_seed(0)
    z, g, tau = torch.randn(3, 4), torch.randn(3, 4), 2.0
    total = 0.0
    for n in range(3):
        p_t = np.exp(log_softmax_np(g[n].numpy() / tau))
        total += (p_t * (np.log(p_t) - log_softmax_np(z[n].numpy() / tau))).sum()
    expected = total * tau**2 / 12
    assert deit_loss(z, g, "soft", tau).item() == pytest.approx(expected, rel=1e-5)


def _fused_target(dense_t: np.ndarray, global_t: np.ndarray, r: float) -> np.ndarray:
    return r * dense_t + (1 - r) * global_t[:, :, None, None]


def test_cskd_hard_on_equal_grid_matches_per_cell_cross_entropy():
    torch.manual_seed(1)
    zs, dt, gt = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(2, 5)
    progress = 0.3
    target = _fused_target(dt.numpy(), gt.numpy(), 0.7)
    losses = [
        -log_softmax_np(zs[n, :, h, w].numpy())[target[n, :, h, w].argmax()]
        for n in range(2) for h in range(3) for w in range(3)
    ]
    got = cskd_loss(zs, dt, gt, progress, "hard", "linear").item()
    assert got == pytest.approx(np.mean(losses), rel=1e-5)


def test_cskd_soft_two_to_one_grid_sums_cells_and_divides_by_batch():
    torch.manual_seed(2)
    zs, dt, gt, tau = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 4), 3.0
    pooled = zs.numpy().reshape(2, 4, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 blocks of the student grid
    r = math.cos(math.pi * 0.5 / 2)
    target = _fused_target(dt.numpy(), gt.numpy(), r)
    total = 0.0
    for n in range(2):
        for h in range(2):
            for w in range(2):
                log_p_t = log_softmax_np(target[n, :, h, w] / tau)
                log_p_s = log_softmax_np(pooled[n, :, h, w] / tau)
                total += (np.exp(log_p_t) * (log_p_t - log_p_s)).sum()
    expected = total * tau**2 / 2
    got = cskd_loss(zs, dt, gt, 0.5, "soft", "cos", tau).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_cskd_target_is_global_at_end_and_dense_at_start():
    zs = torch.randn(1, 3, 2, 2)
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, 0] = 10.0  # dense says class 0 everywhere
    glob = torch.tensor([[0.0, 0.0, 10.0]])  # global says class 2
    ce = lambda k: nn.functional.cross_entropy(zs, torch.full((1, 2, 2), k)).item()  # noqa: E731
    assert cskd_loss(zs, dense, glob, 0.0, "hard", "linear").item() == pytest.approx(ce(0))
    assert cskd_loss(zs, dense, glob, 1.0, "hard", "linear").item() == pytest.approx(ce(2))
    assert cskd_loss(zs, dense, glob, 1.0, "hard", "none").item() == pytest.approx(ce(0))


def _outputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 6, 4, 4, generator=g))
    teacher = (torch.randn(4, 6, 2, 2, generator=g), torch.randn(4, 6, generator=g))
    targets = torch.tensor([0, 1, 2, 5])
    return student, teacher, targets


def test_total_loss_combines_terms_with_alpha_and_lambda():
    student, teacher, y = _outputs()
    ce = nn.CrossEntropyLoss()
    crit = CSKDLoss(ce, alpha=0.3, deit_type="soft", cskd_type="hard", cskd_weight=2.0, decay="x2", tau=2.0)
    parts = crit(student, y, teacher, progress=0.4)
    base = ce(student[0], y)
    deit = deit_loss(student[1], teacher[1], "soft", 2.0)
    dense = cskd_loss(student[2], teacher[0], teacher[1], 0.4, "hard", "x2")
    assert parts["loss"].item() == pytest.approx((0.7 * base + 0.3 * deit + 2.0 * dense).item(), rel=1e-6)
    assert set(parts) == {"base", "deit", "cskd", "loss"}


def test_unlabelled_rows_after_the_labels_learn_from_the_teacher_only():
    """A transfer-set batch: 2 labelled rows then 2 without labels. The labels' term is of the first
    two class-token rows; the teacher's terms are of every row, as a 4-row fully labelled batch's are."""
    student, teacher, y = _outputs()
    ce = nn.CrossEntropyLoss()
    crit = CSKDLoss(ce, alpha=0.5, deit_type="soft", cskd_type="soft")
    mixed = crit(student, y[:2], teacher, progress=0.3)
    everything = crit(student, y, teacher, progress=0.3)
    assert mixed["base"].item() == pytest.approx(ce(student[0][:2], y[:2]).item(), rel=1e-6)
    assert mixed["deit"].item() == pytest.approx(everything["deit"].item(), rel=1e-6)
    assert mixed["cskd"].item() == pytest.approx(everything["cskd"].item(), rel=1e-6)
    assert mixed["loss"].item() == pytest.approx((0.5 * mixed["base"] + 0.5 * mixed["deit"] + mixed["cskd"]).item(), rel=1e-6)


def test_cskd_none_is_deit_distillation():
    student, teacher, y = _outputs()
    ce = nn.CrossEntropyLoss()
    parts = CSKDLoss(ce, alpha=0.5, deit_type="hard", cskd_type="none")(student, y, teacher, 0.0)
    expected = 0.5 * ce(student[0], y) + 0.5 * ce(student[1], teacher[1].argmax(1))
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "cskd" not in parts


def test_no_kd_trains_both_tokens_on_labels_without_a_teacher():
    student, _, y = _outputs()
    ce = nn.CrossEntropyLoss()
    crit = CSKDLoss(ce, alpha=0.5, deit_type="none", cskd_type="none")
    assert not crit.needs_teacher
    parts = crit(student, y, None, 0.5)
    assert parts["loss"].item() == pytest.approx((0.5 * ce(student[0], y) + 0.5 * ce(student[1], y)).item(), rel=1e-6)


def test_distillation_without_teacher_outputs_is_an_error():
    student, _, y = _outputs()
    with pytest.raises(ValueError, match="teacher outputs"):
        CSKDLoss(nn.CrossEntropyLoss())(student, y, None, 0.0)


def test_loss_rejects_unknown_switch_values():
    with pytest.raises(ValueError, match="cskd_type"):
        CSKDLoss(nn.CrossEntropyLoss(), cskd_type="dense")


@pytest.mark.parametrize("switches, heads", [
    (dict(alpha=0.5, deit_type="hard", cskd_type="hard", cskd_weight=1.0), ("cls", "dist", "dense")),  # CSKD
    (dict(alpha=0.5, deit_type="hard", cskd_type="none", cskd_weight=1.0), ("cls", "dist")),  # DeiT
    (dict(alpha=0.5, deit_type="none", cskd_type="none", cskd_weight=1.0), ("cls", "dist")),  # no KD: dist learns labels
    (dict(alpha=0.0, deit_type="hard", cskd_type="none", cskd_weight=1.0), ("cls",)),  # the dist token gets no weight
    (dict(alpha=1.0, deit_type="hard", cskd_type="hard", cskd_weight=1.0), ("dist", "dense")),
    (dict(alpha=0.5, deit_type="hard", cskd_type="soft", cskd_weight=0.0), ("cls", "dist")),  # lambda 0: dense untrained
])
def test_the_heads_a_loss_trains_follow_its_switches(switches, heads):
    from cskd.loss import trained_heads

    assert trained_heads(**switches) == heads
    # and the criterion gives gradient to exactly those heads
    torch.manual_seed(0)
    z = [torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, 2, 2, requires_grad=True)]
    criterion = CSKDLoss(nn.CrossEntropyLoss(), **switches)
    teacher = (torch.randn(4, 5, 2, 2), torch.randn(4, 5))
    criterion(tuple(z), torch.randint(0, 5, (4,)), teacher, progress=0.3)["loss"].backward()
    got = tuple(name for name, t in zip(("cls", "dist", "dense"), z) if t.grad is not None and t.grad.abs().sum() > 0)
    assert got == heads


def test_training_progress_counts_steps_or_whole_epochs():
    from cskd.loss import training_progress

    # 4 epochs of 10 steps
    assert [training_progress(s, 10, 40, "step") for s in (0, 5, 10, 39)] == [0.0, 0.125, 0.25, 0.975]
    assert [training_progress(s, 10, 40, "epoch") for s in (0, 5, 9, 10, 39)] == [0.0, 0.0, 0.0, 0.25, 0.75]
