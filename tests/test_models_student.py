"""DistilledStudent: three heads in training, their average in eval; any size, patch and channels."""

from __future__ import annotations

import pytest
import torch

from cskd.errors import CSKDError
from cskd.models import create_student


@pytest.mark.parametrize("img_size, patch_size, in_chans", [(32, 4, 1), (48, 8, 3), (40, 10, 2)])
def test_train_mode_returns_class_dist_and_dense_on_the_patch_grid(img_size, patch_size, in_chans):
    student = create_student("cskd_deit_nano_distilled_patch4_32", 6, img_size, patch_size, in_chans,
                             embed_dim=32, depth=1, num_heads=2).train()
    z_cls, z_dist, dense = student(torch.randn(2, in_chans, img_size, img_size))
    grid = img_size // patch_size
    assert z_cls.shape == z_dist.shape == (2, 6)
    assert dense.shape == (2, 6, grid, grid)


def test_dense_logits_are_head_dist_of_each_patch_token(tiny_student):
    x = torch.randn(2, 1, 32, 32)
    tiny_student.eval()
    tokens = tiny_student.vit.forward_features(x)
    out = tiny_student.forward_heads(x)
    # patch m = row * 8 + col sits at token 2 + m
    for row, col in [(0, 0), (3, 5), (7, 7)]:
        expected = tiny_student.vit.head_dist(tokens[:, 2 + row * 8 + col])
        assert torch.allclose(out.dense[:, :, row, col], expected, atol=1e-6)
    assert torch.allclose(out.cls, tiny_student.vit.head(tokens[:, 0]), atol=1e-6)
    assert torch.allclose(out.dist, tiny_student.vit.head_dist(tokens[:, 1]), atol=1e-6)


def test_eval_mode_returns_the_three_way_average(tiny_student):
    x = torch.randn(3, 1, 32, 32)
    tiny_student.eval()
    with torch.no_grad():
        z_cls, z_dist, dense = tiny_student.forward_heads(x)
        fused = tiny_student(x)
    assert torch.allclose(fused, (z_cls + z_dist + dense.mean(dim=(2, 3))) / 3, atol=1e-6)


def test_timm_deit_tiny_builds_at_any_size():
    student = create_student("deit_tiny_distilled_patch16_224", 10, img_size=64, patch_size=16, in_chans=1).train()
    assert student.grid_size == (4, 4)
    assert student(torch.randn(1, 1, 64, 64)).dense.shape == (1, 10, 4, 4)


def test_non_distilled_vit_is_refused():
    with pytest.raises(CSKDError, match="no distillation token"):
        create_student("vit_tiny_patch16_224", 10, img_size=32, patch_size=8)


def test_image_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(CSKDError, match="not a multiple"):
        create_student("cskd_deit_nano_distilled_patch4_32", 10, img_size=30, patch_size=4)


def test_no_weight_decay_names_match_wrapper_parameters(tiny_student):
    # timm's optimizer factory matches these names against the wrapper's parameter names
    names = dict(tiny_student.named_parameters())
    assert {"vit.cls_token", "vit.dist_token", "vit.pos_embed"} <= set(tiny_student.no_weight_decay()) & set(names)


def test_layer_decay_scales_each_block_by_its_depth_as_timm_does_for_the_bare_vit():
    """timm's layer-wise decay through the wrapper: every parameter gets the scale timm gives the
    same parameter of the bare ViT (block i of n: decay^(n-i), the stem decay^(n+1), the heads 1),
    and the scheduler then sets each group's rate to the schedule's times that scale."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    depth, decay = 3, 0.5
    student = create_student("cskd_deit_nano_distilled_patch4_32", 10, img_size=32, patch_size=4, in_chans=1,
                             embed_dim=32, depth=depth, num_heads=2)

    def scales(model):
        optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=decay)
        by_id = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
        return optimizer, {n: by_id[id(p)] for n, p in model.named_parameters()}

    optimizer, wrapped = scales(student)
    assert wrapped == {f"vit.{n}": v for n, v in scales(student.vit)[1].items()}
    for i in range(depth):
        assert wrapped[f"vit.blocks.{i}.attn.qkv.weight"] == pytest.approx(decay ** (depth - i))
    assert wrapped["vit.pos_embed"] == pytest.approx(decay ** (depth + 1)) and wrapped["vit.head.weight"] == 1.0
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, warmup_epochs=0, step_on_epochs=False,
                                       updates_per_epoch=1)
    scheduler.step_update(num_updates=5)
    named = dict(student.named_parameters())
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    head_rate = rates[id(named["vit.head.weight"])]
    assert 0 < head_rate < 1e-3
    assert rates[id(named["vit.blocks.0.attn.qkv.weight"])] == pytest.approx(head_rate * decay ** depth)
