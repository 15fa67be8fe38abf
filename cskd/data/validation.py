"""The validation split a run is judged on, and what identifies it.

A student run validates on ``data``'s validation split with the eval transform at the run's input
size, cut to ``data.max_val`` images; the teacher's accuracy is measured on the very same images
(``cskd cache-teacher`` records it in its manifest, ``cskd train`` beside the pairing report).
:func:`validation_identity` says which images and transform a figure was measured with, so that a
figure recorded once is reused only where it describes this run's validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

from torch.utils.data import Dataset

from cskd.data.datasets import build_dataset, fingerprint
from cskd.data.samples import limit
from cskd.data.transforms import eval_transform

if TYPE_CHECKING:
    from cskd.config import DataConfig


def validation_set(data: "DataConfig", img_size: int) -> Dataset:
    """The images a run validates on: the validation split, eval transform at ``img_size``, ``data.max_val`` of them."""
    _, info = build_dataset(data.name, "val", data.path, data.channels)
    transform = eval_transform(img_size, info.channels, data.interpolation, data.eval_crop_pct)
    return limit(build_dataset(data.name, "val", data.path, data.channels, transform)[0], data.max_val)


def validation_identity(data: "DataConfig", img_size: int) -> Dict[str, Any]:
    """What must match for an accuracy measured on one run's validation to hold for another's: the
    split's images and labels (fingerprint), how many of them (:func:`~cskd.data.samples.limit`
    always takes the same subset), the channels they are decoded to and the eval transform."""
    split, info = build_dataset(data.name, "val", data.path, data.channels)
    return {"data": data.name, "fingerprint": fingerprint(split), "images": len(limit(split, data.max_val)),
            "channels": info.channels, "image_size": img_size, "interpolation": data.interpolation,
            "eval_crop_pct": data.eval_crop_pct}


@dataclass(frozen=True)
class TeacherAccuracy:
    """The teacher's top-1 and top-5 (percent) on a run's validation images, and which images
    (:func:`validation_identity`). Stored flat (``teacher_val_top1``, ``teacher_val_top5``,
    ``teacher_val_split``) in a teacher cache's manifest and in a run's pairing.json."""

    top1: float
    top5: float
    split: Dict[str, Any]
    source: str = "measured"  # how this run has it: measured (one pass now), cache (its manifest), recorded (resume)

    @property
    def images(self) -> int:
        return int(self.split["images"])

    def holds_for(self, split: Mapping[str, Any]) -> bool:
        """Whether it was measured on the images ``split`` identifies (compared as JSON stores them)."""
        return json.loads(json.dumps(self.split)) == json.loads(json.dumps(dict(split)))

    def record(self) -> Dict[str, Any]:
        return {"teacher_val_top1": self.top1, "teacher_val_top5": self.top5, "teacher_val_split": self.split}

    @classmethod
    def of_record(cls, record: Mapping[str, Any], source: str) -> Optional["TeacherAccuracy"]:
        """The figure a manifest or pairing.json holds, or None where it holds none (made before it was recorded)."""
        if record.get("teacher_val_top1") is None or not record.get("teacher_val_split"):
            return None
        return cls(float(record["teacher_val_top1"]), float(record["teacher_val_top5"]), dict(record["teacher_val_split"]), source)

    def line(self, teacher: str) -> str:
        where = {"measured": "measured now", "cache": "from the teacher cache", "recorded": "as this run recorded it"}[self.source]
        return (f"  teacher: {teacher} {self.top1:.2f}% top-1 ({self.top5:.2f}% top-5) on the {self.images} validation images "
                f"({where})")
