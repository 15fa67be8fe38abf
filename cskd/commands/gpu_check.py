"""``cskd gpu-check``: on a CUDA machine, build every precision, check parity and the providers
really in use, serve under concurrency, and print a pass/fail table (one command, exit code 0 or 1).

Each row is one check: TensorRT engines (fp32, fp16, int8) and ONNX packages on onnxruntime's CUDA
provider go through ``cskd export``'s parity gate on real validation images; the providers of every
onnxruntime session are read back from the session; one engine is served with dynamic batching to
many concurrent clients, whose answers must equal ``cskd predict``'s. ``--device cpu`` runs the
same checks on onnxruntime's CPU provider (TensorRT rows skipped): the dry run CI does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

EXAMPLES = """\
examples:
  cskd gpu-check                         # trains a 2-epoch demo student on the GPU, then checks it
  cskd gpu-check runs/demo               # check your own run
  cskd gpu-check runs/demo --device cpu  # the same checks on the CPU (TensorRT skipped)
"""


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float = 0.0


def add_parser(sub) -> None:
    p = sub.add_parser("gpu-check", help="build, check and serve every precision on this GPU; pass/fail table",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Self-check of the GPU path: TensorRT and onnxruntime-gpu exports behind the parity "
                                   "gate, the providers in use, and serving under concurrency.")
    p.add_argument("run", type=Path, nargs="?", metavar="RUN_DIR", help="a trained run (default: train a quick demo)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, help="folder for the packages (default: a temporary one)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in the serving check")
    p.add_argument("--requests", type=int, default=128, help="requests in the serving check")
    p.set_defaults(func=run)


def _timed(name: str, check: Callable[[], str]) -> Check:
    from cskd.errors import CSKDError

    start = time.perf_counter()
    try:
        detail = check()
        status = "PASS"
    except CSKDError as exc:
        detail, status = str(exc), "FAIL"
    except Exception as exc:  # a self-check reports every failure in its table instead of stopping
        detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
    return Check(name, status, detail, time.perf_counter() - start)


def environment(device: str) -> List[Check]:
    import onnxruntime as ort
    import torch

    from cskd.runtime.tensorrt import device_facts, tensorrt_available

    rows = []
    if device == "cuda":
        if not torch.cuda.is_available():
            return [Check("CUDA device", "FAIL", "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES, --gpus?)")]
        major, minor = torch.cuda.get_device_capability()
        rows.append(Check("CUDA device", "PASS", f"{torch.cuda.get_device_name()} (sm {major}.{minor}), torch {torch.__version__}"))
        rows.append(Check("TensorRT", "PASS", f"TensorRT {device_facts()['tensorrt']}") if tensorrt_available()
                    else Check("TensorRT", "FAIL", "TensorRT is not importable: pip install 'cskd[gpu]'"))
    providers = ort.get_available_providers()
    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    rows.append(Check("onnxruntime providers", "PASS" if wanted in providers else "FAIL",
                      f"onnxruntime {ort.__version__}: {', '.join(providers)}"))
    return rows


def quick_run(out: Path, device: str) -> Path:
    from cskd.config import load_config
    from cskd.train import train

    cfg = load_config(None, [f"output={out / 'run'}", "train.epochs=2", f"train.device={device}", "data.workers=2"])
    return train(cfg, show_progress=False).run_dir


def export_checks(run_dir: Path, out: Path, device: str, log: Callable[[str], None]) -> tuple[List[Check], dict]:
    from cskd.export.exporter import ExportOptions, export_model
    from cskd.runtime.backends import BackendOptions, create_backend

    rows, packages = [], {}
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    for fmt in ("trt", "onnx"):
        for precision in ("fp32", "fp16", "int8"):
            name = f"export {fmt} {precision}"
            if fmt == "trt" and device != "cuda":
                rows.append(Check(name, "SKIP", "TensorRT needs a CUDA device"))
                continue

            def check(fmt=fmt, precision=precision) -> str:
                folder, package = export_model(run_dir, ExportOptions(format=fmt, precision=precision, out=out / f"{fmt}-{precision}",
                                                                      force=True), log)
                packages[(fmt, precision)] = folder
                parity = package.parity
                detail = (f"agreement {parity['agreement']:.2f}%, max |diff| {parity['max_abs_diff']:.2e}, "
                          f"top-1 {parity['engine_top1']:.2f}% (PyTorch {parity['reference_top1']:.2f}%)")
                if fmt == "onnx":
                    backend, _ = create_backend(folder, None, BackendOptions(providers=providers))
                    detail += f"; onnxruntime on {', '.join(backend.providers)}"
                return detail

            rows.append(_timed(name, check))
    return rows, packages


def serving_check(package: Path, clients: int, requests: int, device: str) -> Check:
    def check() -> str:
        import io
        from concurrent.futures import ThreadPoolExecutor

        from fastapi.testclient import TestClient
        from PIL import Image

        from cskd.assets import demo_arrays
        from cskd.errors import CSKDError
        from cskd.runtime.predict import predict_files
        from cskd.serve import create_app

        images = demo_arrays("val")[0][:8]
        blobs = []
        for array in images:
            buf = io.BytesIO()
            Image.fromarray(array, mode="L").save(buf, format="PNG")
            blobs.append(buf.getvalue())
        providers = None if device == "cuda" else ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory() as folder, TestClient(create_app(package, max_wait_ms=5, providers=providers)) as client:
            paths = []
            for i, blob in enumerate(blobs):
                paths.append(Path(folder) / f"{i}.png")
                paths[-1].write_bytes(blob)
            expected = [r["top"][0]["index"] for r in predict_files(package, paths, k=1, providers=providers)]
            send = lambda i: client.post("/predict?top_k=1", content=blobs[i % len(blobs)], headers={"content-type": "image/png"})  # noqa: E731
            with ThreadPoolExecutor(clients) as pool:
                responses = list(pool.map(send, range(requests)))
            wrong = [i for i, r in enumerate(responses) if r.status_code != 200 or
                     r.json()["predictions"][0]["top"][0]["index"] != expected[i % len(blobs)]]
            metrics = client.get("/metrics").text
            batches = [line for line in metrics.splitlines() if line.startswith("cskd_batch_size_images_count")]
            if wrong:
                raise CSKDError(f"{len(wrong)} of {requests} answers were not 200 or disagreed with cskd predict")
            return f"{requests} requests from {clients} clients: all 200, all equal to cskd predict ({batches[0].split()[-1]} batches)"

    return _timed(f"serve {package.name} under concurrency", check)


def format_table(rows: List[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  result  seconds  detail"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.seconds:>7.1f}  {r.detail}" for r in rows]
    failed = sum(r.status == "FAIL" for r in rows)
    lines.append(f"{len(rows)} checks: {sum(r.status == 'PASS' for r in rows)} passed, {failed} failed, "
                 f"{sum(r.status == 'SKIP' for r in rows)} skipped")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = environment(args.device)
    if any(r.status == "FAIL" and r.name == "CUDA device" for r in rows):
        print(format_table(rows))
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        log = lambda message: print(f"  {message}", file=sys.stderr)  # noqa: E731
        run_dir = args.run or quick_run(out, args.device)
        exports, packages = export_checks(run_dir, out, args.device, log)
        rows += exports
        served: Optional[Path] = packages.get(("trt", "fp16")) or packages.get(("onnx", "fp32"))
        rows.append(serving_check(served, args.clients, args.requests, args.device) if served
                    else Check("serve under concurrency", "FAIL", "no package was exported"))
        print(format_table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0
