"""Checkpoints: safetensors weights with a self-describing header, written atomically.

A cskd checkpoint is a ``.safetensors`` file whose metadata holds a :class:`ModelSpec` (what to
build, how to feed it, the class names), so ``cskd eval`` and ``cskd export`` need nothing else.
Optimizer, scaler and EMA state for ``--resume`` sit beside it in ``<name>.state.pt``
(tensors and plain containers only, loaded with ``weights_only=True``). Rebuilding a network from
a spec is the task's job (:mod:`cskd.tasks`); the rest of a run directory is :mod:`cskd.run`'s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from cskd.errors import CSKDError
from cskd.files import atomic_write

FORMAT = "cskd-checkpoint-1"
BEST, LAST = "best.safetensors", "last.safetensors"  # the checkpoints a run directory holds


@dataclass
class ModelSpec:
    """Everything needed to rebuild and feed a trained network."""

    role: str  # "student" (distilled ViT) or "teacher" (CNN): the task that built it
    model: str  # timm model name
    num_classes: int
    in_chans: int
    img_size: int
    patch_size: Optional[int] = None  # students only
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm arguments (output_stride...)
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    class_names: List[str] = field(default_factory=list)
    heads: List[str] = field(default_factory=list)  # students: the heads the prediction averages (empty: all three)

    def to_metadata(self) -> Dict[str, str]:
        return {"format": FORMAT, "spec": json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_metadata(cls, metadata: Dict[str, str], path: Path) -> "ModelSpec":
        if not metadata or metadata.get("format") != FORMAT:
            raise CSKDError(f"{path} is not a cskd checkpoint (no cskd header); pass a file written by `cskd train`")
        raw = json.loads(metadata["spec"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return cls(**raw)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``best.safetensors`` (else ``last.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CSKDError(f"run directory {path} holds no {BEST} or {LAST}; train first or pass a checkpoint file")
    if not path.is_file():
        raise CSKDError(f"checkpoint {path} does not exist; pass a run directory or a .safetensors file")
    return path


def save_weights(path: Path, state_dict: Dict[str, torch.Tensor], spec: ModelSpec, info: Dict[str, Any] | None = None) -> None:
    """Write weights and their spec (plus small JSON-able ``info``) as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {**spec.to_metadata(), "info": json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CSKDError(f"cannot read {path}: corrupted or not a safetensors file ({exc}); use an intact checkpoint") from None


def read_metadata(path: Path) -> Dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:
        raise CSKDError(f"cannot read {path}: corrupted or not a safetensors file ({exc}); use an intact checkpoint") from None


def read_spec(path: Path) -> Optional[ModelSpec]:
    """The spec of a cskd checkpoint file, or None for a plain state dict."""
    if Path(path).suffix != ".safetensors":
        return None
    metadata = read_metadata(path)
    return ModelSpec.from_metadata(metadata, path) if metadata.get("format") == FORMAT else None


def checkpoint_epoch(path: Path) -> Optional[int]:
    """The epoch (1-based) whose weights a run's checkpoint holds, from the ``info`` of its header;
    None when the file does not exist or records no epoch."""
    if not Path(path).is_file():
        return None
    return json.loads(read_metadata(path).get("info", "{}")).get("epoch")


def load_weights(path: str | Path) -> Tuple[Dict[str, torch.Tensor], ModelSpec, Dict[str, Any]]:
    """Read a cskd checkpoint (a file, or a run directory's best): ``(state_dict, spec, info)``."""
    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    spec = ModelSpec.from_metadata(metadata, path)
    return tensors, spec, json.loads(metadata.get("info", "{}"))


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A plain state dict from a ``.safetensors`` or a torch file (``weights_only``: no pickle code)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CSKDError(f"cannot read {path} as a state dict ({exc}); pass a .safetensors or a weights-only .pth") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_strict(model: nn.Module, tensors: Dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load ``tensors`` into ``model``; any missing, unexpected or mis-shaped tensor is an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    mismatched = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        first = (mismatched or missing or unexpected)[0]
        raise CSKDError(
            f"{path} does not fit {arch!r}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mis-shaped tensors (first: {first}); pass a checkpoint of this architecture and class count"
        )
    model.load_state_dict(tensors)  # copies into the model's own dtype (fp16 files load into fp32 models)


def load_into(model: nn.Module, path: Path, role: str, expect_model: str) -> Optional[ModelSpec]:
    """Load checkpoint file ``path`` into a bare timm ``model``; return its spec when it is a cskd checkpoint."""
    spec = read_spec(path)
    if spec is not None and spec.model != expect_model:
        raise CSKDError(f"{path} holds {spec.model!r}, not {expect_model!r}; set {role}.model={spec.model}")
    load_strict(model, read_state_dict(path), path, expect_model)
    return spec


def save_state(path: Path, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CSKDError(f"cannot read resume state {path} ({exc}); resume from an intact run or start a new one") from None
