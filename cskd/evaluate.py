"""``cskd eval``: top-1/top-5 of every head of a checkpoint on a data set, as a table and JSON."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cskd.checkpoint import ModelSpec, resolve_checkpoint
from cskd.config import DataConfig
from cskd.data.datasets import FASHION_MNIST_CLASSES, build_dataset
from cskd.data.samples import sample_images
from cskd.data.transforms import eval_transform
from cskd.distributed import DistEnv, pick_device
from cskd.engine import Normalization, evaluate
from cskd.errors import CSKDError
from cskd.files import atomic_write_json
from cskd.progress import progress
from cskd.run import RunDir
from cskd.tasks import load_trained

DEMO_DATA = "fashion-mnist-demo"


@dataclass(frozen=True)
class ModelInput:
    """What a model takes and predicts: enough to pick its evaluation images."""

    channels: int
    size: int
    num_classes: int
    class_names: Tuple[str, ...] = ()  # empty: not recorded

    @classmethod
    def of_spec(cls, spec: ModelSpec) -> "ModelInput":
        return cls(spec.in_chans, spec.img_size, spec.num_classes, tuple(spec.class_names))


def evaluation_dataset(checkpoint: Path, model: ModelInput, split: str, data_name: Optional[str] = None,
                       data_path: Optional[str] = None, trained_on: Optional[DataConfig] = None) -> Tuple[Dataset, str]:
    """``(dataset, name)``: a split of the data set the model was trained on (or the one named), with
    the eval transform at the model's size and channels; its classes must match the model's.

    What the model was trained on is ``trained_on`` (the data config of the run it belongs to: a
    teacher exported from its student's run), else the config of the run directory holding
    ``checkpoint``; a checkpoint outside any run is taken to be the embedded demo's only when its
    classes are the demo's (the packaged teacher), else the data set must be named.
    """
    run = RunDir.of_checkpoint(checkpoint) if trained_on is None else None
    defaults = trained_on or (run.data_config() if run is not None else None)
    if defaults is None and data_name is None and model.class_names and list(model.class_names) != FASHION_MNIST_CLASSES:
        raise CSKDError(f"{checkpoint} is not in a run directory, so the data it was trained on is unknown (its classes: "
                        f"{', '.join(model.class_names[:3])}, ...); name it with --data NAME (and --data-path PATH)")
    name = data_name or (defaults.name if defaults else DEMO_DATA)
    same_data = defaults is not None and name == defaults.name
    path = data_path or (defaults.path if same_data else None)
    interpolation = defaults.interpolation if same_data else "bicubic"
    crop_pct = defaults.eval_crop_pct if defaults is not None else 1.0  # how the model was validated
    dataset, info = build_dataset(name, split, path, model.channels, eval_transform(model.size, model.channels, interpolation, crop_pct))
    if info.num_classes != model.num_classes:
        raise CSKDError(f"{checkpoint} predicts {model.num_classes} classes but {name} has {info.num_classes}; "
                        "use the data set it was trained on (--data)")
    if model.class_names and list(model.class_names) != info.class_names:
        raise CSKDError(f"{checkpoint} predicts the classes {', '.join(model.class_names[:3])}, ... but {name} has "
                        f"{', '.join(info.class_names[:3])}, ...; use the data set it was trained on (--data, --data-path)")
    return dataset, name


def real_images(checkpoint: Path, model: ModelInput, split: str, count: int, data: Optional[str] = None,
                data_path: Optional[str] = None, trained_on: Optional[DataConfig] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` images of the model's data set (see :func:`evaluation_dataset`) as uint8 ``[N, C, H, W]``
    at the model's size, with labels (the first of :func:`~cskd.data.samples.sample_order`)."""
    return sample_images(evaluation_dataset(checkpoint, model, split, data, data_path, trained_on)[0], count)


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
    trained = load_trained(resolve_checkpoint(checkpoint))
    dataset, name = evaluation_dataset(trained.path, ModelInput.of_spec(trained.spec), split, data_name, data_path)
    env = DistEnv(0, 1, 0, pick_device(device))
    trained.model.to(env.device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    norm = Normalization(trained.spec.mean, trained.spec.std)
    with progress(len(loader), f"eval {trained.path.name}", "batch", show_progress) as bar:
        result = evaluate(trained.model, trained.task.head_logits, loader, norm, env, progress_bar=bar)
    return {
        "checkpoint": str(trained.path),
        "model": trained.spec.model,
        "role": trained.spec.role,
        "heads": trained.spec.heads,
        "data": name,
        "split": split,
        "trained_epochs": trained.info.get("epoch"),
        **result,
        "teacher": run_teacher(trained.path, name, split),
    }


def run_teacher(checkpoint: Path, data: str, split: str) -> Optional[Dict[str, Any]]:
    """The teacher's top-1/top-5 as the distilled run holding ``checkpoint`` recorded them on its validation
    images, when this evaluation is on that data's validation split (else they would describe other images)."""
    run = RunDir.of_checkpoint(checkpoint)
    accuracy = run.teacher_accuracy if run is not None else None
    if accuracy is None or split != "val" or accuracy.split.get("data") != data:
        return None
    return {"model": run.config().teacher.model, "top1": accuracy.top1, "top5": accuracy.top5, "count": accuracy.images}


def format_table(result: Dict[str, Any]) -> str:
    lines = [f"{result['model']} ({result['role']}) on {result['data']}/{result['split']}, {result['count']} images",
             f"{'head':<8} {'top-1':>7} {'top-5':>7}"]
    for head, top1 in result["top1"].items():
        lines.append(f"{head:<8} {top1:>6.2f}% {result['top5'][head]:>6.2f}%")
    teacher = result.get("teacher")
    if teacher:
        lines.append(f"{'teacher':<8} {teacher['top1']:>6.2f}% {teacher['top5']:>6.2f}%  ({teacher['model']}, as the run "
                     f"measured it on its {teacher['count']} validation images)")
    if result.get("heads"):
        lines.append(f"fused = mean of {' + '.join(result['heads'])}")
    return "\n".join(lines)


def write_json(result: Dict[str, Any], path: Path) -> None:
    atomic_write_json(path, result)
