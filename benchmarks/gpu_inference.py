"""GPU inference: fused DeiT student against its CNN teacher, eager vs CUDA graphs vs torch.compile.

Random weights (speed does not depend on them). bf16 or fp16 weights, channels-last for the CNN,
batch 1 and 64 by default; modes are interleaved per round so clock drift hits all alike. Writes
JSON after every measurement, so a run cut short still leaves its results.

    python benchmarks/gpu_inference.py --json gpu_inference.json             # DeiT-Ti vs RegNetY-160, 224 px
    python benchmarks/gpu_inference.py --modes eager graph compile --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from cskd.models import create_student, create_teacher, fuse_heads


def cuda_graph(model: torch.nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture one forward pass; replay copies the input into the captured buffer."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return run


def measure(fn: Callable, x: torch.Tensor, iters: int) -> Dict[str, float]:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    wall = time.perf_counter()
    for s, e in zip(starts, ends):
        s.record()
        fn(x)
        e.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    lat = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"p50_ms": statistics.median(lat), "p90_ms": lat[int(0.9 * (len(lat) - 1))],
            "images_per_s": x.shape[0] * iters / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="deit_tiny_distilled_patch16_224")
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=("eager", "graph", "compile"))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("gpu_inference.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU inference")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.backends.cudnn.benchmark = True
    student = fuse_heads(create_student(args.student, 1000, args.img_size, 16)).cuda().to(dtype).eval()
    teacher = create_teacher(args.teacher, 1000).model.cuda().to(dtype).eval().to(memory_format=torch.channels_last)
    models = {"student": student, "teacher": teacher}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "student": args.student, "teacher": args.teacher, "img_size": args.img_size, "runs": {}}
    runners = {}
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, 3, args.img_size, args.img_size, device="cuda", dtype=dtype)
            for name, model in models.items():
                for mode in args.modes:
                    if mode == "eager":
                        runners[(name, batch, mode)] = model
                    elif mode == "graph":
                        runners[(name, batch, mode)] = cuda_graph(model, x)
                    else:
                        start = time.perf_counter()
                        compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
                        compiled(x)
                        result.setdefault("compile_s", {})[f"{name}/b{batch}"] = time.perf_counter() - start
                        runners[(name, batch, mode)] = compiled
        samples: Dict[str, list] = {}
        for _ in range(args.rounds):
            for (name, batch, mode), fn in runners.items():
                x = torch.randn(batch, 3, args.img_size, args.img_size, device="cuda", dtype=dtype)
                samples.setdefault(f"{name}/b{batch}/{mode}", []).append(measure(fn, x, args.iters))
                result["runs"] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in samples.items()}
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['gpu']}, torch {result['torch']}, {args.dtype}, {args.img_size} px: {args.student} (fused) vs {args.teacher}")
    print(f"{'model':<8} {'batch':>5} {'mode':<8} {'p50 ms':>8} {'p90 ms':>8} {'images/s':>10}")
    for key, r in result["runs"].items():
        name, batch, mode = key.split("/")
        print(f"{name:<8} {batch[1:]:>5} {mode:<8} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['images_per_s']:>10.0f}")
    for batch in args.batches:
        for mode in args.modes:
            s, t = result["runs"][f"student/b{batch}/{mode}"], result["runs"][f"teacher/b{batch}/{mode}"]
            print(f"speedup student/teacher at batch {batch}, {mode}: {s['images_per_s'] / t['images_per_s']:.1f}x")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
