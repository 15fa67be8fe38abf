"""Training-step throughput: CSKD against DeiT-only distillation and no KD, same teacher.

Runs the real training step (``cskd.engine.train_one_epoch``) on synthetic batches, interleaving the
three modes over several rounds so machine drift hits each alike, and times the teacher's forward
pass alone to give its share of a CSKD step. Prints a table and writes JSON.

    python benchmarks/train_throughput.py --preset demo --device cpu          # demo models, 32 px
    python benchmarks/train_throughput.py --preset paper --device cuda --amp bf16 --batch 128
        # DeiT-Ti student, RegNetY-160 teacher at 224 px (random weights: speed does not depend on them)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cskd.distributed import DistEnv, pick_device
from cskd.engine import Normalization, StepContext, autocast, train_one_epoch
from cskd.loss import CSKDLoss
from cskd.models import create_student, create_teacher

PRESETS = {
    "demo": dict(student="cskd_deit_nano_distilled_patch4_32", teacher="cskd_resnet_micro", teacher_kwargs={"output_stride": 8},
                 img_size=32, patch_size=4, in_chans=1, num_classes=10),
    "paper": dict(student="deit_tiny_distilled_patch16_224", teacher="regnety_160", teacher_kwargs={},
                  img_size=224, patch_size=16, in_chans=3, num_classes=1000),
}
MODES = {"cskd": ("hard", "hard"), "deit": ("hard", "none"), "nokd": ("none", "none")}


class _NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_ctx(preset: dict, mode: str, device: torch.device, amp: torch.dtype | None, teacher) -> StepContext:
    deit_type, cskd_type = MODES[mode]
    torch.manual_seed(0)
    student = create_student(preset["student"], preset["num_classes"], preset["img_size"], preset["patch_size"],
                             preset["in_chans"]).to(device)
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(student, opt="adamw", lr=1e-4, weight_decay=0.05)
    criterion = CSKDLoss(torch.nn.CrossEntropyLoss(), deit_type=deit_type, cskd_type=cskd_type)
    norm = Normalization((0.5,) * preset["in_chans"], (0.25,) * preset["in_chans"])
    return StepContext(student, teacher if criterion.needs_teacher else None, criterion, optimizer, _NoSchedule(),
                       norm, norm, DistEnv(0, 1, 0, device), amp_dtype=amp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("train_throughput.json"))
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    device = pick_device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    teacher = create_teacher(preset["teacher"], preset["num_classes"], preset["in_chans"], **preset["teacher_kwargs"]).to(device)
    contexts = {mode: build_ctx(preset, mode, device, amp, teacher) for mode in MODES}
    size = (args.batch, preset["in_chans"], preset["img_size"], preset["img_size"])
    batches = [(torch.rand(size, device=device), torch.randint(0, preset["num_classes"], (args.batch,), device=device))
               for _ in range(args.steps)]

    for ctx in contexts.values():  # warm-up (allocator, kernels, autotuning)
        train_one_epoch(ctx, batches[:3], 0, 3, 3 * args.steps)
    rates = {mode: [] for mode in MODES}
    teacher_ms = []
    for _ in range(args.rounds):
        for mode, ctx in contexts.items():
            _sync(device)
            start = time.perf_counter()
            train_one_epoch(ctx, batches, 0, args.steps, args.steps)
            _sync(device)
            rates[mode].append(args.batch * args.steps / (time.perf_counter() - start))
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, amp):
            for images, _ in batches:
                teacher(images)
        _sync(device)
        teacher_ms.append(1000 * (time.perf_counter() - start) / args.steps)

    median = {mode: statistics.median(r) for mode, r in rates.items()}
    cskd_step_ms = 1000 * args.batch / median["cskd"]
    result = {
        "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "amp": args.amp, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "images_per_s": median, "all_rounds": rates,
        "ratio_to_nokd": {mode: median[mode] / median["nokd"] for mode in MODES},
        "teacher_forward_ms": statistics.median(teacher_ms),
        "teacher_share_of_cskd_step": statistics.median(teacher_ms) / cskd_step_ms,
    }
    print(f"{args.preset}: {preset['student']} <- {preset['teacher']} at {preset['img_size']} px, batch {args.batch}, "
          f"{device} ({result['device_name']}), amp {args.amp}")
    print(f"{'mode':<6} {'images/s':>10} {'vs no-KD':>9}")
    for mode in MODES:
        print(f"{mode:<6} {median[mode]:>10.1f} {result['ratio_to_nokd'][mode]:>8.2f}x")
    print(f"teacher forward {result['teacher_forward_ms']:.1f} ms/step = {100 * result['teacher_share_of_cskd_step']:.0f}% of a CSKD step")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
