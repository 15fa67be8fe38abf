"""``cskd bench``: deployed students against their teacher: latency, throughput, accuracy, speedup.

Every model is timed on the same real images after a warm-up, with models interleaved round by
round so that drift of a noisy machine hits all of them alike. Reports p50/p90/p99 latency and
throughput per batch size, top-1 on the validation split, the speedup over the teacher, and
optionally fails (non-zero exit) when a student is too slow or too inaccurate. Wherever top-1 is
measured, the shift suite (:mod:`cskd.measure.robustness`) runs too, and each student package gets
the figures it was certified for (``robustness.json`` beside its ``model.json``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from cskd.errors import CSKDError
from cskd.evaluate import ModelInput, real_images
from cskd.files import atomic_write_json, file_sha256
from cskd.measure import machine
from cskd.measure.plots import plot_bench, plot_served, plot_shifts
from cskd.measure.robustness import ShiftOptions, SuiteModel, cell_count, gate_failures, package_record, run_shift_suite
from cskd.measure.served import ServedModel, ServedOptions, check_served_tools, measure_served, served_rows
from cskd.progress import progress
from cskd.runtime.backends import Backend, BackendOptions, create_backend, run_batched
from cskd.runtime.package import ROBUSTNESS_JSON, ModelPackage
from cskd.runtime.preprocess import to_engine_input


@dataclass
class BenchOptions:
    batch_sizes: Sequence[int] = (1, 8)
    backend: Optional[str] = None  # default: each package's own
    rounds: int = 5
    iters: int = 20  # timed calls per model, batch size and round
    warmup: int = 5
    eval_images: int = 2000
    threads: Optional[int] = None
    providers: Optional[List[str]] = None  # onnxruntime execution providers
    data: Optional[str] = None
    data_path: Optional[str] = None
    expect_speedup: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    out: Path = Path("bench")
    served: Optional[ServedOptions] = None  # also serve every package and load it (cskd bench --served)
    shifts: Optional[ShiftOptions] = field(default_factory=ShiftOptions)  # None: clean images only (--no-shifts)


@dataclass
class Entry:
    label: str
    role: str
    folder: Path
    backend: Backend
    package: ModelPackage
    latencies: Dict[int, List[float]] = field(default_factory=dict)  # batch -> seconds per call
    top1: Optional[float] = None
    predicted: Optional[np.ndarray] = None  # top-1 class of every validation image
    agreement: Optional[float] = None  # % of the validation images on which its top-1 is the teacher's


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(entries: List[Entry], feeds: Dict[str, Dict[int, np.ndarray]], options: BenchOptions, progress) -> None:
    """Warm every model up, then time ``iters`` calls per model, batch size and round, interleaved."""
    for entry in entries:
        for batch in feeds[entry.label].values():
            for _ in range(options.warmup):
                entry.backend.infer(batch)
    for _ in range(options.rounds):
        for batch_size in options.batch_sizes:
            for entry in entries:
                times = entry.latencies.setdefault(batch_size, [])
                batch = feeds[entry.label][batch_size]
                for _ in range(options.iters):
                    start = time.perf_counter()
                    entry.backend.infer(batch)
                    times.append(time.perf_counter() - start)
                progress.update(1)


def predict(entry: Entry, images: np.ndarray) -> np.ndarray:
    """The top-1 class of every image (uint8 ``[N, C, H, W]``) by ``entry``'s engine."""
    spec = entry.package.input
    logits = run_batched(lambda rows: entry.backend.infer(to_engine_input(rows, spec.dtype, spec.mean, spec.std)),
                         images, entry.package.batch_limit(64))
    return logits.argmax(1)


def summarize(entries: List[Entry], options: BenchOptions) -> Dict:
    teacher = next(e for e in entries if e.role == "teacher")
    rows = []
    for entry in entries:
        for batch_size, times in sorted(entry.latencies.items()):
            p50 = _percentile(times, 50)
            t50 = _percentile(teacher.latencies[batch_size], 50)
            rows.append({
                "model": entry.label, "role": entry.role, "folder": str(entry.folder), "precision": entry.package.precision,
                "backend": entry.backend.name, "batch": batch_size,
                "p50_ms": 1000 * p50, "p90_ms": 1000 * _percentile(times, 90), "p99_ms": 1000 * _percentile(times, 99),
                "images_per_s": batch_size * len(times) / sum(times), "top1": entry.top1,
                "agreement_with_teacher": entry.agreement, "speedup_vs_teacher": t50 / p50,
            })
    return {"rows": rows, "teacher": teacher.label}


def check_gates(result: Dict, options: BenchOptions) -> List[str]:
    failures = []
    teacher_top1 = next(r["top1"] for r in result["rows"] if r["role"] == "teacher")
    for row in result["rows"]:
        if row["role"] == "teacher":
            continue
        if options.expect_speedup is not None and row["speedup_vs_teacher"] < options.expect_speedup:
            failures.append(f"{row['model']} at batch {row['batch']} is {row['speedup_vs_teacher']:.2f}x the teacher's speed, "
                            f"expected at least {options.expect_speedup}x")
        if options.max_accuracy_drop is not None and row["top1"] is not None and teacher_top1 is not None:
            drop = teacher_top1 - row["top1"]
            if drop > options.max_accuracy_drop + 1e-9:
                failures.append(f"{row['model']} top-1 {row['top1']:.2f}% is {drop:.2f} points below the teacher's "
                                f"{teacher_top1:.2f}%, allowed {options.max_accuracy_drop}")
    for row in result.get("served", []):
        if row["non_2xx"]:  # a server that answers errors fast would otherwise look fast
            failures.append(f"{row['model']} served at concurrency {row['concurrency']} gave {row['non_2xx']} non-2xx answers "
                            "or failed requests; see its server log")
        if row["role"] != "teacher" and options.expect_speedup is not None and row["served_speedup"] < options.expect_speedup:
            figure = "p50 latency" if row["concurrency"] == 1 else "throughput"
            failures.append(f"{row['model']} served at concurrency {row['concurrency']} is {row['served_speedup']:.2f}x the "
                            f"served teacher's {figure}, expected at least {options.expect_speedup}x")
    if result.get("shifts"):
        failures += gate_failures(result["shifts"], options.shifts.min_ratio if options.shifts else None)
    return sorted(set(failures))


def format_table(result: Dict) -> str:
    lines = [f"on {machine.one_line(result['machine'])}"] if "machine" in result else []
    lines += [f"{'model':<34} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'img/s':>9} {'top-1':>7} {'agree':>7} "
             f"{'speedup':>8}"]
    for r in result["rows"]:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        agree = f"{r['agreement_with_teacher']:.2f}" if r.get("agreement_with_teacher") is not None else "-"
        lines.append(f"{r['model']:<34} {r['batch']:>5} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                     f"{r['images_per_s']:>9.0f} {top1:>7} {agree:>7} {r['speedup_vs_teacher']:>7.2f}x")
    return "\n".join(lines)


def run_bench(students: Sequence[Path], teacher: Path, options: BenchOptions, log: Callable[[str], None] = print,
              on_engine: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Benchmark model package folders ``students`` against ``teacher`` (run directories are
    exported to packages by the ``cskd bench`` command before they get here). ``bench.json`` is written
    once the engines are timed and again after ``--served``, so a served stage that fails keeps the
    engine figures; ``on_engine`` (when given) gets the result at that point too."""
    if not students:
        raise CSKDError("give at least one student model package (or run directory) to benchmark")
    if any(b < 1 for b in options.batch_sizes):
        raise CSKDError(f"batch sizes must be positive, got {list(options.batch_sizes)}")
    if options.served is not None:
        check_served_tools()
    entries = []
    for role, folder in [("teacher", Path(teacher))] + [("student", Path(s)) for s in students]:
        backend_options = BackendOptions(threads=options.threads, spin=False, providers=options.providers)
        backend, package = create_backend(folder, options.backend, backend_options)
        label = f"{package.role} {package.precision}{' u8' if package.input.dtype == 'uint8' else ''} ({folder.name})"
        entries.append(Entry(label, role, folder, backend, package))
    shapes = {(e.package.input.channels, e.package.input.size) for e in entries}
    if len(shapes) != 1:
        raise CSKDError(f"the models take different inputs {sorted(shapes)}; benchmark models of one data set")
    largest = max(options.batch_sizes)
    if any(e.package.batch_limit(largest) < largest for e in entries):
        raise CSKDError(f"batch size {largest} exceeds an engine's batch limit (--max-batch at export); re-export or lower it")
    # Real validation images of the data set the models were trained on, as the first student's run
    # knows it: a teacher is often a checkpoint from elsewhere (own data: a fine-tuned file) that does not.
    first = next((e.package for e in entries if e.role == "student"), entries[0].package)
    model_input = ModelInput(first.input.channels, first.input.size, len(first.classes), tuple(first.classes))
    if options.eval_images > 0:
        images, labels = real_images(Path(first.source.get("checkpoint", ".")), model_input, "val", options.eval_images,
                                     options.data, options.data_path)
    else:  # latency only (e.g. random-weight models): synthetic pixels, no top-1
        images = np.random.default_rng(0).integers(0, 256, (largest, model_input.channels, model_input.size, model_input.size),
                                                   dtype=np.uint8)
        labels = None
    feeds = {}
    for entry in entries:
        spec = entry.package.input
        feeds[entry.label] = {b: to_engine_input(np.resize(images, (b, *images.shape[1:])), spec.dtype, spec.mean, spec.std)
                              for b in options.batch_sizes}
    for entry in entries:
        entry.predicted = predict(entry, images)
        entry.top1 = 100.0 * float((entry.predicted == labels).mean()) if labels is not None else None
    teacher_predicted = entries[0].predicted
    for entry in entries:  # top-1 agreement with the teacher: what a shadow teacher measures once it is deployed
        entry.agreement = 100.0 * float((entry.predicted == teacher_predicted).mean())
    suite = None
    if options.shifts is not None and labels is not None:
        suite = shift_suite(entries, images, labels, options.shifts)
    total = options.rounds * len(options.batch_sizes) * len(entries)
    with progress(total, "bench", "run") as bar:
        measure(entries, feeds, options, bar)
    result = summarize(entries, options)
    result.update({
        "machine": machine.describe(),
        "options": {k: (str(v) if isinstance(v, Path) else asdict(v) if is_dataclass(v) else v) for k, v in options.__dict__.items()},
        "eval_images": int(len(labels)) if labels is not None else 0,
    })
    if suite is not None:
        result["shifts"] = suite
    if labels is not None:
        certify(entries, suite, int(len(labels)), log)
    _save(result, options)
    if on_engine is not None:
        on_engine(result)
    if options.served is not None:
        served = [ServedModel(e.label, e.role, e.folder, e.package, feeds[e.label][options.batch_sizes[0]][:1]) for e in entries]
        runs = options.served.rounds * len(options.served.concurrency) * len(served)
        with progress(runs, "served", "run") as bar:
            measure_served(served, options.served, bar)
        result["served"] = served_rows(served, result["rows"])
        _save(result, options)
    result["plots"] = [str(p) for p in plot_bench(result, options.out)]
    if suite is not None:
        result["plots"].append(str(plot_shifts(suite, options.out / "shifts.png")))
    if "served" in result:
        result["plots"].append(str(plot_served(result["served"], options.out / "served.png")))
    return result


def shift_suite(entries: List[Entry], images: np.ndarray, labels: np.ndarray, options: ShiftOptions) -> Dict:
    """Every model on the shifted images (the first ``options.images`` of the validation sample)."""
    models = [SuiteModel(e.label, e.role, lambda rows, e=e: predict(e, rows), list(e.package.source.get("trained_shifts", [])))
              for e in entries]
    with progress(cell_count(options), "shifts", "shift") as bar:
        return run_shift_suite(models, images, labels, options, bar)


def certify(entries: List[Entry], suite: Optional[Dict], eval_images: int, log: Callable[[str], None]) -> None:
    """``robustness.json`` in each student package: what it was certified for against which teacher (the
    clean agreement always, the shift figures where the suite ran)."""
    teacher = next(e for e in entries if e.role == "teacher")
    identity = {"name": teacher.package.name, "folder": str(teacher.folder), "precision": teacher.package.precision,
                "engine_sha256": file_sha256(teacher.folder / teacher.package.engine)}
    for entry in entries:
        if entry.role == "teacher":
            continue
        clean = {"top1": entry.top1, "teacher_top1": teacher.top1, "agreement_with_teacher": entry.agreement,
                 "images": eval_images}
        try:
            atomic_write_json(entry.folder / ROBUSTNESS_JSON, package_record(suite, entry.label, clean, identity))
        except OSError as exc:  # a read-only package still gets its figures in bench.json
            log(f"cskd bench: could not record the certified figures in {entry.folder / ROBUSTNESS_JSON} ({exc}); they are in "
                "bench.json")


def _save(result: Dict, options: BenchOptions) -> None:
    """``bench.json`` with the gates judged on what it holds so far."""
    result["failures"] = check_gates(result, options)
    atomic_write_json(options.out / "bench.json", result)
