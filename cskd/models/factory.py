"""Build timm models by name, with errors a user can act on."""

from __future__ import annotations

from typing import Any, Dict

import timm
import torch.nn as nn

from cskd.errors import CSKDError, did_you_mean


def create_timm_model(name: str, role: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with one-line errors.

    Pretrained weights are never fetched implicitly: ``student.init`` / ``teacher.init`` name them
    (:mod:`cskd.models.pretrained`).
    """
    if not timm.is_model(name):
        raise CSKDError(
            f"unknown {role} model {name!r}{did_you_mean(name, timm.list_models())}; "
            f"list timm's models with: python -c \"import timm; print(timm.list_models('*{name[:4]}*'))\""
        )
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:  # an option this architecture does not take
        raise CSKDError(f"cannot build {role} model {name!r} with {kwargs}: {exc}; remove that option") from None


def prefixed_group_matcher(inner: nn.Module, prefix: str, coarse: bool = False) -> Dict[str, Any]:
    """``inner``'s timm parameter groups (stem, blocks...) as seen from a wrapper holding it as ``prefix``:
    what timm's layer-wise LR decay reads. Parameters no rule matches (a wrapper's heads) keep the full rate."""
    if not hasattr(inner, "group_matcher"):
        raise CSKDError(f"{type(inner).__name__} has no timm layer grouping; drop train.layer_decay for this model")

    def prefixed(pattern: str) -> str:
        return rf"^{prefix}\.(?:{pattern.lstrip('^')})"

    return {group: prefixed(rule) if isinstance(rule, str) else [(prefixed(p), order) for p, order in rule]
            for group, rule in inner.group_matcher(coarse).items()}
