"""fuse_heads: one linear head on the chosen heads' features, equal to their average."""

from __future__ import annotations

import pytest
import torch

from cskd.models import create_student, fuse_heads


def test_fused_model_equals_unfused_eval_output(tiny_student):
    torch.manual_seed(1)
    for p in tiny_student.parameters():  # non-trivial heads, not the zero-init biases
        p.data.add_(0.1 * torch.randn_like(p))
    tiny_student.eval()
    x = torch.randn(5, 1, 32, 32)
    fused = fuse_heads(tiny_student)
    with torch.no_grad():
        z_cls, z_dist, dense = tiny_student.forward_heads(x)
        reference = (z_cls + z_dist + dense.mean(dim=(2, 3))) / 3
        assert (fused(x) - reference).abs().max() < 1e-5
        assert (fused(x) - tiny_student(x)).abs().max() < 1e-5


def test_fused_model_has_one_linear_head_of_three_widths():
    student = create_student("deit_tiny_distilled_patch16_224", 7, img_size=32, patch_size=16)
    fused = fuse_heads(student)
    linears = [m for m in fused.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 7]
    assert len(linears) == 1 and linears[0].in_features == 3 * 192
    assert not fused.training


def test_fusion_leaves_the_student_untouched(tiny_student):
    before = {k: v.clone() for k, v in tiny_student.state_dict().items()}
    fuse_heads(tiny_student)
    assert all(torch.equal(before[k], v) for k, v in tiny_student.state_dict().items())


@pytest.mark.parametrize("heads", [("cls",), ("cls", "dist"), ("dist", "dense"), ("cls", "dense"), ("cls", "dist", "dense")])
def test_fusing_any_head_selection_equals_the_mean_of_those_heads(heads):
    torch.manual_seed(2)
    student = create_student("cskd_deit_nano_distilled_patch4_32", 10, 32, 4, 1, heads=heads, embed_dim=32, depth=1, num_heads=2)
    for p in student.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    student.eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        out = student.forward_heads(x)
        by_hand = {"cls": out.cls, "dist": out.dist, "dense": out.dense.mean(dim=(2, 3))}
        reference = sum(by_hand[h] for h in heads) / len(heads)
        fused = fuse_heads(student)
        assert (student(x) - reference).abs().max() < 1e-5
        assert (fused(x) - reference).abs().max() < 1e-5
    assert fused.head.in_features == 32 * len(heads)


def test_an_unknown_head_is_refused():
    from cskd.errors import CSKDError

    with pytest.raises(CSKDError, match="subset of"):
        create_student("cskd_deit_nano_distilled_patch4_32", 10, 32, 4, 1, heads=("patches",))
