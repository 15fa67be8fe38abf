"""``cskd export``: check -> build -> parity -> write.

The checkpoint's deployable module (the fused student, or the teacher's CNN) is built into an
engine by the chosen format, checked against PyTorch on real validation images, and the package
(engine + model.json) replaces the output folder in one rename only when the gate passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime
import torch
from torch.utils.data import Dataset

from cskd import __version__
from cskd.checkpoint import resolve_checkpoint
from cskd.config import DataConfig
from cskd.data.invariance import get_recipe
from cskd.data.samples import sample_images
from cskd.errors import CSKDError
from cskd.evaluate import ModelInput, evaluation_dataset, real_images
from cskd.export.formats import BuildContext, BuiltEngine, check_export_args
from cskd.export.onnx_export import metadata_for
from cskd.export.parity import DEFAULT_THRESHOLDS, ParityReport, compare
from cskd.export.quantize import Tuning
from cskd.files import file_sha256
from cskd.models.deploy import DeployModule, output_names
from cskd.run import RunDir
from cskd.runtime.backends import backend_names, create_backend, run_batched
from cskd.runtime.package import InputSpec, ModelPackage, staged_folder, write_package_json
from cskd.runtime.preprocess import to_engine_input
from cskd.tasks import Trained, load_trained
from cskd.teachers import trained_teacher


@dataclass
class ExportOptions:
    format: str = "onnx"  # onnx | trt | triton
    engine: Optional[str] = None  # --format triton: the engine in the repository, onnx (default) or trt
    backend: Optional[str] = None  # the runtime to gate on and serve with (default: the engine's own, onnxruntime for ONNX)
    precision: str = "fp32"  # fp32 | fp16 | int8
    input_kind: str = "float"  # float (client normalises) | uint8 (raw pixels, normalised in the graph)
    max_batch: int = 32  # the TensorRT optimisation profile's largest batch
    probabilities: bool = False  # add a softmax output beside the logits
    out: Optional[Path] = None
    teacher: bool = False  # export the teacher a student run distilled from
    gate: bool = True
    parity_images: int = 500
    calib_images: Optional[int] = None  # int8: None is 512, or half of a training split too small for both sets (fine-tuning)
    tuning_images: int = 1000  # int8: training images to choose the calibration and float fallbacks on (0: recipe only)
    data: Optional[str] = None  # data set for parity and calibration (default: the run's)
    data_path: Optional[str] = None
    force: bool = False


# The counts export takes: (flag, option, the least it may be, what it counts)
COUNTS = (
    ("--max-batch", "max_batch", 1, "the largest batch of the engine"),
    ("--parity-images", "parity_images", 1, "the validation images the parity gate compares on"),
    ("--calib-images", "calib_images", 1, "the training images int8 is calibrated on"),
    ("--tuning-images", "tuning_images", 0, "the training images int8 is tuned on (0: the recipe as it is)"),
)


def check_counts(options: ExportOptions) -> None:
    """Each count at least its least value (a negative image count would slice the data from its end)."""
    for flag, name, least, what in COUNTS:
        value, default = getattr(options, name), getattr(ExportOptions, name)
        if value is not None and value < least:
            fix = f"pass {flag} {default} (the default)" if default is not None else f"omit {flag} (the default)"
            raise CSKDError(f"{flag} {value} is below {least}: it counts {what}; {fix} or another count of at least {least}")


def load_source(source: Path, teacher: bool) -> Tuple[Trained, Optional[DataConfig]]:
    """The network to export (``source``'s, or the teacher its run distilled from) and the data config
    its images come from (None: the run directory holding the checkpoint, see ``evaluation_dataset``).
    A teacher is gated and calibrated on its student run's data: its checkpoint may be a file outside
    any run, or a plain state dict."""
    if not teacher:
        return load_trained(resolve_checkpoint(source)), None
    run = RunDir.open(source) if Path(source).is_dir() else RunDir.of_checkpoint(source)
    if run is None:
        raise CSKDError(f"--teacher needs a student run directory with config.yaml; {Path(source).parent} has none")
    config = run.config()
    if not config.teacher.checkpoint:
        raise CSKDError(f"the run in {run.path} used no teacher (teacher.checkpoint is empty); export it without --teacher")
    return trained_teacher(config), config.data


def default_out(source: Path, options: ExportOptions) -> Path:
    """``RUN/export-[teacher-]FORMAT-PRECISION[-uint8]`` beside the source checkpoint."""
    run = source if source.is_dir() else source.parent
    who = "teacher-" if options.teacher else ""
    return run / f"export-{who}{options.format}-{options.precision}{'-uint8' if options.input_kind == 'uint8' else ''}"


def export_model(source: Path, options: ExportOptions, log: Callable[[str], None] = print) -> Tuple[Path, ModelPackage]:
    """Export ``source`` (a run directory or checkpoint) as a model package; returns its folder."""
    fmt = check_export_args(options.format, options.precision, options.input_kind)  # check
    check_counts(options)
    fmt.preflight(options.engine)  # e.g. TensorRT and a CUDA GPU, before any work
    if options.backend is not None and options.backend not in backend_names():
        raise CSKDError(f"--backend {options.backend} is not one of {', '.join(backend_names())}")
    trained, trained_on = load_source(Path(source), options.teacher)
    spec, out = trained.spec, Path(options.out) if options.out else default_out(Path(source), options)
    log(f"exporting {spec.role} {spec.model} from {trained.path} as {fmt.name}/{options.precision} ({options.input_kind} input)")
    module = DeployModule(trained.deployable(), spec.mean, spec.std, options.input_kind == "uint8", options.probabilities).eval()
    images, labels = real_images(trained.path, ModelInput.of_spec(spec), "val", options.parity_images, options.data,
                                 options.data_path, trained_on)
    feed = lambda u8: to_engine_input(u8, "uint8" if options.input_kind == "uint8" else "float32", spec.mean, spec.std)  # noqa: E731
    with torch.inference_mode():
        reference = run_batched(lambda x: _logits(module(torch.from_numpy(x))).numpy(), feed(images), 64)
    with staged_folder(out, options.force) as stage:
        context = _build_context(stage, module, trained, trained_on, options, feed(images[:2]), feed, out.parent, log)
        built = fmt.build(context)  # build
        folder = stage / built.package_dir
        package = _package(trained, options, built)
        write_package_json(folder, package)
        report = _parity(folder, package, feed(images), reference, labels, options)  # parity
        log(format_parity(report))
        _gate(package, report, options, log)
        write_package_json(folder, package)  # write: the staged folder replaces `out` on leaving
        fmt.finish(folder, package, options.max_batch)
    log(f"wrote {out / built.package_dir} ({package.engine}, model.json)")
    return out / built.package_dir, package


def _build_context(stage: Path, module: DeployModule, trained: Trained, trained_on: Optional[DataConfig], options: ExportOptions,
                   example: np.ndarray, feed: Callable, cache_dir: Path, log: Callable) -> BuildContext:
    spec = trained.spec

    def training_split() -> Dataset:
        return evaluation_dataset(trained.path, ModelInput.of_spec(spec), "train", options.data, options.data_path, trained_on)[0]

    def calibration() -> List[np.ndarray]:
        split = training_split()
        images, _ = sample_images(split, calibration_count(len(split), options, log))
        return [feed(images[i : i + CALIB_BATCH]) for i in range(0, len(images), CALIB_BATCH)]

    def tuning() -> Tuning:
        # the images after the calibration's in the split's one sample order: none of them calibrated;
        # judged against the fp32 model
        split = training_split()
        calibrated = calibration_count(len(split), options, lambda _: None)  # said once, by calibration()
        # an explicit --calib-images the split cannot hold beside tuning images is refused, not cut
        count = tuning_count(len(split), options.calib_images or calibrated, options.tuning_images, log)
        images, labels = sample_images(split, count, skip=calibrated)
        inputs = feed(images)
        with torch.inference_mode():
            reference = run_batched(lambda x: _logits(module(torch.from_numpy(x))).numpy(), inputs, 64)
        return Tuning(inputs, reference, labels)

    metadata = metadata_for(json.dumps(spec.__dict__, default=list), {
        "precision": options.precision, "input": options.input_kind, "version": __version__, "fused": bool(trained.heads),
        "heads": list(trained.heads)})
    return BuildContext(stage, module, torch.from_numpy(example), output_names(options.probabilities), options.precision,
                        metadata, calibration, tuning if options.tuning_images > 0 else None, spec.in_chans, spec.img_size,
                        options.max_batch, cache_dir, log,
                        name=package_name(spec), engine=options.engine)


DEFAULT_CALIB_IMAGES = 512
CALIB_BATCH = 32


def calibration_count(available: int, options: ExportOptions, log: Callable[[str], None]) -> int:
    """How many training images int8 is calibrated on: ``--calib-images`` (at most the split) when
    given; else 512, or, when images are also tuned on, half of a split under 1,024 (a fine-tuning set
    of a few hundred), the rest left to tune on. Whole batches of 32 only: onnxruntime's calibrator stacks every
    batch's activations into one array, so a shorter last batch would break it."""
    if options.calib_images is not None:
        count = min(options.calib_images, available)
    elif options.tuning_images == 0 or available >= 2 * DEFAULT_CALIB_IMAGES:
        count = min(DEFAULT_CALIB_IMAGES, available)
    else:
        count = available // 2
    whole = count - count % CALIB_BATCH or count
    if options.calib_images is None and whole < DEFAULT_CALIB_IMAGES:
        tuned = min(options.tuning_images, available - whole)
        log(f"int8: the training split has {available} images: calibrating on {whole}"
            + (f", tuning on {tuned} others" if tuned else "") + " (--calib-images sets it)")
    elif options.calib_images is not None and whole != options.calib_images:
        held = f", the split holds {available}" if options.calib_images > available else ""
        log(f"int8: calibrating on {whole} images, whole batches of {CALIB_BATCH} (--calib-images {options.calib_images}{held})")
    return whole


def tuning_count(available: int, calib_images: int, tuning_images: int, log: Callable[[str], None]) -> int:
    """How many int8 tuning images a training split of ``available`` holds beside the calibration's:
    what remains when it is too small for both (said in the log), an error when nothing does."""
    left = available - calib_images
    if left <= 0:
        raise CSKDError(f"int8: the training split has {available} images, all taken by calibration (--calib-images "
                        f"{calib_images}), none left to tune on; lower --calib-images or pass --tuning-images 0")
    if left < tuning_images:
        log(f"int8: the training split has {available} images; tuning on the {left} the calibration left, not {tuning_images}")
    return min(left, tuning_images)


def package_name(spec) -> str:
    """The model's name in its package (and a Triton repository's model folder)."""
    return f"{spec.role}-{spec.model}"


def _package(trained: Trained, options: ExportOptions, built: BuiltEngine) -> ModelPackage:
    spec = trained.spec
    run = RunDir.of_checkpoint(trained.path)
    data = run.data_config() if run is not None else None  # serve images as the run validated them
    return ModelPackage(
        name=package_name(spec), role=spec.role, architecture=spec.model, engine=built.engine,
        engine_format=built.engine_format, precision=options.precision, fused=bool(trained.heads),
        input=InputSpec("input", "uint8" if options.input_kind == "uint8" else "float32", "NCHW", spec.in_chans,
                        spec.img_size, list(spec.mean), list(spec.std), data.interpolation if data else "bicubic",
                        data.eval_crop_pct if data else 1.0),
        outputs=output_names(options.probabilities), classes=list(spec.class_names), heads=list(trained.heads),
        engine_max_batch=built.engine_max_batch, backend=options.backend, build=built.build, files=built.files, toolkit=_toolkit(),
        source={"checkpoint": str(trained.path.resolve()), "sha256": file_sha256(trained.path), "epoch": trained.info.get("epoch"),
                **_trained_shifts(spec.role, data)},
    )


def _trained_shifts(role: str, data: Optional[DataConfig]) -> Dict[str, Any]:
    """What the student's recipe trained on, for the shift suite to report the rest apart as unseen:
    ``{"invariance": name, "trained_shifts": [families]}``, or nothing for a recipe without one."""
    recipe = get_recipe(data.invariance) if data is not None and role == "student" else None
    return {"invariance": recipe.name, "trained_shifts": list(recipe.trained_shifts)} if recipe else {}


def _parity(stage: Path, package: ModelPackage, inputs: np.ndarray, reference: np.ndarray, labels: np.ndarray,
            options: ExportOptions) -> ParityReport:
    backend, _ = create_backend(stage)  # the package's own backend (options.backend, recorded in it)
    engine_logits = run_batched(backend.infer, inputs, package.batch_limit(64))
    report = compare(reference, engine_logits, labels, options.precision)
    package.parity = {**report.to_dict(), "backend": backend.name, "reference": "pytorch fp32 fused",
                      "thresholds": DEFAULT_THRESHOLDS[options.precision], "split": "val"}
    return report


def _gate(package: ModelPackage, report: ParityReport, options: ExportOptions, log: Callable[[str], None]) -> None:
    package.gate = {"enabled": options.gate, "passed": report.passed}
    if not report.passed:
        if options.gate:
            raise CSKDError(f"parity gate failed ({'; '.join(report.failures)}); no package written. "
                            "Try another precision, or --no-gate to keep it anyway")
        package.gate["warning"] = "exported with --no-gate although parity failed: " + "; ".join(report.failures)
        log("warning: " + package.gate["warning"])
    package.gate["checked_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def format_parity(report: ParityReport) -> str:
    text = (f"parity on {report.images} validation images: max |diff| {report.max_abs_diff:.2e}, "
            f"top-1 agreement {report.agreement:.2f}%")
    if report.reference_top1 is not None:
        text += f", accuracy {report.reference_top1:.2f}% (pytorch) vs {report.engine_top1:.2f}% (engine)"
    return text + (" -> pass" if report.passed else " -> FAIL")


def _toolkit() -> Dict[str, str]:
    return {"cskd": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
