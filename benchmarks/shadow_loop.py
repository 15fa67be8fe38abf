"""The deployed student watched by its teacher, one round of the loop: drift, alert, capture, distil, redeploy.

    python benchmarks/shadow_loop.py --run runs/demo --data-path ../shared/data/fashion-mnist --out runs/shadow-loop

The shift: thumbnails. A deployed classifier meets it when a client starts sending low-resolution
images (a new app version that uploads thumbnails to save bandwidth, a listing site's previews):
each Fashion-MNIST image is downscaled to 40-60% of its side (11-17 px) and upscaled back to 28 px,
bilinear both ways. It was chosen over two others probed on 1,000 validation images (student /
teacher / agreement, %): clean 84.8 / 92.6 / 88.1; thumbnails 73.4 / 84.5 / 79.9; the garment at
75-90% of the frame, anywhere in it, 59.7 / 75.5 / 69.6; at 55-75%, 26.7 / 52.0 / 46.8. Under
thumbnails the teacher stays good, so its answers are worth learning from, and the student loses
more than it does: what a shadow teacher is for. The labels are known to this script only; the
loop itself never sees them.

Images: the Fashion-MNIST test split without the 2,000 the demo validates on (those stay the clean
validation set), split into live traffic (1,000 clean, then 5,000 shifted) and 2,000 fresh shifted
images that are never captured, for judging before and after.

1. Fidelity: the deployed student serves the 2,000 clean validation images with the shadow at rate 1.0
   (nothing dropped); its reported agreement against `cskd bench`'s offline agreement on the same images.
2. Before: accuracy and agreement on the clean validation images and on the fresh shifted ones.
3. Live traffic on a server with --shadow-capture: clean, then shifted; the agreement over the window
   falls, the alert fires (the server's log), and the disagreeing images are captured.
4. One round: `cskd cache-teacher data.unlabeled=CAPTURED` (the teacher labels them), `cskd train
   student.init=RUN data.unlabeled=CAPTURED teacher.cache=...`, `cskd export`: the next student.
5. After: the new student serves the fresh shifted images (the agreement over time continues) and the
   clean validation images: accuracy and agreement, as before.

Writes OUT/loop.json, OUT/loop.md (the table) and OUT/loop.png (agreement over time, before and after
the redeploy). Steps that are done (a package, a capture, a run) are reused when the script is rerun.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import httpx
import numpy as np
from PIL import Image

from cskd.data.datasets import demo_arrays, fashion_mnist_arrays
from cskd.measure.served import ServedOptions, Server

BATCH = 32  # images per /predict request
THUMBNAIL_SCALE = (0.4, 0.6)


def shifted(images: np.ndarray, seed: int) -> np.ndarray:
    """Each uint8 image downscaled to 40-60% of its side and upscaled back (bilinear): a thumbnail."""
    rng = np.random.default_rng(seed)
    side = images.shape[1]
    out = []
    for image in images:
        small = int(round(side * rng.uniform(*THUMBNAIL_SCALE)))
        thumbnail = Image.fromarray(image).resize((small, small), Image.BILINEAR)
        out.append(np.asarray(thumbnail.resize((side, side), Image.BILINEAR)))
    return np.stack(out)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def image_pools(data_path: str, seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """clean validation (the demo's), live clean, live shifted and fresh shifted images, with labels."""
    val_images, val_labels = demo_arrays("val")
    test_images, test_labels = fashion_mnist_arrays(data_path, "val")
    held = {image.tobytes() for image in val_images}
    others = np.array([i for i, image in enumerate(test_images) if image.tobytes() not in held])
    order = np.random.default_rng(seed).permutation(others)
    live_clean, live_shifted, fresh = order[:1000], order[1000:6000], order[6000:8000]
    return {"clean validation": (val_images, val_labels),
            "live clean": (test_images[live_clean], test_labels[live_clean]),
            "live shifted": (shifted(test_images[live_shifted], seed + 1), test_labels[live_shifted]),
            "fresh shifted": (shifted(test_images[fresh], seed + 2), test_labels[fresh])}


def cskd(*args: str, log: Path) -> None:
    with open(log, "w") as out:
        if subprocess.run([sys.executable, "-m", "cskd", *args], stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"cskd {args[0]} failed; see {log}")


def shadow(url: str) -> Dict:
    return httpx.get(url + "/v1/shadow", timeout=30).json()


def drive(url: str, images: np.ndarray, labels: np.ndarray, timeline: List[Dict], phase: str) -> Dict:
    """Post ``images`` to /predict in requests of BATCH, letting the teacher catch up after each (nothing
    dropped), recording the window's agreement as it goes; the phase's accuracy and agreement."""
    before = shadow(url)["samples"]
    correct = 0
    with httpx.Client(timeout=60) as client:
        for start in range(0, len(images), BATCH):
            files = [("files", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images[start : start + BATCH])]
            answer = client.post(url + "/predict?top_k=1", files=files)
            answer.raise_for_status()
            top1 = [p["top"][0]["index"] for p in answer.json()["predictions"]]
            correct += int(np.sum(np.array(top1) == labels[start : start + BATCH]))
            while (report := shadow(url))["queued"]:
                time.sleep(0.05)
            timeline.append({"phase": phase, "agreement": report["window"]["agreement"], "alert": report["alert"]["firing"],
                             "served": (timeline[-1]["served"] if timeline else 0) + len(top1)})
    after = shadow(url)["samples"]
    delta = {k: after[k] - before[k] for k in after}
    if delta["dropped"] or delta["failed"]:
        raise SystemExit(f"{phase}: the shadow dropped or failed samples ({delta}); raise --shadow-queue")
    return {"images": len(images), "accuracy": 100.0 * correct / len(images),
            "agreement": 100.0 * delta["agree"] / (delta["agree"] + delta["disagree"]), "samples": delta}


def serve(student: Path, teacher: Path, out: Path, label: str, extra: Sequence[str] = ()) -> Server:
    args = ["--shadow", str(teacher), "--shadow-rate", "1.0", "--shadow-queue", "4096", *extra]
    return Server(student, ServedOptions(serve_args=args), out / f"{label}.server.log")


def offline_agreement(student: Path, teacher: Path, out: Path) -> float:
    """`cskd bench`'s agreement of the student with the teacher on the 2,000 clean validation images."""
    bench = out / "bench"
    cskd("bench", str(student), "--teacher", str(teacher), "--batch-sizes", "1", "--rounds", "1", "--eval-images", "2000",
         "--out", str(bench), log=out / "bench.log")
    rows = json.loads((bench / "bench.json").read_text())["rows"]
    return next(r["agreement_with_teacher"] for r in rows if r["role"] == "student")


def export(run: Path, out: Path, precision: str, teacher: bool = False) -> Path:
    package = out / (f"{run.name}-teacher" if teacher else f"{run.name}-{precision}")
    if not (package / "model.json").exists():
        cskd("export", str(run), "--precision", "fp32" if teacher else precision, "--out", str(package),
             *(["--teacher"] if teacher else []), log=out / f"export-{package.name}.log")
    return package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the deployed student's run directory")
    parser.add_argument("--data-path", required=True, help="Fashion-MNIST IDX folder (its test split is the traffic)")
    parser.add_argument("--precision", default="fp32", help="the deployed package's precision")
    parser.add_argument("--alert", type=float, default=0.82, help="--shadow-alert of the live server (the clean agreement is 85-88%%)")
    parser.add_argument("--window", type=int, default=500, help="--shadow-window")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the round's distillation")
    parser.add_argument("--lr", type=float, default=5e-3, help="its train.lr (the demo's is 2e-2: a quarter, as fine-tuning)")
    parser.add_argument("--threads", type=int, help="train.threads of the round")
    parser.add_argument("--out", type=Path, default=Path("shadow-loop"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pools = image_pools(args.data_path)
    student = export(args.run, out, args.precision)
    teacher = export(args.run, out, args.precision, teacher=True)
    result: Dict = {"shift": f"thumbnails: downscaled to {THUMBNAIL_SCALE[0]:.0%}-{THUMBNAIL_SCALE[1]:.0%} of the side and back",
                    "precision": args.precision, "alert": args.alert, "timeline": []}

    print("1-2. fidelity, and the deployed student before", flush=True)
    result["offline_agreement"] = offline_agreement(student, teacher, out)
    with serve(student, teacher, out, "before") as server:
        result["before"] = {phase: drive(server.url, *pools[phase], [], phase) for phase in ("clean validation", "fresh shifted")}
    print(f"   served agreement {result['before']['clean validation']['agreement']:.2f}% against cskd bench's "
          f"{result['offline_agreement']:.2f}%", flush=True)

    captured = out / "captured"
    print("3. live traffic: clean, then shifted, with the disagreements captured", flush=True)
    if not (captured / "index.jsonl").exists():
        with serve(student, teacher, out, "live", ["--shadow-capture", str(captured), "--shadow-window", str(args.window),
                                                     "--shadow-alert", str(args.alert)]) as server:
            result["live"] = {phase: drive(server.url, *pools[phase], result["timeline"], phase)
                              for phase in ("live clean", "live shifted")}
            result["live"]["final_report"] = shadow(server.url)
        log = (out / "live.server.log").read_text()
        result["alert_logged"] = [line for line in log.splitlines() if "below the alert threshold" in line]
        (out / "live.json").write_text(json.dumps({k: result[k] for k in ("live", "timeline", "alert_logged")}))
    else:
        result.update(json.loads((out / "live.json").read_text()))
    result["captured"] = sum(1 for _ in open(captured / "index.jsonl"))
    print(f"   {result['captured']} disagreeing images captured; alert: {result['alert_logged'][:1]}", flush=True)

    print("4. one round: cache the teacher on the captured images, distil from the deployed run, export", flush=True)
    cache, round_run = out / "cache", out / "round1"
    if not (cache / "manifest.json").exists():
        cskd("cache-teacher", "--no-progress", f"data.unlabeled={captured}", "--out", str(cache), log=out / "cache.log")
    if not (round_run / "last.safetensors").exists():
        started = time.time()
        cskd("train", "--no-progress", f"student.init={args.run}", f"data.unlabeled={captured}", f"teacher.cache={cache}",
             f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.warmup_epochs=0", f"output={round_run}",
             *([f"train.threads={args.threads}"] if args.threads else []), log=out / "round1.log")
        (out / "round1.wall_s").write_text(f"{time.time() - started:.0f}\n")
    result["round_wall_s"] = float((out / "round1.wall_s").read_text()) if (out / "round1.wall_s").exists() else None
    redeployed = export(round_run, out, args.precision)

    print("5. the redeployed student on fresh shifted images, then the clean validation images", flush=True)
    with serve(redeployed, teacher, out, "after", ["--shadow-window", str(args.window)]) as server:
        after_timeline: List[Dict] = [dict(result["timeline"][-1], phase="redeploy")]
        result["after"] = {phase: drive(server.url, *pools[phase], after_timeline, phase)
                           for phase in ("fresh shifted", "clean validation")}
    result["timeline"] += after_timeline[1:]
    report(result, out)


def report(result: Dict, out: Path) -> None:
    before, after = result["before"], result["after"]
    lost = before["clean validation"]["agreement"] - before["fresh shifted"]["agreement"]
    regained = after["fresh shifted"]["agreement"] - before["fresh shifted"]["agreement"]
    result["verdict"] = {
        "fidelity_points": before["clean validation"]["agreement"] - result["offline_agreement"],
        "agreement_lost_on_shift": lost, "agreement_regained": regained,
        "share_of_loss_recovered": regained / lost if lost > 0 else None,
        "shifted_accuracy_gain": after["fresh shifted"]["accuracy"] - before["fresh shifted"]["accuracy"],
        "clean_accuracy_change": after["clean validation"]["accuracy"] - before["clean validation"]["accuracy"],
    }
    lines = ["| student | clean validation: top-1 | agreement | fresh shifted: top-1 | agreement |", "|---|---|---|---|---|"]
    for label, phases in (("deployed", before), ("after one round", after)):
        lines.append(f"| {label} | {phases['clean validation']['accuracy']:.2f} | {phases['clean validation']['agreement']:.2f} | "
                     f"{phases['fresh shifted']['accuracy']:.2f} | {phases['fresh shifted']['agreement']:.2f} |")
    v = result["verdict"]
    lines += ["", f"served agreement on the clean validation images {before['clean validation']['agreement']:.2f}% against "
              f"cskd bench's {result['offline_agreement']:.2f}% ({v['fidelity_points']:+.2f} points)",
              f"captured: {result['captured']} disagreeing images of {result['live']['live shifted']['images']} shifted and "
              f"{result['live']['live clean']['images']} clean live images; alert logged: {bool(result['alert_logged'])}",
              f"agreement lost on shifted images {v['agreement_lost_on_shift']:.2f} points, regained {v['agreement_regained']:.2f} "
              f"({(v['share_of_loss_recovered'] or 0):.0%}); shifted top-1 {v['shifted_accuracy_gain']:+.2f}, "
              f"clean top-1 {v['clean_accuracy_change']:+.2f}"]
    (out / "loop.md").write_text("\n".join(lines) + "\n")
    (out / "loop.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "loop.png")
    print("\n".join(lines))


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    colours = {"live clean": "tab:blue", "live shifted": "tab:red", "fresh shifted": "tab:green", "clean validation": "tab:gray"}
    points = [p for p in result["timeline"] if p["agreement"] is not None]
    for phase, colour in colours.items():
        xs = [p["served"] for p in points if p["phase"] == phase]
        ys = [100 * p["agreement"] for p in points if p["phase"] == phase]
        if xs:
            ax.plot(xs, ys, color=colour, label=phase)
    redeploy = next((p["served"] for p in points if p["phase"] in ("fresh shifted",)), None)
    if redeploy is not None:
        ax.axvline(redeploy, color="black", linestyle="--", linewidth=1)
        ax.text(redeploy, ax.get_ylim()[0] + 1, " redeploy", fontsize=8)
    ax.axhline(100 * result.get("alert", 0.85), color="tab:orange", linestyle=":", linewidth=1, label="alert threshold")
    ax.set_xlabel("images served")
    ax.set_ylabel("agreement with the teacher over the window (%)")
    ax.set_title("the served student watched by its teacher: drift, alert, one round of distillation, redeploy")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
