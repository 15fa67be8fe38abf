"""Build timm models by name, with errors a user can act on."""

from __future__ import annotations

from typing import Any, Callable, Tuple

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


def prefixed_group_matcher(inner: nn.Module, prefix: str, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
    """``inner``'s timm parameter groups (stem, blocks...) for a wrapper holding it as ``prefix``: what
    timm's layer-wise LR decay reads. timm groups the inner parameter names by their own matcher (a
    dict of rules or a function, whatever the model gives); the wrapper's parameters outside
    ``inner`` (its heads) come last, at the full rate, as timm places unmatched layers."""
    from timm.models import group_parameters

    if not hasattr(inner, "group_matcher"):
        raise CSKDError(f"{type(inner).__name__} has no timm layer grouping; drop train.layer_decay for this model")
    layers = group_parameters(inner, inner.group_matcher(coarse), reverse=True)  # inner name -> layer index

    def layer_of(name: str) -> Tuple[float, ...]:
        inner_name = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        return (float(layers[inner_name]),) if inner_name in layers else (float("inf"),)

    return layer_of
