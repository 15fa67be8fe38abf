"""Starting from pretrained weights: each adaptation path on tiny models, checked tensor by tensor
against what the source weights hold, and what cannot be adapted refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from cskd.checkpoint import ModelSpec, save_weights
from cskd.errors import CSKDError
from cskd.tasks import get_task

NANO = "cskd_deit_nano_distilled_patch4_32"
SMALL = dict(embed_dim=32, depth=1, num_heads=2)  # every source below shares the student's width and depth


def student_spec(classes: int = 10, channels: int = 1, img_size: int = 32, patch: int = 4) -> ModelSpec:
    return ModelSpec("student", NANO, classes, channels, img_size, patch, dict(SMALL), (0.5,) * channels, (0.5,) * channels,
                     [f"c{i}" for i in range(classes)], ["cls", "dist", "dense"])


def source_student(classes: int = 10, channels: int = 1, img_size: int = 32, patch: int = 4):
    torch.manual_seed(1)
    return get_task("student").build(student_spec(classes, channels, img_size, patch)).vit


def start(reference, spec=None):
    return get_task("student").create(spec or student_spec(), 0.0, str(reference))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def test_a_cskd_run_of_another_class_count_loads_all_but_the_heads(tmp_path):
    source = source_student(classes=7)
    save_weights(tmp_path / "run" / "best.safetensors", source.state_dict(), student_spec(classes=7))
    model, report = start(tmp_path / "run")
    own = model.vit.state_dict()
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert all(same(own[k], v) for k, v in source.state_dict().items() if k not in heads)
    assert own["head.weight"].shape == (10, 32)
    assert sorted(n.split(":")[0] for n in report.new) == sorted(heads) and "7 -> 10 classes" in report.new[0]
    assert len(report.loaded) == len(own) - 4 and not report.adapted and not report.ignored
    assert "cskd student" in report.lines()[0]


def test_another_patch_grid_resamples_the_position_embeddings_and_keeps_both_tokens(tmp_path):
    source = source_student(img_size=64)  # 16x16 grid -> the student's 8x8
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    model, report = start(tmp_path / "model.safetensors")
    pos, given = model.vit.pos_embed, source.pos_embed
    assert pos.shape == (1, 2 + 64, 32)
    assert same(pos[:, :2], given[:, :2])  # class and distillation token positions unchanged
    assert torch.allclose(pos[:, 2:], resample_abs_pos_embed(given[:, 2:], (8, 8), (16, 16), num_prefix_tokens=0), atol=1e-6)
    assert any(a.startswith("pos_embed: [1, 258, 32] -> [1, 66, 32]") for a in report.adapted)


def test_rgb_weights_adapt_the_patch_embedding_to_one_channel(tmp_path):
    source = source_student(channels=3)
    torch.save({"model": source.state_dict()}, tmp_path / "deit.pth")  # the DeiT authors' layout
    model, report = start(tmp_path / "deit.pth")
    weight = model.vit.patch_embed.proj.weight
    assert weight.shape == (32, 1, 4, 4) and torch.allclose(weight[:, 0], source.patch_embed.proj.weight.sum(dim=1))
    assert "patch_embed.proj.weight: [32, 3, 4, 4] -> [32, 1, 4, 4]" in report.adapted


def test_a_plain_vit_without_a_distillation_token_starts_it_from_the_class_tokens(tmp_path):
    torch.manual_seed(2)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10, **SMALL)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "vit.safetensors")
    model, report = start(tmp_path / "vit.safetensors")
    vit = model.vit
    assert same(vit.dist_token, plain.cls_token) and same(vit.cls_token, plain.cls_token)
    assert same(vit.head_dist.weight, plain.head.weight) and same(vit.head.weight, plain.head.weight)
    assert same(vit.pos_embed[:, 0], plain.pos_embed[:, 0]) and same(vit.pos_embed[:, 1], plain.pos_embed[:, 0])
    assert same(vit.pos_embed[:, 2:], plain.pos_embed[:, 1:])
    assert same(vit.blocks[0].attn.qkv.weight, plain.blocks[0].attn.qkv.weight)
    assert {a.split(":")[0] for a in report.adapted} == {"dist_token", "head_dist.weight", "head_dist.bias", "pos_embed"}
    assert not report.new and not report.ignored
    assert len(report.loaded) + len(report.adapted) == len(vit.state_dict())  # each tensor counted once


def test_a_cskd_run_of_as_many_other_classes_starts_the_heads_fresh_and_one_of_the_same_keeps_them(tmp_path):
    """Pretrained on classes 0-4, fine-tuned on 5-9: same count, but the heads' rows mean other
    classes, so they start fresh; the same classes again keep them."""
    source = source_student(classes=5)
    named = lambda names: replace(student_spec(classes=5), class_names=names)  # noqa: E731
    save_weights(tmp_path / "run" / "best.safetensors", source.state_dict(), named(["tshirt", "trouser", "pullover", "dress", "coat"]))
    model, report = start(tmp_path / "run", named(["sandal", "shirt", "sneaker", "bag", "boot"]))
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    own = model.vit.state_dict()
    assert all(same(own[k], v) for k, v in source.state_dict().items() if k not in heads)
    assert not any(same(own[k], source.state_dict()[k]) for k in ("head.weight", "head_dist.weight"))
    assert sorted(n.split(":")[0] for n in report.new) == sorted(heads) and "other classes (tshirt, trouser, ...)" in report.new[0]
    kept, report = start(tmp_path / "run", named(["tshirt", "trouser", "pullover", "dress", "coat"]))
    assert all(same(kept.vit.state_dict()[k], v) for k, v in source.state_dict().items()) and not report.new


def test_a_teacher_starts_from_a_cskd_teacher_run_of_other_classes(tmp_path):
    task = get_task("teacher")
    spec = ModelSpec("teacher", "cskd_resnet_micro", 5, 1, 32, kwargs={"output_stride": 8})
    torch.manual_seed(3)
    source = task.build(spec)
    save_weights(tmp_path / "teacher" / "best.safetensors", source.state_dict(), spec)
    target = ModelSpec("teacher", "cskd_resnet_micro", 10, 1, 32, kwargs={"output_stride": 8})
    model, report = task.create(target, 0.0, str(tmp_path / "teacher"))
    assert same(model.conv1.weight, source.conv1.weight) and model.fc.weight.shape == (10, 192)
    assert [n.split(":")[0] for n in report.new] == ["fc.weight", "fc.bias"]


def test_weights_of_another_width_are_refused_with_what_mismatched(tmp_path):
    wide = get_task("student").build(ModelSpec("student", NANO, 10, 1, 32, 4, dict(SMALL, embed_dim=48, num_heads=3),
                                               (0.5,), (0.5,), [str(i) for i in range(10)], ["cls", "dist", "dense"])).vit
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, tmp_path / "wide.safetensors")
    expected = r"does not fit this model: 17 tensors of another shape, e.g. blocks.0.attn.proj.bias \[48\] \(the model.s \[32\]\)"
    with pytest.raises(CSKDError, match=expected + ".*same architecture"):
        start(tmp_path / "wide.safetensors")


def shaped_spec(**kwargs) -> ModelSpec:
    """The student spec with other timm options (``SMALL`` changed by ``kwargs``)."""
    return replace(student_spec(), kwargs=dict(SMALL, **kwargs))


@pytest.mark.parametrize("source_depth, model_depth", [(1, 2), (3, 1)])
@pytest.mark.parametrize("plain", [False, True], ids=["cskd-run", "plain-weights"])
def test_weights_of_another_depth_are_refused_naming_both_depths(tmp_path, source_depth, model_depth, plain):
    """A shallower run into a deeper model (the extra blocks would start random) and a deeper one into
    a shallower model (blocks dropped): every tensor that exists fits, so shapes alone let both through."""
    torch.manual_seed(4)
    source = get_task("student").build(shaped_spec(depth=source_depth)).vit.state_dict()
    if plain:  # no spec: the depth comes from the blocks.N. keys
        save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "w.safetensors")
    else:
        save_weights(tmp_path / "w.safetensors", source, shaped_spec(depth=source_depth))
    expected = (f"is another architecture than this model, depth: blocks has {source_depth} blocks in the weights, "
                f"{model_depth} in the model")
    with pytest.raises(CSKDError, match=expected + ".*student.kwargs: depth, num_heads"):
        start(tmp_path / "w.safetensors", shaped_spec(depth=model_depth))


def test_a_cskd_run_of_another_head_count_is_refused_though_every_shape_fits(tmp_path):
    """num_heads=2 into num_heads=4 at the same width: the same tensors, split into other heads."""
    torch.manual_seed(5)
    source = get_task("student").build(shaped_spec(depth=2, num_heads=2)).vit.state_dict()
    save_weights(tmp_path / "run" / "best.safetensors", source, shaped_spec(depth=2, num_heads=2))
    with pytest.raises(CSKDError, match=r"num_heads: 2 in the weights, 4 in the model \(blocks.0.attn and 1 more attention modules\)"):
        start(tmp_path / "run", shaped_spec(depth=2, num_heads=4))
    model, report = start(tmp_path / "run", shaped_spec(depth=2, num_heads=2))  # the same heads load
    assert all(same(model.vit.state_dict()[k], v) for k, v in source.items()) and not report.new


def test_layer_scale_keys_that_timm_renames_still_load(tmp_path):
    """DeiT III checkpoints name layer scale blocks.N.gamma_1; timm's filter renames it ls1.gamma."""
    torch.manual_seed(6)
    spec = shaped_spec(init_values=0.1)
    source = get_task("student").build(spec).vit.state_dict()
    renamed = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v.contiguous() for k, v in source.items()}
    renamed.update({k: torch.rand_like(v) for k, v in renamed.items() if "gamma" in k})  # trained: not the init value
    assert "blocks.0.gamma_1" in renamed
    save_file(renamed, tmp_path / "deit3.safetensors")
    model, report = start(tmp_path / "deit3.safetensors", spec)
    assert same(model.vit.blocks[0].ls1.gamma, renamed["blocks.0.gamma_1"]) and not report.new


@pytest.mark.parametrize("reference, message", [
    ("/no/such/weights.safetensors", "does not exist; pass a weights file"),
    ("timm:deit_tiny_distilled_patch16_224.no_such_tag", "is not a timm pretrained tag"),
])
def test_a_reference_that_names_no_weights_is_refused(reference, message):
    with pytest.raises(CSKDError, match=message):
        start(reference)


def test_an_offline_machine_asked_for_a_timm_tag_says_how_to_pass_the_file_instead(monkeypatch):
    """No download is attempted: timm's fetch fails as it does without a hub (huggingface_hub's offline error)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained and "state_dict" not in kwargs.get("pretrained_cfg_overlay", {}):
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has been disabled.")
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CSKDError, match="cannot fetch timm's deit_tiny_distilled_patch16_224.fb_in1k weights .*pass the file"):
        start("timm:deit_tiny_distilled_patch16_224.fb_in1k", student_spec())
