"""DenseTeacher: dense logits are the head applied per cell; their mean is the global logits."""

from __future__ import annotations

import pytest
import torch

from cskd.errors import CSKDError
from cskd.models import create_teacher


@pytest.mark.parametrize(
    "name, kwargs, size, grid",
    [
        ("cskd_resnet_micro", {"output_stride": 8}, 32, 4),
        ("regnetx_002", {}, 64, 2),
    ],
)
def test_dense_mean_equals_global_for_pool_linear_heads(name, kwargs, size, grid):
    torch.manual_seed(0)
    teacher = create_teacher(name, num_classes=7, in_chans=3, **kwargs)
    dense, global_logits = teacher(torch.randn(3, 3, size, size))
    assert dense.shape == (3, 7, grid, grid)
    assert torch.allclose(dense.mean(dim=(2, 3)), global_logits, atol=1e-5)


def test_dense_logits_are_the_classifier_at_each_cell():
    torch.manual_seed(0)
    teacher = create_teacher("cskd_resnet_micro", num_classes=5, in_chans=1, output_stride=8)
    x = torch.randn(2, 1, 32, 32)
    features = teacher.model.forward_features(x)
    fc = teacher.model.fc
    expected = torch.einsum("nchw,kc->nkhw", features, fc.weight) + fc.bias[None, :, None, None]
    dense, _ = teacher(x)
    assert torch.allclose(dense, expected, atol=1e-5)


def test_pre_logits_norm_is_applied_per_cell():
    # ConvNeXt's head normalises the pooled features (LayerNorm) before its classifier: per cell,
    # the norm runs over the channels of that cell alone.
    torch.manual_seed(0)
    teacher = create_teacher("convnext_atto", num_classes=4, in_chans=3)
    x = torch.randn(1, 3, 64, 64)
    features = teacher.model.forward_features(x)
    head = teacher.model.head
    cells = features.permute(0, 2, 3, 1)  # [N,H,W,C]
    normed = torch.nn.functional.layer_norm(cells, (cells.shape[-1],), head.norm.weight, head.norm.bias, head.norm.eps)
    expected = (normed @ head.fc.weight.T + head.fc.bias).permute(0, 3, 1, 2)
    dense, global_logits = teacher(x)
    assert torch.allclose(dense, expected, atol=1e-4)
    assert global_logits.shape == (1, 4)


def test_teacher_is_frozen_and_in_eval_mode():
    teacher = create_teacher("cskd_resnet_micro", num_classes=3, in_chans=1)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_non_cnn_teacher_is_refused_with_a_clear_message():
    teacher = create_teacher("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8)
    with pytest.raises(CSKDError, match="CNN teacher"):
        teacher(torch.randn(1, 3, 32, 32))


def test_unknown_teacher_name_suggests_close_matches():
    with pytest.raises(CSKDError, match="did you mean.*resnet18"):
        create_teacher("resnet_18", num_classes=3)


def test_layer_decay_groups_the_teacher_as_timm_groups_the_bare_cnn():
    """train.layer_decay on a teacher run: each parameter of the wrapper gets the scale timm gives the
    same parameter of the bare CNN (stem lowest, the classifier the full rate)."""
    from timm.optim import create_optimizer_v2

    teacher = create_teacher("cskd_resnet_micro", 10, 1, output_stride=8).requires_grad_(True)

    def scales(model):
        optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
        by_id = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
        return {n: by_id[id(p)] for n, p in model.named_parameters()}

    wrapped = scales(teacher)
    assert wrapped == {f"model.{n}": v for n, v in scales(teacher.model).items()}
    assert wrapped["model.conv1.weight"] < wrapped["model.layer1.0.conv1.weight"] < wrapped["model.fc.weight"] == 1.0


def test_layer_decay_reads_a_model_whose_grouping_is_a_function():
    """timm's Inception models group parameters with a function, not a dict of rules: the wrapper's
    grouping follows it, and its own parameters outside the model come last, at the full rate."""
    from timm.optim import create_optimizer_v2

    from cskd.models.factory import prefixed_group_matcher

    class Staged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.block, self.fc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def group_matcher(self, coarse: bool = False):
            return lambda name: {"stem": 0, "block": 1}.get(name.split(".")[0], 2)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.head = Staged(), torch.nn.Linear(2, 2)

        def group_matcher(self, coarse: bool = False):
            return prefixed_group_matcher(self.model, "model", coarse)

    wrapper = Wrapper()
    optimizer = create_optimizer_v2(wrapper, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    by_id = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    scale = {n: by_id[id(p)] for n, p in wrapper.named_parameters()}
    assert [scale[f"{m}.weight"] for m in ("model.stem", "model.block", "model.fc", "head")] == [0.125, 0.25, 0.5, 1.0]
