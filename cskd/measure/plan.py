"""``cskd plan``: choose the student for a deployment target before training it.

A student's latency does not depend on its trained weights, so each candidate is measured
untrained, deployed exactly as it would be after training: built from the config with its
overrides, saved as an untrained run directory (the config that trains it and its initial weights),
exported from there by :func:`cskd.export.exporter.export_model` at the target's format and
precision (the parity gate off: random weights have no accuracy to keep), and timed with the teacher
in one interleaved ``cskd bench`` run (:func:`cskd.measure.bench.run_bench`). Beside its latency:
parameters and FLOPs of the fused model (:func:`cskd.pairing.count_flops`) and the images/s of its
training step on this machine (:mod:`cskd.measure.training`). A budget (batch-1 latency, or speedup
over the teacher) marks the candidates that meet it; ``--proxy-epochs`` trains those briefly and ranks
them by accuracy, each in the same wall time by default: the time ``--proxy-epochs`` epochs of the
config's own student take, measured on real batches and a validation pass (what the synthetic step
leaves out), given to each candidate as a budget of optimiser steps (``train.max_steps``) that its
learning-rate schedule is laid out over. The seconds per epoch those runs measure, each epoch timed
from its own start, give each candidate's epochs in the training time of the config's own student;
``--train`` trains the pick in that time (else with the config's epochs).

```
OUT/plan.json, plan.png, plan.log    the table as JSON, latency against FLOPs, what the exports said
OUT/untrained/LABEL/                 config.yaml (trains LABEL) and best.safetensors (its initial weights)
OUT/packages/LABEL/, packages/teacher/    the model packages that were timed
OUT/bench/                           the interleaved benchmark (bench.json, latency.png)
OUT/proxy/LABEL/, OUT/train/LABEL/   --proxy-epochs and --train runs
```

``plan.json`` is written after every stage (built, training step, engine, served, each proxy, trained;
its ``stages`` say which are done), so a stage that fails keeps what the earlier ones measured. The
folder is the plan's own: a rerun into one that holds a plan is refused before any work, unless
``force`` (``--force``) replaces what the earlier plan wrote there (:func:`claim_out`). Refused by
default because those folders hold runs that cost real time (the proxies, the ``--train`` run), as
``cskd train`` and ``cskd export`` refuse an output that holds a run or a package.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from cskd.checkpoint import save_weights
from cskd.config import Config, load_config
from cskd.data.datasets import DatasetInfo, build_dataset
from cskd.distributed import DistEnv, pick_device
from cskd.engine import StepContext
from cskd.errors import CSKDError, did_you_mean
from cskd.export.exporter import ExportOptions, export_model
from cskd.export.formats import PRECISIONS, check_export_args
from cskd.files import atomic_write_json
from cskd.measure import machine
from cskd.measure.bench import BenchOptions, run_bench
from cskd.measure.candidates import Candidate, Network, default_family, label, network_key, train_command, unique
from cskd.measure.plots import plot_plan
from cskd.measure.served import ServedOptions, check_served_tools
from cskd.measure.training import EpochCost, epoch_cost, random_cache, step_context, synthetic_batches, training_rates
from cskd.models import DenseTeacher
from cskd.pairing import count_flops, count_params
from cskd.progress import progress
from cskd.run import RunDir, resolve_cache_reference, resolve_teacher_reference
from cskd.runtime.package import MODEL_JSON, read_package
from cskd.tasks import get_task, load_trained
from cskd.teacher_cache import TeacherCache, storage_topk
from cskd.teachers import teacher_network
from cskd.train import build_loaders, train

# The target backend -> the export format that runs on it.
BACKENDS = {"onnxruntime": "onnx", "openvino": "onnx", "tensorrt": "trt"}
# How the proxy runs are made comparable: in equal training time (the question a plan answers: which
# student is best for this budget at the time its training can take; on the demo a same-epochs proxy
# ranked the deepest candidate second and equal-time training ranked it last, docs/benchmarks.md),
# or in equal epochs.
PROXY_SCHEDULES = ("time", "epochs")
PARITY_IMAGES = 64  # the parity figures of an untrained package are recorded, not gated: a few images do
# Real training steps timed per candidate (after 3 of warm-up) for its proxy's step budget: a few seconds each,
# within a few percent of what its epochs then take.
PROXY_TIMED_STEPS = 20
# What a plan writes in its folder, all of it its own (claim_out refuses or replaces exactly these).
PLAN_OUTPUTS = ("plan.json", "plan.png", "plan.log", "untrained", "packages", "bench", "proxy", "train", "random-teacher-maps")
NOTES = (
    "weights: untrained (latency does not depend on them); the parity gate is off and model.json says so",
    "training images/s: the real step (loss, optimiser, cached-teacher targets) on synthetic batches, data loading not timed",
)


@dataclass
class PlanOptions:
    config: Optional[str] = None  # YAML file or packaged recipe name; None: the packaged demo
    overrides: Sequence[str] = ()  # key=value, as `cskd train` takes them
    teacher: Optional[Path] = None  # a model package, run directory or checkpoint; None: the config's teacher
    teacher_precision: str = "fp32"  # the config's teacher is exported at this precision
    backend: str = "onnxruntime"  # the target runtime: onnxruntime | openvino | tensorrt
    precision: str = "fp32"  # the candidates' precision: fp32 | fp16 | int8
    batch_sizes: Sequence[int] = (1, 8)  # 1 is always measured: the budget is at batch 1
    served: bool = False  # judge the budget behind `cskd serve` (hey at concurrency 1), as `cskd bench --served`
    served_seconds: float = 5.0  # of load per package
    max_latency_ms: Optional[float] = None  # budget: batch-1 p50 at most this
    min_speedup: Optional[float] = None  # budget: batch-1 p50 at least this many times the teacher's
    candidates: Sequence[Candidate] = ()  # empty: the default family (cskd.measure.candidates.default_family)
    calib_images: int = 64  # int8: training images to calibrate each candidate on (the recipe as it is, no tuning)
    rounds: int = 5  # interleaved benchmark rounds
    iters: int = 20  # timed calls per model, batch size and round
    train_steps: int = 5  # timed training steps per candidate and round (after 3 of warm-up)
    train_rounds: int = 3  # interleaved rounds of them (the median is reported)
    threads: Optional[int] = None  # onnxruntime threads (default: all cores)
    proxy_epochs: int = 0  # train the candidates within budget briefly and rank them by accuracy (see proxy_schedule)
    proxy_schedule: str = "time"  # time: each the time proxy_epochs of the config's student take; epochs: proxy_epochs each
    train: bool = False  # then train the pick, in the config student's training time where the proxies measured it
    out: Optional[Path] = None  # None: runs/plan-<timestamp>
    force: bool = False  # replace what an earlier plan wrote in out (else a folder holding a plan is refused)
    show_progress: bool = True


@dataclass
class Planned:
    """One candidate, built and exported: what the plan knows of it before timing."""

    candidate: Candidate
    label: str
    config: Config  # the resolved config that trains it
    overrides: List[str]  # what turns the user's config into that one
    params: int  # of the fused (deployed) model
    flops: int  # per image, fused model, batch 1
    run_dir: Path
    package: Path
    network: Network  # the network as built (candidates.network_key): the config's own student is found by it
    train_images_per_s: Optional[float] = None  # measured once every candidate is built
    measured: Dict[str, Any] = field(default_factory=dict)  # p50 per batch size, speedup, served figures, budget, proxy


@dataclass
class Measured:
    """What the plan has measured so far: ``plan.json`` is written from it after every stage."""

    planned: List[Planned] = field(default_factory=list)
    teacher: Optional[Path] = None  # its package
    teacher_cost: Tuple[Optional[int], Optional[int]] = (None, None)  # parameters, FLOPs
    teacher_figures: Optional[Dict[str, Any]] = None  # its p50 and speedups (1.0), once the engines are timed
    stages: List[str] = field(default_factory=list)  # done, in order: built, training step, engine, served, proxy, trained
    proxy: Dict[str, Any] = field(default_factory=dict)  # the proxies' schedule and, at equal time, their budget
    trained: Optional[Dict[str, Any]] = None  # --train's run


def check_options(options: PlanOptions) -> None:
    """Every option in its allowed set or range, before any work."""
    if options.backend not in BACKENDS:
        raise CSKDError(f"--backend {options.backend} is not one of {', '.join(BACKENDS)}{did_you_mean(options.backend, BACKENDS)}")
    for flag, precision in (("--precision", options.precision), ("--teacher-precision", options.teacher_precision)):
        if precision not in PRECISIONS:
            raise CSKDError(f"{flag} {precision} is not one of {', '.join(PRECISIONS)}{did_you_mean(precision, PRECISIONS)}")
    if any(b < 1 for b in options.batch_sizes):
        raise CSKDError(f"--batch-sizes takes positive numbers, got {list(options.batch_sizes)}")
    for flag, value in (("--max-latency-ms", options.max_latency_ms), ("--min-speedup", options.min_speedup)):
        if value is not None and value <= 0:
            raise CSKDError(f"{flag} {value} is not a positive number; give the budget as, e.g., {flag} 4")
    for flag, value, least in (("--rounds", options.rounds, 1), ("--iters", options.iters, 1), ("--train-steps", options.train_steps, 1),
                               ("--train-rounds", options.train_rounds, 1),
                               ("--calib-images", options.calib_images, 1), ("--proxy-epochs", options.proxy_epochs, 0)):
        if value < least:
            raise CSKDError(f"{flag} {value} is below {least}; pass a count of at least {least}")
    if options.proxy_schedule not in PROXY_SCHEDULES:
        raise CSKDError(f"--proxy-schedule {options.proxy_schedule} is not one of {', '.join(PROXY_SCHEDULES)}"
                        f"{did_you_mean(options.proxy_schedule, PROXY_SCHEDULES)}")
    if options.served:
        check_served_tools()  # the served stage comes after every candidate is built, exported and timed
    try:
        check_export_args(BACKENDS[options.backend], options.precision, "float").preflight(None)
    except CSKDError as exc:  # e.g. no TensorRT here: the fix for a plan is another target
        raise CSKDError(f"--backend {options.backend}: {exc}; or plan for --backend onnxruntime or openvino") from None


def plan(options: PlanOptions, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Build, export and time every candidate with the teacher; returns what ``plan.json`` holds (written
    after every stage: a later failure keeps the earlier figures)."""
    started = time.perf_counter()
    check_options(options)
    notes: List[str] = []
    base = load_config(options.config, options.overrides, notes)
    _check_config(base, options)
    img_size, patch_size = base.student.img_size, base.student.patch_size
    candidates = unique(options.candidates, img_size, patch_size) or default_family(
        base.student.model, base.student.kwargs, img_size, patch_size)
    out = Path(options.out) if options.out else RunDir.default_path("plan")
    claim_out(out, options, base)
    out.mkdir(parents=True, exist_ok=True)
    export_log = _file_log(out / "plan.log")
    _, info = build_dataset(base.data.name, "val", base.data.path, base.data.channels)
    measured = Measured(proxy={"schedule": options.proxy_schedule} if options.proxy_epochs else {})

    def write() -> Dict[str, Any]:
        result = _result(options, base, info, measured, notes, out)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        atomic_write_json(out / "plan.json", result)
        if all("within_budget" in c for c in result["candidates"]) and measured.teacher_figures is not None:
            plot_plan(result, out / "plan.png")
        return result

    cache = _training_cache(base, info, out)
    device = pick_device(base.train.device)
    steps: List[StepContext] = []
    with progress(len(candidates) + 1, "plan: build, export", "model", options.show_progress) as bar:
        for candidate in candidates:
            candidate_plan, step = _prepare(candidate, options, base, info, cache, device, out, export_log)
            measured.planned.append(candidate_plan)
            steps.append(step)
            write()
            bar.update(1)
        measured.teacher, teacher_net = _teacher_package(options, base, info, measured.planned[0].run_dir, out, export_log)
        measured.teacher_cost = _cost(teacher_net, (info.channels, img_size, img_size))
        bar.update(1)
    measured.stages.append("built")
    write()
    batches = synthetic_batches(base.train.batch_size, options.train_steps, info.channels, img_size,
                                info.num_classes, cache.manifest.count if cache is not None else 1, device)
    rates = training_rates(steps, batches, options.train_rounds)
    for candidate_plan, rounds in zip(measured.planned, rates):
        candidate_plan.train_images_per_s = statistics.median(rounds)
    del steps, batches  # the networks and optimiser states: not needed for timing the engines
    measured.stages.append("training step")
    write()

    def engine_timed(bench: Dict[str, Any]) -> None:  # before --served, which can still fail
        measured.teacher_figures = _record(measured.planned, bench, options)
        measured.stages.append("engine")
        write()

    bench = run_bench([p.package for p in measured.planned], measured.teacher, _bench_options(options, out), export_log,
                      on_engine=engine_timed)
    if options.served:
        measured.teacher_figures = _record(measured.planned, bench, options)
        measured.stages.append("served")
    result = write()
    if options.proxy_epochs:
        _proxy(options, base, info, measured, cache, device, out, write)
        measured.stages.append("proxy")
        result = write()
    if options.train:
        measured.trained = train_pick(options, result)
        measured.stages.append("trained")
        result = write()
    return result


def claim_out(out: Path, options: PlanOptions, cfg: Config) -> None:
    """Make ``out`` the plan's own, before any work: a folder that holds an earlier plan's outputs
    (:data:`PLAN_OUTPUTS`) is refused, or with ``force`` those outputs are deleted (nothing else in it is
    touched). Refusing is the default because they hold runs that cost real time to make (proxies, the
    ``--train`` run); a rerun would otherwise stop on them part-way (``already holds a run``) after
    re-measuring everything. An input of this plan inside them (its config, teacher, cache or data) is
    refused even with ``force``."""
    held = [out / name for name in PLAN_OUTPUTS if (out / name).exists()]
    if not held:
        return
    if not options.force:
        raise CSKDError(f"{out} already holds a plan ({', '.join(p.name for p in held)}); pass a fresh --out, or --force to "
                        "replace that plan's outputs (its packages, proxy and train runs included)")
    inputs = [("--config", options.config), ("--teacher", options.teacher),
              ("teacher.cache", cfg.teacher.cache and str(resolve_cache_reference(cfg.teacher.cache))),
              ("teacher.checkpoint", cfg.teacher.checkpoint and str(resolve_teacher_reference(cfg.teacher.checkpoint))),
              ("data.path", cfg.data.path)]
    for name, value in inputs:
        inside = next((p for p in held if value and Path(value).exists() and Path(value).resolve().is_relative_to(p.resolve())),
                      None)
        if inside is not None:
            raise CSKDError(f"{name} {value} is inside {inside}, which --force would delete; copy it out of {out} or pass a "
                            "fresh --out")
    for path in held:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_config(cfg: Config, options: PlanOptions) -> None:
    """A config that trains a student and, for ``--proxy-epochs``, caches its teacher: refused before any work."""
    if cfg.train.target != "student":
        raise CSKDError(f"cskd plan chooses a student, and this config trains the {cfg.train.target} (train.target="
                        f"{cfg.train.target}); plan with a student config (the demo's, or train.target=student)")
    if options.proxy_epochs and get_task(cfg.train.target).distils(cfg) and not cfg.teacher.cache:
        raise CSKDError("--proxy-epochs trains every candidate within budget from the cached teacher, and this config runs the "
                        "teacher online (no teacher.cache); cache it once with `cskd cache-teacher` (the same config and "
                        "overrides) and pass teacher.cache=ITS_FOLDER")


def _file_log(path: Path) -> Callable[[str], None]:
    """A log that appends lines to ``path``: what the exports and the benchmark say, kept off the console."""
    def write(line: str) -> None:
        with open(path, "a") as f:
            f.write(line + "\n")

    return write


def _training_cache(cfg: Config, info: DatasetInfo, out: Path) -> Optional[TeacherCache]:
    """The teacher maps the training step reads: the config's cache, or random maps of the teacher's grid
    (a run that caches its teacher reads maps of that shape; without distillation, none)."""
    if not get_task(cfg.train.target).distils(cfg):
        return None
    if cfg.teacher.cache:
        return TeacherCache(resolve_cache_reference(cfg.teacher.cache))
    probe = torch.zeros(1, info.channels, cfg.student.img_size, cfg.student.img_size)
    with torch.inference_mode():
        grid = tuple(DenseTeacher(teacher_network(cfg, info)).eval()(probe)[0].shape[-2:])
    return random_cache(out / "random-teacher-maps", 1024, info.num_classes, grid, storage_topk(info.num_classes, None))


def candidate_config(options: PlanOptions, candidate: Candidate, base: Config, extra: Sequence[str] = ()) -> Tuple[Config, List[str]]:
    """The config that trains ``candidate`` (the user's config and overrides, then the candidate's, then
    ``extra``) and the overrides that make it from the user's config."""
    overrides = candidate.overrides(base.student.img_size, base.student.patch_size)
    return load_config(options.config, [*options.overrides, *overrides, *extra]), overrides


def _prepare(candidate: Candidate, options: PlanOptions, base: Config, info: DatasetInfo, cache: Optional[TeacherCache],
             device: torch.device, out: Path, log: Callable[[str], None]) -> Tuple[Planned, StepContext]:
    """Build ``candidate`` untrained, save it as a run directory, count its cost and export it; with its
    training step (timed later, with the others, interleaved)."""
    cfg, overrides = candidate_config(options, candidate, base)
    task = get_task("student")
    spec = task.spec(cfg, info)
    torch.manual_seed(cfg.train.seed)
    model = unshared(task.build(spec))
    vit = task.network(model)
    name = label(candidate, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, spec.patch_size)
    run = RunDir(out / "untrained" / name)
    cfg.output = str(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    save_weights(run.best, task.weights(model), spec, {"epoch": 0, "untrained": True})
    params, flops = _cost(task.deployable(model), (spec.in_chans, spec.img_size, spec.img_size))
    log(f"== {name}: {cfg.student.model} {dict(cfg.student.kwargs)} patch {spec.patch_size}")
    package, _ = export_model(run.path, _export_options(options, out / "packages" / name, options.precision), log)
    network = network_key(candidate, base.student.img_size, base.student.patch_size)
    return (Planned(candidate, name, cfg, overrides, params, flops, run.path, package, network),
            step_context(cfg, spec, cache, device))


@torch.no_grad()
def unshared(model: torch.nn.Module, scale: float = 1e-3) -> torch.nn.Module:
    """``model`` with a little positive noise on every float tensor. Freshly initialised networks hold
    many equal tensors (LayerNorm's ones, zero biases) that the ONNX exporter shares through Identity
    nodes; trained weights never are equal, and the package timed must be the one a trained run exports."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.add_(scale * torch.rand_like(tensor))
    return model


def _export_options(options: PlanOptions, out: Path, precision: str, teacher: bool = False) -> ExportOptions:
    """What ``cskd export`` is told for a planned package: the target's format and backend, ``precision``,
    the gate off (nothing to keep in random weights) and, for int8, ``calib_images`` and no tuning
    (the recipe as it is: a trained export's tuning may keep a few more nodes in float)."""
    return ExportOptions(format=BACKENDS[options.backend], backend=options.backend, precision=precision, out=out,
                         teacher=teacher, gate=False, parity_images=PARITY_IMAGES, calib_images=options.calib_images,
                         tuning_images=0, force=True)


def _cost(network: Optional[torch.nn.Module], shape: Tuple[int, int, int]) -> Tuple[Optional[int], Optional[int]]:
    """Parameters and FLOPs per image of a deployable ``network`` (None: both unknown)."""
    return (count_params(network), count_flops(network, shape)) if network is not None else (None, None)


def _teacher_package(options: PlanOptions, cfg: Config, info: DatasetInfo, student_run: Path, out: Path,
                     log: Callable[[str], None]) -> Tuple[Path, Optional[torch.nn.Module]]:
    """The teacher's package and its deployable network (for its cost; None when unknown): ``--teacher``
    (a package as it is; a run or checkpoint exported), else the config's teacher exported from a
    candidate's run as ``cskd export RUN --teacher`` does, else (a config without a teacher checkpoint)
    ``teacher.model`` with random weights."""
    folder = out / "packages" / "teacher"
    if options.teacher is not None:
        given = Path(options.teacher)
        exported = _export_options(options, folder, options.teacher_precision)
        package = given if (given / MODEL_JSON).is_file() else export_model(given, exported, log)[0]
        return package, _package_network(package)
    if cfg.teacher.checkpoint:
        package = export_model(student_run, _export_options(options, folder, options.teacher_precision, teacher=True), log)[0]
        return package, teacher_network(cfg, info)
    return _random_teacher(options, info, out, log)


def _random_teacher(options: PlanOptions, info: DatasetInfo, out: Path, log: Callable[[str], None]) -> Tuple[Path, torch.nn.Module]:
    """``teacher.model`` with random weights as a teacher run directory, exported (latency only)."""
    teacher_cfg = load_config(options.config, [*options.overrides, "train.target=teacher", "student.init=null",
                                               f"output={out / 'untrained' / 'teacher'}"])
    task = get_task("teacher")
    spec = task.spec(teacher_cfg, info)
    network = unshared(task.build(spec))
    run = RunDir(teacher_cfg.output)
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_config(teacher_cfg)
    save_weights(run.best, task.weights(network), spec, {"epoch": 0, "untrained": True})
    package = export_model(run.path, _export_options(options, out / "packages" / "teacher", options.teacher_precision), log)[0]
    return package, task.deployable(network)


def _package_network(package: Path) -> Optional[torch.nn.Module]:
    """The network a package was exported from, when its checkpoint is at hand and readable."""
    source = read_package(package).source.get("checkpoint")
    if not source or not Path(source).is_file():
        return None
    try:
        return load_trained(source).deployable()
    except CSKDError:  # a plain state dict (a teacher exported from its student's run): no spec to build it from
        return None


def _bench_options(options: PlanOptions, out: Path) -> BenchOptions:
    served = ServedOptions(concurrency=(1,), seconds=options.served_seconds, threads=options.threads) if options.served else None
    return BenchOptions(batch_sizes=sorted({1, *options.batch_sizes}), rounds=options.rounds, iters=options.iters,
                        eval_images=0, threads=options.threads, out=out / "bench", served=served)


def _record(planned: List[Planned], bench: Dict[str, Any], options: PlanOptions) -> Dict[str, Any]:
    """Copy each package's benchmark figures onto its candidate and judge the budget once the figures it is
    judged on are in (with ``--served``, after the served stage); returns the teacher's figures."""
    by_folder: Dict[str, Dict[str, Any]] = {}  # batch sizes as strings: the figures read the same from plan.json
    for row in bench["rows"]:
        figures = by_folder.setdefault(row["folder"], {"p50_ms": {}, "speedup": {}})
        figures["p50_ms"][str(row["batch"])] = row["p50_ms"]
        figures["speedup"][str(row["batch"])] = row["speedup_vs_teacher"]
    for row in bench.get("served", []):
        by_folder[row["folder"]].update(served_p50_ms=row["p50_ms"], served_speedup=row["served_speedup"])
    teacher = by_folder[next(r["folder"] for r in bench["rows"] if r["role"] == "teacher")]
    judged = not options.served or "served" in bench
    for p in planned:
        p.measured.update(by_folder[str(p.package)])
        if judged:
            p.measured["within_budget"] = within_budget(latency(p.measured, options.served), latency(teacher, options.served),
                                                        options)
    return teacher


def latency(figures: Dict[str, Any], served: bool) -> float:
    """The latency a budget is judged on: served p50 at concurrency 1 with ``--served``, else the engine's at batch 1."""
    return figures["served_p50_ms"] if served else figures["p50_ms"]["1"]


def within_budget(latency_ms: float, teacher_ms: float, options: PlanOptions) -> bool:
    """Batch-1 latency at most ``max_latency_ms`` and at least ``min_speedup`` times faster than the
    teacher's (each only when given; no budget at all: every candidate is within)."""
    if options.max_latency_ms is not None and latency_ms > options.max_latency_ms:
        return False
    return options.min_speedup is None or teacher_ms / latency_ms >= options.min_speedup


def budget_ms(teacher_ms: float, options: PlanOptions) -> Optional[float]:
    """The batch-1 latency the budget allows (the tighter of the two), or None without a budget."""
    bounds = [b for b in (options.max_latency_ms, teacher_ms / options.min_speedup if options.min_speedup else None) if b]
    return min(bounds) if bounds else None


def _proxy(options: PlanOptions, base: Config, info: DatasetInfo, measured: Measured, cache: Optional[TeacherCache],
           device: torch.device, out: Path, write: Callable[[], Any]) -> None:
    """Train each candidate within budget briefly from the cached teacher and record its best fused top-1,
    what its epochs really cost here (each timed from its own start) and from that the epochs each gets in
    the training time of the config's own student (when that one was trained too); ``plan.json`` after each.

    ``proxy_schedule`` "time": every proxy in the wall time ``proxy_epochs`` epochs of the reference take
    (the config's student, else the slowest within budget), as a budget of optimiser steps
    (``train.max_steps``) from each one's :class:`~cskd.measure.training.EpochCost` measured on real
    batches and a validation pass, its warm-up the same share of its steps as the reference's and its
    cosine laid out over them. "epochs": ``proxy_epochs`` each, the config's schedule."""
    planned = measured.planned
    own = _own_student(planned, base)
    within = [p for p in planned if p.measured.get("within_budget")]
    if not within:
        return
    costs: Dict[str, EpochCost] = {}
    if options.proxy_schedule == "time":
        costs = _epoch_costs(base, info, [p for p in planned if p.measured.get("within_budget") or p is own], cache, device)
        reference = own or max(within, key=lambda p: costs[p.label].epoch_s)
        budget_s = options.proxy_epochs * costs[reference.label].epoch_s
        measured.proxy.update(reference=reference.label, budget_s=round(budget_s, 1), timed_steps=PROXY_TIMED_STEPS)
    for p in within:
        extra = [f"train.epochs={options.proxy_epochs}"]
        if options.proxy_schedule == "time":
            cost = costs[p.label]
            extra = proxy_overrides(cost, cost.steps_in(budget_s), options.proxy_epochs, base.train.warmup_epochs)
            p.measured.update(step_s=round(cost.step_s, 4), val_s=round(cost.val_s, 4))  # a small split validates in ms
        cfg, _ = candidate_config(options, p.candidate, base, [*extra, f"output={out / 'proxy' / p.label}"])
        print(f"cskd plan: proxy training {p.label}: {' '.join(extra)} -> {cfg.output}", flush=True)
        result = train(cfg, show_progress=options.show_progress)
        rows = RunDir(result.run_dir).metrics()
        per_epoch = costs[p.label].steps_per_epoch if p.label in costs else None
        steps = sum(int(r.get("steps", 0)) for r in rows) or None
        p.measured.update(proxy_top1=result.best_top1, proxy_steps=steps,
                          proxy_epochs=round(steps / per_epoch, 2) if steps and per_epoch else len(rows),
                          proxy_train_s=train_seconds(rows), proxy_wall_s=round(result.wall_s, 1),
                          epoch_s=epoch_seconds(rows, per_epoch))
        write()
    reference_s = own.measured.get("epoch_s") if own is not None else None
    for p in planned:
        if reference_s and p.measured.get("epoch_s"):
            p.measured["equal_time_epochs"] = equal_time_epochs(base.train.epochs, reference_s, p.measured["epoch_s"])


def _epoch_costs(base: Config, info: DatasetInfo, planned: Sequence[Planned], cache: Optional[TeacherCache],
                 device: torch.device) -> Dict[str, EpochCost]:
    """Each candidate's :class:`EpochCost` on the config's own data loaders (one set for all: the
    candidates differ only in the student), a fresh network each, by label."""
    if base.train.threads:
        torch.set_num_threads(base.train.threads)  # as the proxy runs will
    loaders = build_loaders(base, DistEnv(0, 1, 0, device), base.student.img_size)
    costs = {}
    for p in planned:
        ctx = step_context(p.config, get_task("student").spec(p.config, info), cache, device)
        costs[p.label] = epoch_cost(ctx, loaders, PROXY_TIMED_STEPS)
    return costs


def proxy_overrides(cost: EpochCost, steps: int, proxy_epochs: int, warmup_epochs: float) -> List[str]:
    """The ``cskd train`` overrides of a proxy of ``steps`` optimiser steps: the epochs they start, the step
    budget, and a warm-up the same share of them as the reference's own proxy has (``warmup_epochs`` of
    ``proxy_epochs``, at most all), so every proxy's schedule has one shape, stretched over its own steps."""
    share = min(1.0, warmup_epochs / proxy_epochs)
    return [f"train.epochs={math.ceil(steps / cost.steps_per_epoch)}", f"train.max_steps={steps}",
            f"train.warmup_epochs={round(share * steps / cost.steps_per_epoch, 6):g}"]


def train_seconds(rows: Sequence[Dict[str, Any]]) -> Optional[float]:
    """A run's training time from its metrics rows: its epochs' own times (``time_s - epoch_start_s``),
    summed, the run's start left out. None for rows from before epochs recorded their start."""
    if not rows or not all("epoch_start_s" in r and "time_s" in r for r in rows):
        return None
    return round(sum(float(r["time_s"]) - float(r["epoch_start_s"]) for r in rows), 2)


def epoch_seconds(rows: Sequence[Dict[str, Any]], steps_per_epoch: Optional[int] = None) -> Optional[float]:
    """Seconds per whole epoch of a run from its metrics rows, each epoch timed from its own start (the run's
    start left out, a one-epoch run's too): its optimiser steps' share of that time per step, times
    ``steps_per_epoch`` (default: its longest epoch's steps, as a last epoch may be cut short), plus a
    validation pass. Rows from before epochs recorded their start: the mean between the first and the last
    epoch's clock; for one such row None, as its one reading includes the start."""
    if rows and all({"epoch_start_s", "time_s", "steps", "val_s"} <= set(r) for r in rows):
        steps = sum(int(r["steps"]) for r in rows)
        validation = sum(float(r["val_s"]) for r in rows)
        training = sum(float(r["time_s"]) - float(r["epoch_start_s"]) for r in rows) - validation
        per_epoch = steps_per_epoch or max(int(r["steps"]) for r in rows)
        return round(per_epoch * training / steps + validation / len(rows), 2)
    times = [float(row["time_s"]) for row in rows if "time_s" in row]
    return round((times[-1] - times[0]) / (len(times) - 1), 2) if len(times) > 1 else None


def equal_time_epochs(epochs: int, reference_epoch_s: float, epoch_s: float) -> int:
    """The epochs a candidate trains in the time ``epochs`` of the reference take (at least one)."""
    return max(1, round(epochs * reference_epoch_s / epoch_s))


def _own_student(planned: List[Planned], base: Config) -> Optional[Planned]:
    """The config's own student among the candidates, if it is one: the one that builds its network."""
    own = network_key(Candidate(base.student.model, dict(base.student.kwargs), base.student.patch_size),
                      base.student.img_size, base.student.patch_size)
    return next((p for p in planned if p.network == own), None)


def pick(candidates: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The candidate to train: the best proxy top-1 within budget, else (no proxy) the one of most FLOPs."""
    within = [c for c in candidates if c.get("within_budget")]
    if not within:
        return None
    if any(c.get("proxy_top1") is not None for c in within):
        return max(within, key=lambda c: c.get("proxy_top1") or -1.0)
    return max(within, key=lambda c: c["flops"])


def train_pick(options: PlanOptions, result: Dict[str, Any], log: Callable[[str], None] = print) -> Dict[str, Any]:
    """``--train``: train the plan's pick, in the training time of the config's own student where the proxy
    runs measured it (its equal-time epochs), else with the config's epochs (the command printed first)."""
    chosen = pick(result["candidates"])
    if chosen is None:
        raise CSKDError("no candidate is within the budget, so there is nothing to train; relax --max-latency-ms / "
                        "--min-speedup or add smaller --candidates")
    output = Path(result["out"]) / "train" / chosen["label"]
    # in the training time of the config's own student where the proxies measured it, else the config's epochs
    timed = [f"train.epochs={chosen['equal_time_epochs']}"] if chosen.get("equal_time_epochs") else []
    overrides = [*options.overrides, *chosen["overrides"], *timed, f"output={output}"]
    command = train_command(options.config, overrides)
    log(f"cskd plan: training {chosen['label']}" + (" in the config's student's training time" if timed else "") + f": {command}")
    cfg = load_config(options.config, overrides)
    run = train(cfg, show_progress=options.show_progress)
    return {"label": chosen["label"], "command": command, "run": str(run.run_dir), "best_top1": run.best_top1}


def _result(options: PlanOptions, base: Config, info: DatasetInfo, measured: Measured, notes: List[str],
            out: Path) -> Dict[str, Any]:
    """What ``plan.json`` holds, from what is measured so far (``stages``; ``complete`` once all are done)."""
    package = read_package(measured.teacher) if measured.teacher is not None else None
    figures = measured.teacher_figures
    teacher_ms = latency(figures, options.served) if figures and (not options.served or "served_p50_ms" in figures) else None
    candidates = [{
        "label": p.label, "model": p.candidate.model, "kwargs": dict(p.candidate.kwargs), "patch_size": p.config.student.patch_size,
        "params": p.params, "flops": p.flops, "train_images_per_s": p.train_images_per_s, **p.measured,
        "overrides": p.overrides, "command": train_command(options.config, [*options.overrides, *p.overrides]),
        "equal_time_command": (train_command(options.config, [*options.overrides, *p.overrides,
                                                              f"train.epochs={p.measured['equal_time_epochs']}"])
                               if "equal_time_epochs" in p.measured else None),
        "package": str(p.package), "run_dir": str(p.run_dir),
    } for p in measured.planned]
    chosen = pick(candidates)
    own = _own_student(measured.planned, base)
    stages = ["built", "training step", "engine", *(["served"] if options.served else []),
              *(["proxy"] if options.proxy_epochs else []), *(["trained"] if options.train else [])]
    return {
        "stages": list(measured.stages), "complete": measured.stages == stages,
        "data": {"name": base.data.name, "img_size": base.student.img_size, "channels": info.channels, "classes": info.num_classes},
        "target": {"backend": options.backend, "precision": options.precision, "batch_sizes": sorted({1, *options.batch_sizes}),
                   "served": options.served},
        "budget": {"max_latency_ms": options.max_latency_ms, "min_speedup": options.min_speedup,
                   "latency_ms": budget_ms(teacher_ms, options) if teacher_ms else None,
                   "judged_on": "served p50, concurrency 1" if options.served else "engine p50, batch 1"},
        "teacher": {"label": f"teacher {package.architecture}" if package else "teacher",
                    "model": package.architecture if package else None, "precision": package.precision if package else None,
                    "params": measured.teacher_cost[0], "flops": measured.teacher_cost[1],
                    "package": str(measured.teacher) if measured.teacher else None, **(figures or {})},
        "candidates": candidates,
        "pick": chosen["label"] if chosen else None,
        "config_student": own.label if own is not None else None,
        "config": {"config": options.config, "overrides": list(options.overrides), "train_batch_size": base.train.batch_size,
                   "epochs": base.train.epochs},
        **({"proxy": dict(measured.proxy)} if measured.proxy else {}),
        **({"trained": measured.trained} if measured.trained is not None else {}),
        "notes": [*NOTES, *_config_notes(options, base), *notes],
        "out": str(out), "bench": str(out / "bench" / "bench.json"),
        "machine": {**machine.describe(), "torch": torch.__version__},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items() if k != "candidates"},
    }


def _config_notes(options: PlanOptions, cfg: Config) -> List[str]:
    """What the figures assume that this target or config does differently."""
    notes = []
    if options.precision == "int8":
        notes.append(f"int8: calibrated on {options.calib_images} training images, the recipe as it is (no tuning); a "
                     "trained export tunes on 1,000 more and may keep a few more nodes in float")
    if get_task(cfg.train.target).distils(cfg) and not cfg.teacher.cache:
        notes.append("this config runs its teacher online: train img/s is that of a run from its cache (random maps of "
                     "its grid), which `cskd cache-teacher` makes once")
    return notes


# ---------------------------------------------------------------------------------------------
# What the command prints


def format_plan(result: Dict[str, Any]) -> str:
    """The plan as a table: one row per candidate, the teacher first."""
    batches = result["target"]["batch_sizes"]
    served = result["target"]["served"]
    head = (f"{'candidate':<26} {'params':>7} {'GFLOPs':>7} " + " ".join(f"{f'b{b} ms':>8}" for b in batches)
            + (f" {'served ms':>9}" if served else "") + f" {'speedup':>8} {'budget':>6} {'train img/s':>11}")
    proxy = any(c.get("proxy_top1") is not None for c in result["candidates"])
    lines = [head + (f" {'proxy top-1':>17} {'proxy s':>7} {'s/epoch':>7} {'equal-time epochs':>17}" if proxy else "")]
    teacher = result["teacher"]
    lines.append(_row(teacher["label"], teacher["params"], teacher["flops"], teacher, batches, served, 1.0, "", None, proxy))
    for c in result["candidates"]:
        speedup = c["served_speedup"] if served else c["speedup"]["1"]
        budget = "yes" if c["within_budget"] else "no"
        lines.append(_row(c["label"] + (" *" if c["label"] == result["pick"] else ""), c["params"], c["flops"], c, batches, served,
                          speedup, budget, c["train_images_per_s"], proxy))
    return "\n".join(lines)


def _row(name: str, params: Optional[int], flops: Optional[int], figures: Dict[str, Any], batches: Sequence[int], served: bool,
         speedup: float, budget: str, rate: Optional[float], proxy: bool) -> str:
    text = (f"{name:<26} {_count(params, 1e6, 'M'):>7} {_count(flops, 1e9, ''):>7} "
            + " ".join(f"{figures['p50_ms'][str(b)]:>8.3f}" for b in batches)
            + (f" {figures['served_p50_ms']:>9.2f}" if served else "")
            + f" {speedup:>7.2f}x {budget:>6} {(f'{rate:.0f}' if rate is not None else '-'):>11}")
    if proxy:  # what the proxy runs measured: accuracy, their training time, real seconds per epoch, epochs at the config student's time
        top1, epoch_s, epochs = figures.get("proxy_top1"), figures.get("epoch_s"), figures.get("equal_time_epochs")
        cell = f"{top1:.2f}% ({figures['proxy_epochs']:g} ep)" if top1 is not None else "-"
        seconds = figures.get("proxy_train_s")
        text += (f" {cell:>17} {(f'{seconds:.0f}' if seconds else '-'):>7} {(f'{epoch_s:.1f}' if epoch_s else '-'):>7}"
                 f" {(str(epochs) if epochs else '-'):>17}")
    return text


def _count(value: Optional[int], unit: float, suffix: str) -> str:
    """``value`` in ``unit`` (millions of parameters, billions of FLOPs), or ``-`` when unknown."""
    return "-" if value is None else f"{value / unit:.{2 if suffix else 3}f}{suffix}"


def format_summary(result: Dict[str, Any]) -> List[str]:
    """The lines after the table: the budget, how many meet it, the pick and the command that trains it."""
    budget, target = result["budget"], result["target"]
    within = [c for c in result["candidates"] if c.get("within_budget")]
    wanted = ", ".join(part for part in (f"<= {budget['max_latency_ms']:g} ms" if budget["max_latency_ms"] else "",
                                         f">= {budget['min_speedup']:g}x the teacher" if budget["min_speedup"] else "") if part)
    lines = [f"target: {target['backend']} {target['precision']}; budget: {wanted or 'none (every candidate counts)'}, "
             f"{budget['judged_on']}" + (f" (<= {budget['latency_ms']:.3f} ms)" if budget["min_speedup"] else ""),
             f"{len(within)} of {len(result['candidates'])} candidates within budget"
             + (f"; pick (*): {result['pick']}" if result["pick"] else "")
             + (f"; the config's own student: {result['config_student']}" if result["config_student"] else "")]
    for c in within:
        lines.append(f"  {c['label']}: {c['command']}")
    proxy = result.get("proxy", {})
    if proxy.get("budget_s"):  # equal time: how equal the proxies' times came out
        took = [c["proxy_train_s"] / proxy["budget_s"] for c in within if c.get("proxy_train_s")]
        lines.append(f"proxies: each in the time of {result['options']['proxy_epochs']} epochs of {proxy['reference']} "
                     f"({proxy['budget_s']:.0f} s, as a budget of optimiser steps)"
                     + (f"; their epochs took {min(took):.2f}-{max(took):.2f}x that" if took else ""))
    timed = [c for c in within if c.get("equal_time_command")]
    if timed:
        epochs = result["config"].get("epochs")
        lines.append(f"at the training time of the config's own student ({epochs} epochs; each candidate's epochs from the "
                     "seconds per epoch its proxy run measured here):")
        lines += [f"  {c['label']}: {c['equal_time_command']}" for c in timed]
    lines += [f"note: {note}" for note in result["notes"]]
    return lines
