"""Will the student hold where its teacher holds? Students and their teacher on the same shifted images.

Every shift of :mod:`cskd.data.shifts` at every severity is applied once to the raw validation
images; each model then answers them through its own preprocessing, as traffic would reach it.
Per shift: each model's top-1 (mean over severities), its agreement with the teacher, its relative
robustness (shifted top-1 over clean top-1), and what the student keeps of what the teacher keeps
(the ratio of the two relative robustnesses). Summary per model: mean corruption accuracy (mCA,
over ImageNet-C's 15 at every severity), relative robustness (mCA over clean top-1), and the
student's mCE with the teacher as the reference (Hendrycks & Dietterich's CE normalised by the
teacher's errors instead of AlexNet's: 100 is the teacher's robustness, below 100 better).
A student that declares the shift families it trained on (``source.trained_shifts`` of its package)
gets every figure twice: over all shifts, and over the shifts it never saw, which is where a
robustness claim is judged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from cskd.data.shifts import SEVERITIES, apply_shift, check_families, list_shifts
from cskd.errors import CSKDError

WARN_RATIO = 0.8  # a student keeping less than this share of what its teacher keeps on a shift is named


@dataclass
class ShiftOptions:
    images: int = 500  # the first validation images of the bench's sample
    severities: Sequence[int] = SEVERITIES
    families: Optional[Sequence[str]] = None  # None: every family
    seed: int = 0
    min_ratio: Optional[float] = None  # gate: fail when a student keeps less than this x its teacher's share on a shift


@dataclass
class SuiteModel:
    label: str
    role: str  # "teacher" or "student"
    predict: Callable[[np.ndarray], np.ndarray]  # uint8 [N, C, H, W] -> top-1 class per image
    trained_shifts: List[str] = field(default_factory=list)  # shift families its recipe trained on


def run_shift_suite(models: Sequence[SuiteModel], images: np.ndarray, labels: np.ndarray, options: ShiftOptions,
                    progress=None) -> Dict:
    """Every model on every shift x severity of ``images`` (uint8 ``[N, C, H, W]``); see the module doc."""
    if not any(m.role == "teacher" for m in models):
        raise CSKDError("the shift suite compares students with their teacher: give a teacher")
    validate_shift_options(options)
    images, labels = images[: options.images], labels[: options.images]
    started = time.perf_counter()
    clean = {m.label: _top1(m.predict(images), labels) for m in models}
    teacher = next(m for m in models if m.role == "teacher")
    cells = []
    for shift in list_shifts(options.families):
        for severity in options.severities:
            shifted = apply_shift(images, shift.name, severity, options.seed)
            answers = {m.label: m.predict(shifted) for m in models}
            cells.append({"shift": shift.name, "family": shift.family, "severity": severity,
                          "top1": {k: _top1(v, labels) for k, v in answers.items()},
                          "agreement": {k: 100.0 * float((v == answers[teacher.label]).mean()) for k, v in answers.items()}})
            if progress is not None:
                progress.update(1)
    result = {"images": int(len(images)), "seed": options.seed, "severities": list(options.severities),
              "teacher": teacher.label, "clean": clean, "cells": cells}
    result["per_shift"] = per_shift(cells, models, clean, teacher.label)
    result["summary"] = {m.label: summarise(m, result) for m in models}
    result["warnings"] = warnings(result, models)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def validate_shift_options(options: ShiftOptions) -> None:
    """Refuse options the suite cannot run, before anything is exported or timed."""
    if options.images < 1:
        raise CSKDError(f"--shift-images takes a positive count, got {options.images}")
    bad = [s for s in options.severities if s not in SEVERITIES]
    if bad or not options.severities:
        raise CSKDError(f"shift severities are among {list(SEVERITIES)}, got {list(options.severities)}")
    if options.families is not None:
        check_families(options.families)
    if options.min_ratio is not None and not 0 < options.min_ratio <= 1.5:
        raise CSKDError(f"--min-robustness-ratio is a share of the teacher's robustness (0.8 says 80%), got {options.min_ratio}")


def cell_count(options: ShiftOptions) -> int:
    return len(list_shifts(options.families)) * len(options.severities)


def _top1(predicted: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((predicted == labels).mean())


def per_shift(cells: List[Dict], models: Sequence[SuiteModel], clean: Dict[str, float], teacher: str) -> List[Dict]:
    """One row per shift: means over its severities, relative robustness, the student's share of the teacher's."""
    rows = []
    for name in dict.fromkeys(c["shift"] for c in cells):
        mine = [c for c in cells if c["shift"] == name]
        top1 = {m.label: float(np.mean([c["top1"][m.label] for c in mine])) for m in models}
        relative = {k: v / clean[k] if clean[k] > 0 else 0.0 for k, v in top1.items()}
        rows.append({
            "shift": name, "family": mine[0]["family"], "top1": top1, "relative": relative,
            "agreement": {m.label: float(np.mean([c["agreement"][m.label] for c in mine])) for m in models},
            "kept_vs_teacher": {m.label: relative[m.label] / relative[teacher] if relative[teacher] > 0 else float("inf")
                                for m in models if m.role != "teacher"},
            "seen": {m.label: mine[0]["family"] in m.trained_shifts for m in models if m.role != "teacher"},
        })
    return rows


def _corruption_figures(cells: List[Dict], label: str, teacher: str, clean: float, keep: Callable[[str], bool]) -> Dict:
    mine = [c for c in cells if c["family"] != "geometric" and keep(c["family"])]
    if not mine:
        return {}
    mca = float(np.mean([c["top1"][label] for c in mine]))
    errors = {}  # per corruption: summed over severities, the student's errors over the teacher's
    for name in dict.fromkeys(c["shift"] for c in mine):
        own = sum(100.0 - c["top1"][label] for c in mine if c["shift"] == name)
        reference = sum(100.0 - c["top1"][teacher] for c in mine if c["shift"] == name)
        errors[name] = own / reference if reference > 0 else float("inf")
    return {"mca": mca, "relative_robustness": mca / clean if clean > 0 else 0.0,
            "mce_vs_teacher": 100.0 * float(np.mean(list(errors.values()))), "corruptions": len(errors)}


def summarise(model: SuiteModel, result: Dict) -> Dict:
    cells, teacher, clean = result["cells"], result["teacher"], result["clean"][model.label]
    summary = {"clean": clean, **_corruption_figures(cells, model.label, teacher, clean, lambda f: True)}
    geometric = [c["top1"][model.label] for c in cells if c["family"] == "geometric"]
    if geometric:
        summary["geometric_top1"] = float(np.mean(geometric))
    if model.role != "teacher":
        summary["trained_shifts"] = list(model.trained_shifts)
        unseen = _corruption_figures(cells, model.label, teacher, clean, lambda f: f not in model.trained_shifts)
        teacher_unseen = _corruption_figures(cells, teacher, teacher, result["clean"][teacher], lambda f: f not in model.trained_shifts)
        summary["unseen"] = {**unseen, "teacher_mca": teacher_unseen.get("mca"),
                             "teacher_relative_robustness": teacher_unseen.get("relative_robustness")}
        below = [r for r in result["per_shift"] if r["kept_vs_teacher"][model.label] < WARN_RATIO]
        summary["below_ratio"] = {r["shift"]: round(r["kept_vs_teacher"][model.label], 3) for r in below}
    return summary


def warnings(result: Dict, models: Sequence[SuiteModel]) -> List[str]:
    lines = []
    for m in models:
        below = result["summary"][m.label].get("below_ratio")
        if below:
            shifts = ", ".join(f"{name} ({ratio:.2f}x)" for name, ratio in below.items())
            lines.append(f"{m.label} keeps less than {WARN_RATIO}x of what its teacher keeps under {shifts}: it will not "
                         "hold there where its teacher holds")
    return lines


def gate_failures(result: Dict, min_ratio: Optional[float]) -> List[str]:
    """Shifts on which a student keeps less than ``min_ratio`` x what its teacher keeps."""
    if min_ratio is None:
        return []
    failures = []
    for row in result["per_shift"]:
        for label, ratio in row["kept_vs_teacher"].items():
            if ratio < min_ratio:
                failures.append(f"{label} keeps {ratio:.2f}x of what its teacher keeps under {row['shift']}, "
                                f"--min-robustness-ratio is {min_ratio}")
    return failures


def format_suite(result: Dict) -> str:
    """One table per student: per shift student / teacher top-1 (mean over severities), agreement, kept ratio."""
    teacher = result["teacher"]
    blocks = []
    for label, summary in result["summary"].items():
        if label == teacher:
            continue
        lines = [f"shifts: {label} against {teacher} on {result['images']} images, severities "
                 f"{','.join(map(str, result['severities']))} (mean over them; * = a family its recipe trained on)",
                 f"  {'shift':<18} {'family':<9} {'student':>8} {'teacher':>8} {'agree':>7} {'kept':>6}"]
        for row in result["per_shift"]:
            ratio = row["kept_vs_teacher"][label]
            flag = "  <" if ratio < WARN_RATIO else ""
            lines.append(f"  {row['shift'] + ('*' if row['seen'][label] else ''):<18} {row['family']:<9} {row['top1'][label]:>8.2f} "
                         f"{row['top1'][teacher]:>8.2f} {row['agreement'][label]:>7.2f} {ratio:>5.2f}x{flag}")
        lines.append(f"  {'clean':<18} {'':<9} {summary['clean']:>8.2f} {result['clean'][teacher]:>8.2f}")
        ts = result["summary"][teacher]
        if "mca" in summary:
            lines.append(f"  mCA {summary['mca']:.2f} (teacher {ts['mca']:.2f}); relative robustness {summary['relative_robustness']:.3f} "
                         f"(teacher {ts['relative_robustness']:.3f}); mCE vs teacher {summary['mce_vs_teacher']:.1f} (teacher = 100)")
        unseen = summary.get("unseen", {})
        if summary.get("trained_shifts") and unseen.get("mca") is not None:
            lines.append(f"  unseen families only ({unseen['corruptions']} corruptions): mCA {unseen['mca']:.2f} (teacher "
                         f"{unseen['teacher_mca']:.2f}); relative {unseen['relative_robustness']:.3f} (teacher "
                         f"{unseen['teacher_relative_robustness']:.3f}); mCE vs teacher {unseen['mce_vs_teacher']:.1f}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def package_record(suite: Optional[Dict], label: str, clean: Dict, teacher_package: Dict) -> Dict:
    """What a student package keeps of its bench (``robustness.json``): what it was certified for. ``clean``:
    its top-1, the teacher's and their agreement on the clean validation images; the shift figures where
    the suite ran (``suite`` None: ``--no-shifts``, the clean agreement alone, which the shadow's default
    alert reads)."""
    record: Dict[str, Any] = {"certified_by": "cskd bench", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "teacher": teacher_package, "clean": clean, "shifts": {}, "summary": None}
    if suite is None:
        return record
    teacher = suite["teacher"]
    record["clean"] = {**clean, "shift_top1": suite["clean"][label], "shift_teacher_top1": suite["clean"][teacher],
                       "shift_images": suite["images"]}
    record.update({
        "shifts": {r["shift"]: {"family": r["family"], "top1": r["top1"][label], "teacher_top1": r["top1"][teacher],
                                "agreement_with_teacher": r["agreement"][label], "kept_vs_teacher": r["kept_vs_teacher"][label],
                                "seen_in_training": r["seen"][label]} for r in suite["per_shift"]},
        "summary": suite["summary"][label], "images": suite["images"], "seed": suite["seed"],
        "severities": suite["severities"],
    })
    return record
