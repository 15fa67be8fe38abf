"""Build timm models by name, with errors a user can act on."""

from __future__ import annotations

from typing import Any

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
