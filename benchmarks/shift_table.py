"""The docs' before/after table of the shift suite, from `cskd bench` outputs: one markdown row per shift.

Each BENCH is a bench.json with the suite (the same teacher in each); the first student of each is a
column. Judged as the robustness issue judges, on the families the *last* student's recipe never
trained on (`source.trained_shifts`): kept = the student's relative robustness over the teacher's.
Prints the table and the summaries, writes JSON.

    python benchmarks/shift_table.py today=/tmp/b-demo/bench.json recipe=/tmp/b-inv/bench.json --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

from cskd.files import atomic_write_json


def load(text: str) -> Tuple[str, Dict, str]:
    name, sep, path = text.partition("=")
    if not sep:
        raise SystemExit(f"{text!r}: write NAME=BENCH_JSON")
    result = json.loads(Path(path).read_text())
    if "shifts" not in result:
        raise SystemExit(f"{path} holds no shift suite: run cskd bench without --no-shifts")
    suite = result["shifts"]
    student = next(label for label in suite["summary"] if label != suite["teacher"])
    return name, suite, student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", nargs="+", help="NAME=path/to/bench.json")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [load(b) for b in args.bench]
    first = runs[0][1]
    trained = set(runs[-1][1]["summary"][runs[-1][2]].get("trained_shifts") or [])
    names = [name for name, _, _ in runs]
    header = ["shift", "family", "teacher", *names, *(f"kept {n}" for n in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    rows: List[Dict] = []
    for i, row in enumerate(first["per_shift"]):
        seen = row["family"] in trained
        cells = [r[1]["per_shift"][i] for r in runs]
        if any(c["shift"] != row["shift"] for c in cells):
            raise SystemExit("the bench files hold different shift lists: bench them with the same --shift-* options")
        kept = [c["kept_vs_teacher"][label] for c, (_, _, label) in zip(cells, runs)]
        tops = [c["top1"][label] for c, (_, _, label) in zip(cells, runs)]
        mark = lambda k: f"**{k:.2f}x**" if k < 0.8 else f"{k:.2f}x"  # noqa: E731
        lines.append(f"| {row['shift']}{' (trained)' if seen else ''} | {row['family']} | {row['top1'][first['teacher']]:.1f} | "
                     + " | ".join(f"{t:.1f}" for t in tops) + " | " + " | ".join(mark(k) for k in kept) + " |")
        rows.append({"shift": row["shift"], "family": row["family"], "seen": seen, "teacher": row["top1"][first["teacher"]],
                     "top1": dict(zip(names, tops)), "kept": dict(zip(names, kept))})
    print("\n".join(lines))
    summaries = {}
    for name, suite, label in runs:
        s, t = suite["summary"][label], suite["summary"][suite["teacher"]]
        unseen = [r for r in rows if not r["seen"] and r["family"] != "geometric"]
        collapses = [r["shift"] for r in unseen if r["kept"][name] < 0.8]
        # each run on the same held-out corruptions (the last recipe's), so the columns compare
        mca = sum(r["top1"][name] for r in unseen) / len(unseen) if unseen else None
        teacher_mca = sum(r["teacher"] for r in unseen) / len(unseen) if unseen else None
        summaries[name] = {"clean": s["clean"], "teacher_clean": t["clean"], "mca": s["mca"], "teacher_mca": t["mca"],
                           "mce_vs_teacher": s["mce_vs_teacher"], "unseen": s.get("unseen"), "unseen_below_0.8": collapses,
                           "seconds": suite.get("seconds"), "held_out_mca": mca, "held_out_relative": mca / s["clean"] if mca else None,
                           "teacher_held_out_relative": teacher_mca / t["clean"] if teacher_mca else None}
        u = s.get("unseen") or {}
        print(f"{name}: clean {s['clean']:.2f} (teacher {t['clean']:.2f}); mCA {s['mca']:.1f} (teacher {t['mca']:.1f}), "
              f"mCE vs teacher {s['mce_vs_teacher']:.0f}; on the {len(unseen)} corruptions of the families the last recipe "
              f"never trained on: mCA {mca:.1f} (teacher {teacher_mca:.1f}), relative {mca / s['clean']:.3f} (teacher "
              f"{teacher_mca / t['clean']:.3f}), below 0.8x on {', '.join(collapses) or 'none'}"
              + (f"; mCE there {u['mce_vs_teacher']:.0f}" if u and s.get("trained_shifts") else ""))
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "summaries": summaries, "trained_families": sorted(trained)})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
