"""``cskd eval``: top-1/top-5 of every head of a checkpoint on a data set, as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from cskd.checkpoint import ModelSpec, atomic_write, load_model, resolve_checkpoint


def data_defaults(checkpoint: Path) -> Dict[str, Any]:
    """The data section of the run that wrote ``checkpoint`` (its config.yaml), if there is one."""
    config = checkpoint.parent / "config.yaml"
    if config.is_file():
        return (yaml.safe_load(config.read_text()) or {}).get("data", {})
    return {}


def evaluation_dataset(checkpoint: Path, spec: ModelSpec, split: str, data_name: Optional[str] = None,
                       data_path: Optional[str] = None) -> Tuple[Any, str]:
    """``(dataset, name)``: a split of the data set ``checkpoint`` was trained on (or the one named),
    with the eval transform at the model's size and channels; its classes must match the model's."""
    from cskd.data.datasets import build_dataset
    from cskd.data.transforms import eval_transform
    from cskd.errors import CSKDError

    defaults = data_defaults(checkpoint)
    name = data_name or defaults.get("name", "fashion-mnist-demo")
    same_data = name == defaults.get("name")
    path = data_path or (defaults.get("path") if same_data else None)
    interpolation = defaults.get("interpolation", "bicubic") if same_data else "bicubic"
    dataset, info = build_dataset(name, split, path, spec.in_chans, eval_transform(spec.img_size, spec.in_chans, interpolation))
    if info.num_classes != spec.num_classes:
        raise CSKDError(f"{checkpoint} predicts {spec.num_classes} classes but {name} has {info.num_classes}; "
                        "use the data set it was trained on (--data)")
    return dataset, name


def run_eval(
    checkpoint: str | Path,
    data_name: Optional[str] = None,
    data_path: Optional[str] = None,
    split: str = "val",
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 2,
    show_progress: bool = True,
) -> Dict[str, Any]:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from cskd.distributed import DistEnv, pick_device
    from cskd.engine import Normalization, evaluate

    path = resolve_checkpoint(checkpoint)
    model, spec, info = load_model(path)
    dataset, name = evaluation_dataset(path, spec, split, data_name, data_path)
    env = DistEnv(0, 1, 0, pick_device(device))
    model.to(env.device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    with tqdm(total=len(loader), desc=f"eval {path.name}", unit="batch", leave=False, disable=not show_progress) as bar:
        result = evaluate(model, loader, Normalization(spec.mean, spec.std), env, progress_bar=bar)
    return {
        "checkpoint": str(path),
        "model": spec.model,
        "role": spec.role,
        "data": name,
        "split": split,
        "trained_epochs": info.get("epoch"),
        **result,
    }


def format_table(result: Dict[str, Any]) -> str:
    lines = [f"{result['model']} ({result['role']}) on {result['data']}/{result['split']}, {result['count']} images",
             f"{'head':<8} {'top-1':>7} {'top-5':>7}"]
    for head, top1 in result["top1"].items():
        lines.append(f"{head:<8} {top1:>6.2f}% {result['top5'][head]:>6.2f}%")
    return "\n".join(lines)


def write_json(result: Dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
