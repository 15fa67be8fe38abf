"""The parity gate: the exported engine against the PyTorch fused model on real validation images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np

# precision -> (max abs logit difference, minimum top-1 agreement %, maximum accuracy drop in points)
DEFAULT_THRESHOLDS = {
    "fp32": {"max_abs_diff": 1e-4, "min_agreement": 100.0, "max_accuracy_drop": 0.0},
    "fp16": {"max_abs_diff": None, "min_agreement": 99.0, "max_accuracy_drop": 0.5},
    "int8": {"max_abs_diff": None, "min_agreement": 99.0, "max_accuracy_drop": 0.5},
}


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    agreement: float  # % of images where both give the same top-1 class
    reference_top1: Optional[float]  # % accuracy of the PyTorch model (when labels exist)
    engine_top1: Optional[float]
    passed: bool
    failures: list

    def to_dict(self) -> Dict:
        return asdict(self)


def compare(reference: np.ndarray, engine: np.ndarray, labels: Optional[np.ndarray], precision: str,
            thresholds: Optional[Dict[str, Optional[float]]] = None) -> ParityReport:
    """Compare logits ``[N, K]`` of the reference and the engine against the precision's thresholds."""
    limits = thresholds or DEFAULT_THRESHOLDS[precision]
    diff = np.abs(reference.astype(np.float64) - engine.astype(np.float64))
    ref_top, eng_top = reference.argmax(1), engine.argmax(1)
    agreement = 100.0 * float((ref_top == eng_top).mean())
    ref_acc = eng_acc = None
    if labels is not None:
        ref_acc, eng_acc = 100.0 * float((ref_top == labels).mean()), 100.0 * float((eng_top == labels).mean())
    failures = []
    if limits.get("max_abs_diff") is not None and diff.max() > limits["max_abs_diff"]:
        failures.append(f"max abs logit difference {diff.max():.3g} > {limits['max_abs_diff']:.0e}")
    if agreement < limits["min_agreement"]:
        failures.append(f"top-1 agreement {agreement:.2f}% < {limits['min_agreement']}%")
    if ref_acc is not None and limits.get("max_accuracy_drop") is not None and ref_acc - eng_acc > limits["max_accuracy_drop"] + 1e-9:
        failures.append(f"accuracy drop {ref_acc - eng_acc:.2f} points > {limits['max_accuracy_drop']}")
    return ParityReport(len(reference), float(diff.max()), float(diff.mean()), agreement, ref_acc, eng_acc, not failures, failures)

