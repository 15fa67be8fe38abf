"""The paper's pairing on this CPU: fused DeiT-Ti against RegNetY-160 at 224 px through onnxruntime.

Random weights (latency does not depend on them), so the packages are latency-only: no parity
gate and no top-1. Builds fp32 and int8 packages with cskd's own export functions (int8 calibrated
on random pixels, which is fine for speed and meaningless for accuracy), then runs `cskd bench`'s
measurement with --eval-images 0.

    python benchmarks/paper_pairing_cpu.py --out bench-paper-cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from cskd.export import onnx_export
from cskd.export.graph import build_deploy_module
from cskd.export.package import InputSpec, ModelPackage, write_package_json

from cskd.bench import BenchOptions, format_table, run_bench
from cskd.checkpoint import ModelSpec
from cskd.models import create_student, create_teacher

SIZE, CLASSES = 224, 1000
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def package(folder: Path, model, spec: ModelSpec, precision: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    module = build_deploy_module(model, spec, uint8_input=False, probabilities=False)
    example = torch.randn(2, 3, SIZE, SIZE)
    fp32 = folder / ("model.onnx" if precision == "fp32" else "model.fp32.onnx")
    onnx_export.export_fp32(module, fp32, example, ["logits"], {"cskd.note": "random weights, latency only"})
    files = {}
    if precision == "fp32":
        heads = model.vit.blocks[0].attn.num_heads if spec.role == "student" else 0
        hidden = model.vit.embed_dim if spec.role == "student" else 0
        onnx_export.optimize(fp32, folder / "model.optimized.onnx", spec.role, heads, hidden)
        files["optimized"] = "model.optimized.onnx"
    else:
        calibration = [np.random.default_rng(i).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32) for i in range(4)]
        onnx_export.quantize_int8(fp32, folder / "model.onnx", calibration)
        fp32.unlink()
    write_package_json(folder, ModelPackage(
        name=f"{spec.role}-{spec.model}", role=spec.role, architecture=spec.model, engine="model.onnx", engine_format="onnx",
        precision=precision, fused=spec.role == "student",
        input=InputSpec("input", "float32", "NCHW", 3, SIZE, list(MEAN), list(STD), "bicubic", 64),
        outputs=["logits"], classes=[str(i) for i in range(CLASSES)],
        gate={"enabled": False, "warning": "random weights: latency-only package, no parity gate"}, files=files))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-paper-cpu"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    student = create_student("deit_tiny_distilled_patch16_224", CLASSES, SIZE, 16).eval()
    teacher = create_teacher("regnety_160", CLASSES)
    s_spec = ModelSpec("student", "deit_tiny_distilled_patch16_224", CLASSES, 3, SIZE, 16, {}, MEAN, STD)
    t_spec = ModelSpec("teacher", "regnety_160", CLASSES, 3, SIZE, None, {}, MEAN, STD)
    packages = Path(tempfile.mkdtemp(prefix="cskd-paper-"))  # hundreds of MB: never beside the results
    teacher_pkg = package(packages / "teacher-fp32", teacher, t_spec, "fp32")
    students = [package(packages / f"student-{p}", student, s_spec, p) for p in ("fp32", "int8")]
    result = run_bench(students, teacher_pkg, BenchOptions(batch_sizes=args.batch_sizes, rounds=args.rounds,
                                                           iters=args.iters, warmup=2, eval_images=0, out=args.out))
    shutil.rmtree(packages, ignore_errors=True)
    print(format_table(result))
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
