"""Small teacher and student architectures registered with timm.

The paper's models (DeiT-Ti/S/B distilled students, RegNetY/ResNet teachers) already live in timm.
These two are sized for the embedded Fashion-MNIST demo, so that ``cskd train`` finishes on a
2-core CPU in minutes. They are ordinary timm entry points: ``timm.create_model("cskd_resnet_micro")``
works once ``cskd.models`` is imported, and every timm option (``in_chans``, ``output_stride``,
``drop_path_rate``...) applies.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled, checkpoint_filter_fn
from timm.models.resnet import BasicBlock, ResNet


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        **kwargs,
    }


# timm looks up `default_cfgs` in the module of each registered entry point.
default_cfgs = generate_default_cfgs(
    {
        "cskd_resnet_micro.untrained": _cfg(first_conv="conv1", classifier="fc"),
        "cskd_deit_nano_distilled_patch4_32.untrained": _cfg(
            first_conv="patch_embed.proj", classifier=("head", "head_dist")
        ),
    }
)


@register_model
def cskd_resnet_micro(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet with one BasicBlock per stage and widths 24-192 (0.7M parameters).

    Use ``output_stride=8`` at 32 px to keep a 4x4 feature map, the demo's teacher grid.
    """
    args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(24, 48, 96, 192), stem_width=24)
    return build_model_with_cfg(ResNet, "cskd_resnet_micro", pretrained, **dict(args, **kwargs))


@register_model
def cskd_deit_nano_distilled_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """DeiT with distillation token: 4 blocks of width 96, 3 heads, 4 px patches on 32 px (0.46M)."""
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    return build_model_with_cfg(
        VisionTransformerDistilled,
        "cskd_deit_nano_distilled_patch4_32",
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),  # as timm's DeiTs: grids resampled
        **dict(args, **kwargs),
    )
