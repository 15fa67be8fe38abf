"""Training-step throughput: CSKD from a cached teacher, from the online teacher, and no KD.

Runs the real training step (``cskd.engine.train_one_epoch``, CSKD loss, the real teacher-target
objects of :mod:`cskd.teachers`) on synthetic batches that carry crop boxes and flips, interleaving
the modes over several rounds so machine drift hits each alike. The cached mode reads a real
memory-mapped cache (random maps of the teacher's grid written to a temporary folder). Prints a
table and writes JSON.

    python benchmarks/train_throughput.py --preset demo --device cpu         # nano DeiT <- RegNetY-016, 32 px
    python benchmarks/train_throughput.py --preset paper --device cuda --amp bf16 --batch 128
        # DeiT-Ti <- RegNetY-160 at 224 px (random weights: speed does not depend on them)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2

from cskd.distributed import DistEnv, pick_device
from cskd.engine import Normalization, StepContext
from cskd.files import atomic_write_json
from cskd.loss import CSKDLoss
from cskd.measure.training import NoSchedule, random_cache, synthetic_batches, training_rates
from cskd.models import create_student, create_teacher
from cskd.tasks import StudentTask
from cskd.teachers import CachedTeacher, LoadedTeacher, OnlineTeacher

PRESETS = {
    "demo": dict(student="cskd_deit_nano_distilled_patch4_32", teacher="regnety_016", teacher_kwargs={"output_stride": 8},
                 img_size=32, patch_size=4, in_chans=1, num_classes=10),
    "paper": dict(student="deit_tiny_distilled_patch16_224", teacher="regnety_160", teacher_kwargs={},
                  img_size=224, patch_size=16, in_chans=3, num_classes=1000),
}
MODES = ("cached", "online", "nokd")


def build_ctx(preset: dict, mode: str, device: torch.device, amp, teacher, cache) -> StepContext:
    torch.manual_seed(0)
    student = create_student(preset["student"], preset["num_classes"], preset["img_size"], preset["patch_size"],
                             preset["in_chans"]).to(device)
    optimizer = create_optimizer_v2(student, opt="adamw", lr=1e-4, weight_decay=0.05)
    kd = ("none", "none") if mode == "nokd" else ("hard", "hard")
    criterion = CSKDLoss(torch.nn.CrossEntropyLoss(), deit_type=kd[0], cskd_type=kd[1])
    targets = {"cached": CachedTeacher(cache), "online": OnlineTeacher(teacher), "nokd": None}[mode]
    norm = Normalization((0.5,) * preset["in_chans"], (0.25,) * preset["in_chans"])
    return StepContext(StudentTask(), student, targets, criterion, optimizer, NoSchedule(), norm, DistEnv(0, 1, 0, device),
                       amp_dtype=amp)


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
    network = create_teacher(preset["teacher"], preset["num_classes"], preset["in_chans"], **preset["teacher_kwargs"]).to(device)
    teacher = LoadedTeacher(preset["teacher"], network, (0.5,) * preset["in_chans"], (0.25,) * preset["in_chans"], Path("."), {})
    probe = torch.zeros(1, preset["in_chans"], preset["img_size"], preset["img_size"], device=device)
    grid = tuple(teacher(probe)[0].shape[-2:])
    count = 4096
    folder = Path(tempfile.mkdtemp(prefix="cskd-cache-bench-"))
    cache = random_cache(folder, count, preset["num_classes"], grid, 10 if preset["num_classes"] > 64 else None)
    contexts = {mode: build_ctx(preset, mode, device, amp, teacher, cache) for mode in MODES}
    batches = synthetic_batches(args.batch, args.steps, preset["in_chans"], preset["img_size"], preset["num_classes"], count,
                                device)

    rates = dict(zip(contexts, training_rates(list(contexts.values()), batches, args.rounds)))

    median = {mode: statistics.median(r) for mode, r in rates.items()}
    result = {
        "preset": args.preset, "student": preset["student"], "teacher": preset["teacher"], "img_size": preset["img_size"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "amp": args.amp, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "teacher_grid": list(grid), "images_per_s": median, "all_rounds": rates,
        "ratio_to_nokd": {mode: median[mode] / median["nokd"] for mode in MODES},
        "cached_over_online": median["cached"] / median["online"],
    }
    print(f"{args.preset}: {preset['student']} <- {preset['teacher']} at {preset['img_size']} px, batch {args.batch}, "
          f"{device} ({result['device_name']}), amp {args.amp}")
    print(f"{'mode':<7} {'images/s':>10} {'vs no-KD':>9}")
    for mode in MODES:
        print(f"{mode:<7} {median[mode]:>10.1f} {result['ratio_to_nokd'][mode]:>8.2f}x")
    print(f"cached teacher targets: {result['cached_over_online']:.2f}x the online teacher's training throughput")
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
