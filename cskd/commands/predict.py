"""``cskd predict``: top-k labels for image files through a model package (no torch for ONNX)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cskd.errors import CSKDError
from cskd.runtime.predict import format_predictions, predict_files

EXAMPLES = """\
examples:
  cskd predict runs/demo/export-onnx-fp32 shirt.png boot.jpg
  cskd predict models/demo *.png --top-k 3 --json predictions.json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels for image files through an exported model",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Classify image files with a model package (no torch needed for ONNX packages).")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--backend", help="onnxruntime, tensorrt or torch (default: the package's own)")
    p.add_argument("--json", type=Path, help="also write the predictions as JSON")
    p.add_argument("--providers", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                   help="onnxruntime execution providers in order, comma-separated (e.g. TensorrtExecutionProvider,"
                        "CUDAExecutionProvider); default: CUDA when onnxruntime-gpu has it, else the CPU")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise CSKDError(f"--top-k must be at least 1, got {args.top_k}")
    if args.backend == "torch":
        import cskd.commands.torch_backend  # noqa: F401  registers "torch" (imports torch: only when asked)
    results = predict_files(args.model_dir, args.images, args.top_k, args.backend, providers=args.providers)
    print(format_predictions(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
