"""``cskd export``: fuse the heads and export a checkpoint as a model package, behind a parity gate."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  cskd export runs/demo                                  # fp32 ONNX package in runs/demo/export-onnx-fp32
  cskd export runs/demo --precision int8                 # onnxruntime static int8 (QDQ), calibrated
  cskd export runs/demo --input uint8 --out models/demo  # clients send raw pixels
  cskd export runs/demo --teacher                        # the teacher the run distilled from
  cskd export runs/demo --format trt --precision fp16    # TensorRT engine (CUDA machine)
  cskd export runs/demo --format triton --precision int8 --out model_repository   # Triton model repository
  cskd export runs/demo --format triton --engine trt --out model_repository       # ... with a TensorRT plan
"""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="fuse the heads and export to ONNX or TensorRT, with a parity gate",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export a checkpoint as a model package (engine + model.json), checked against "
                                   "PyTorch on real images.")
    p.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", default="onnx", help="onnx (default), trt, or triton (a Triton model repository)")
    p.add_argument("--engine", help="--format triton: the engine inside the repository, onnx (default) or trt")
    p.add_argument("--backend", help="the runtime the parity gate runs on and that serves the package by default: "
                                     "onnxruntime (default for ONNX) or openvino (CPU)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16 or int8")
    p.add_argument("--input", dest="input_kind", default="float", help="float: normalised tensors (default); uint8: raw pixels")
    p.add_argument("--max-batch", type=int, default=32,
                   help="TensorRT: the largest batch of the engine's profile; Triton: max_batch_size (default 32)")
    p.add_argument("--probabilities", action="store_true", help="add a softmax output beside the logits")
    p.add_argument("--out", type=Path, help="package folder (default: RUN/export-FORMAT-PRECISION)")
    p.add_argument("--teacher", action="store_true", help="export the teacher the student run distilled from")
    p.add_argument("--no-gate", action="store_true", help="keep the package even when parity fails (recorded in model.json)")
    p.add_argument("--parity-images", type=int, default=500)
    p.add_argument("--calib-images", type=int, help="training images for int8 calibration "
                   "(default 512, or half of a training split under 1,024 images)")
    p.add_argument("--tuning-images", type=int, default=1000,
                   help="int8: other training images to choose the calibration and what stays float on (0: the recipe as is)")
    p.add_argument("--data", help="data set for parity and calibration (default: the run's)")
    p.add_argument("--data-path")
    p.add_argument("--force", action="store_true", help="replace an existing package folder")
    p.set_defaults(func=run)


def options_from(args: argparse.Namespace):
    from cskd.export.exporter import ExportOptions  # torch and onnx: only for this command

    return ExportOptions(
        format=args.format, engine=args.engine, backend=args.backend, precision=args.precision, input_kind=args.input_kind,
        max_batch=args.max_batch,
        probabilities=args.probabilities, out=args.out, teacher=args.teacher, gate=not args.no_gate,
        parity_images=args.parity_images, calib_images=args.calib_images, tuning_images=args.tuning_images,
        data=args.data, data_path=args.data_path,
        force=args.force,
    )


def run(args: argparse.Namespace) -> int:
    from cskd.export.exporter import export_model

    export_model(args.source, options_from(args))
    return 0
