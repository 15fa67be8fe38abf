"""``cskd export``: checkpoint -> fused graph -> engine -> parity gate -> model package."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
from cskd.export.formats import check_export_args
from cskd.export.package import (
    InputSpec,
    ModelPackage,
    staged_package,
    write_package_json,
)
from cskd.export.parity import DEFAULT_THRESHOLDS, compare

from cskd import __version__
from cskd.checkpoint import ModelSpec, file_sha256, load_model, resolve_checkpoint
from cskd.errors import CSKDError


@dataclass
class ExportOptions:
    format: str = "onnx"  # onnx | trt
    precision: str = "fp32"  # fp32 | fp16 | int8
    input_kind: str = "float"  # float (client normalises) | uint8 (raw pixels, normalised in the graph)
    max_batch: int = 32
    probabilities: bool = False  # add a softmax output beside the logits
    out: Optional[Path] = None
    teacher: bool = False  # export the teacher a student run distilled from
    gate: bool = True
    parity_images: int = 500
    calib_images: int = 512
    data: Optional[str] = None  # data set for parity and calibration (default: the run's)
    data_path: Optional[str] = None
    force: bool = False


def resolve_source(source: Path, teacher: bool) -> Path:
    """The checkpoint to export: ``source`` itself, or the teacher its run distilled from."""
    if not teacher:
        return resolve_checkpoint(source)
    import yaml

    from cskd.train import resolve_teacher_checkpoint

    run = Path(source) if Path(source).is_dir() else Path(source).parent
    config = run / "config.yaml"
    if not config.is_file():
        raise CSKDError(f"--teacher needs a student run directory with config.yaml; {run} has none")
    value = (yaml.safe_load(config.read_text()) or {}).get("teacher", {}).get("checkpoint")
    if not value:
        raise CSKDError(f"the run in {run} used no teacher (teacher.checkpoint is empty)")
    return resolve_checkpoint(resolve_teacher_checkpoint(value))


def real_images(checkpoint: Path, spec: ModelSpec, split: str, count: int, data: Optional[str], data_path: Optional[str]
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``count`` images of the run's data set as uint8 ``[N, C, H, W]`` at the model's size, with labels."""
    from cskd.evaluate import evaluation_dataset

    dataset, _ = evaluation_dataset(checkpoint, spec, split, data, data_path)
    step = max(1, len(dataset) // count)  # spread over the split: every class, not the first folder
    picks = list(range(0, len(dataset), step))[:count]
    images = np.stack([(dataset[i][0].numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for i in picks])
    labels = np.array([dataset[i][1] for i in picks])
    return images, labels


def default_out(source: Path, options: ExportOptions) -> Path:
    """``RUN/export-[teacher-]FORMAT-PRECISION[-uint8]`` beside the source checkpoint."""
    run = source if source.is_dir() else source.parent
    who = "teacher-" if options.teacher else ""
    return run / f"export-{who}{options.format}-{options.precision}{'-uint8' if options.input_kind == 'uint8' else ''}"


def export_model(source: Path, options: ExportOptions, log: Callable[[str], None] = print) -> Tuple[Path, ModelPackage]:
    """Export ``source`` (a run directory or checkpoint) as a model package; returns its folder."""
    import torch
    from cskd.export import onnx_export
    from cskd.export.graph import build_deploy_module, output_names
    from cskd.serve.backends import run_batched
    from cskd.serve.preprocess import to_engine_input

    fmt = check_export_args(options.format, options.precision, options.input_kind)
    if options.format == "trt":
        from cskd.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail in one line before any work
    if options.max_batch < 1:
        raise CSKDError(f"--max-batch must be at least 1, got {options.max_batch}")
    checkpoint = resolve_source(Path(source), options.teacher)
    model, spec, info = load_model(checkpoint)
    out = Path(options.out) if options.out else default_out(Path(source), options)
    log(f"exporting {spec.role} {spec.model} from {checkpoint} as {fmt.name}/{options.precision} ({options.input_kind} input)")

    uint8 = options.input_kind == "uint8"
    module = build_deploy_module(model, spec, uint8, options.probabilities)
    outputs = output_names(options.probabilities)
    parity_u8, labels = real_images(checkpoint, spec, "val", options.parity_images, options.data, options.data_path)
    feed = lambda u8: to_engine_input(u8, "uint8" if uint8 else "float32", spec.mean, spec.std)  # noqa: E731
    with torch.inference_mode():
        reference = run_batched(lambda x: _first(module(torch.from_numpy(x))).numpy(), feed(parity_u8), 64)

    meta = onnx_export.metadata_for(json.dumps(spec.__dict__, default=list), {
        "precision": options.precision, "input": options.input_kind, "version": __version__, "fused": spec.role == "student"})
    with staged_package(out, options.force) as stage:
        files = {}
        fp32_path = stage / ("model.onnx" if options.precision == "fp32" else "model.fp32.onnx")
        example = torch.from_numpy(feed(parity_u8[: min(2, len(parity_u8))]))
        onnx_export.export_fp32(module, fp32_path, example, outputs, meta)
        onnx_path = stage / "model.onnx"
        if options.precision == "fp32":
            heads = getattr(getattr(model, "vit", None), "blocks", [None])[0]
            num_heads = getattr(getattr(heads, "attn", None), "num_heads", 0)
            hidden = getattr(getattr(model, "vit", None), "embed_dim", 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_export.optimize(fp32_path, stage / "model.optimized.onnx", spec.role, num_heads, hidden)
            files["optimized"] = "model.optimized.onnx"
        elif options.precision == "fp16":
            onnx_export.convert_fp16(fp32_path, onnx_path)
        else:
            calib_u8, _ = real_images(checkpoint, spec, "train", options.calib_images, options.data, options.data_path)
            log(f"calibrating int8 on {len(calib_u8)} training images")
            onnx_export.quantize_int8(fp32_path, onnx_path, [feed(calib_u8[i : i + 32]) for i in range(0, len(calib_u8), 32)])
        if options.precision != "fp32":
            onnx_export.set_metadata_file(onnx_path, meta)
            fp32_path.unlink()
        engine_file = "model.onnx"
        if options.format == "trt":
            from cskd.export.tensorrt import build_engine

            log("building the TensorRT engine (minutes on a first build; the timing cache speeds up the next)")
            build_engine(onnx_path, stage / "model.engine", options.precision, options.max_batch, spec.in_chans,
                         spec.img_size, timing_cache=out.parent / ".cskd-trt-timing.cache")
            engine_file, files = "model.engine", {"onnx": "model.onnx"}

        package = ModelPackage(
            name=f"{spec.role}-{spec.model}", role=spec.role, architecture=spec.model, engine=engine_file,
            engine_format=fmt.name, precision=options.precision, fused=spec.role == "student",
            input=InputSpec("input", "uint8" if uint8 else "float32", "NCHW", spec.in_chans, spec.img_size,
                            list(spec.mean), list(spec.std), "bicubic", options.max_batch),
            outputs=outputs, classes=list(spec.class_names),
            source={"checkpoint": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint), "epoch": info.get("epoch")},
            toolkit=_toolkit(), files=files,
        )
        write_package_json(stage, package)
        from cskd.serve.backends import create_backend

        backend, _ = create_backend(stage)
        engine_logits = run_batched(backend.infer, feed(parity_u8), min(64, options.max_batch))
        report = compare(reference, engine_logits, labels, options.precision)
        package.parity = {**report.to_dict(), "backend": backend.name, "reference": "pytorch fp32 fused",
                          "thresholds": DEFAULT_THRESHOLDS[options.precision], "split": "val"}
        package.gate = {"enabled": options.gate, "passed": report.passed}
        log(format_parity(report))
        if not report.passed:
            if options.gate:
                raise CSKDError(f"parity gate failed ({'; '.join(report.failures)}); no package written. "
                                "Try another precision, or --no-gate to keep it anyway")
            package.gate["warning"] = "exported with --no-gate although parity failed: " + "; ".join(report.failures)
            log("warning: " + package.gate["warning"])
        package.gate["checked_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_package_json(stage, package)
    log(f"wrote {out} ({engine_file}, model.json)")
    return out, package


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def format_parity(report) -> str:
    text = (f"parity on {report.images} validation images: max |diff| {report.max_abs_diff:.2e}, "
            f"top-1 agreement {report.agreement:.2f}%")
    if report.reference_top1 is not None:
        text += f", accuracy {report.reference_top1:.2f}% (pytorch) vs {report.engine_top1:.2f}% (engine)"
    return text + (" -> pass" if report.passed else " -> FAIL")


def _toolkit() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"cskd": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
