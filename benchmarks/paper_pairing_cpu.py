"""The paper's pairing on this CPU: fused DeiT-Ti against RegNetY-160 at 224 px through onnxruntime.

Random weights (latency does not depend on them), so the packages are latency-only: no parity
gate and no top-1. Builds fp32 and int8 packages with cskd's own export functions (int8 calibrated
on random pixels, which is fine for speed and meaningless for accuracy), the student's on each of
onnxruntime and OpenVINO, then runs `cskd bench`'s measurement with --eval-images 0.

    python benchmarks/paper_pairing_cpu.py --out bench-paper-cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cskd.export.formats import BuildContext, build_onnx
from cskd.measure.bench import BenchOptions, format_table, run_bench
from cskd.models import DeployModule, create_student, create_teacher, fuse_heads
from cskd.runtime.package import InputSpec, ModelPackage, read_package, write_package_json

SIZE, CLASSES = 224, 1000
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def package(folder: Path, role: str, name: str, deployable: torch.nn.Module, precision: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    module = DeployModule(deployable, MEAN, STD, uint8_input=False, probabilities=False).eval()
    calibration = lambda: [np.random.default_rng(i).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32) for i in range(4)]
    ctx = BuildContext(folder, module, torch.randn(2, 3, SIZE, SIZE), ["logits"], precision,
                       {"cskd.note": "random weights, latency only"}, calibration, None, 3, SIZE, 64, folder,
                       lambda _: None)
    built = build_onnx(ctx)
    write_package_json(folder, ModelPackage(
        name=f"{role}-{name}", role=role, architecture=name, engine=built.engine, engine_format="onnx",
        precision=precision, fused=role == "student",
        input=InputSpec("input", "float32", "NCHW", 3, SIZE, list(MEAN), list(STD), "bicubic"),
        outputs=["logits"], classes=[str(i) for i in range(CLASSES)], build=built.build,
        gate={"enabled": False, "warning": "random weights: latency-only package, no parity gate"}, files=built.files))
    return folder


def on_backend(folder: Path, backend: str) -> Path:
    """``folder``'s engine as a package that runs on ``backend``: the same ONNX file, built once."""
    target = folder.with_name(f"{folder.name}-{backend}")
    shutil.copytree(folder, target)
    built = read_package(target)
    write_package_json(target, replace(built, name=f"{built.name}-{backend}", backend=backend))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-paper-cpu"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"], help="student runtimes")
    args = parser.parse_args()
    torch.manual_seed(0)
    student = fuse_heads(create_student("deit_tiny_distilled_patch16_224", CLASSES, SIZE, 16).eval())
    teacher = create_teacher("regnety_160", CLASSES).model.eval()
    packages = Path(tempfile.mkdtemp(prefix="cskd-paper-"))  # hundreds of MB: never beside the results
    teacher_pkg = package(packages / "teacher-fp32", "teacher", "regnety_160", teacher, "fp32")
    built = [package(packages / f"student-{p}", "student", "deit_tiny_distilled_patch16_224", student, p)
             for p in ("fp32", "int8")]
    students = [on_backend(folder, backend) for backend in args.backends for folder in built]
    result = run_bench(students, teacher_pkg, BenchOptions(batch_sizes=args.batch_sizes, rounds=args.rounds,
                                                           iters=args.iters, warmup=2, eval_images=0, out=args.out))
    shutil.rmtree(packages, ignore_errors=True)
    print(format_table(result))
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
