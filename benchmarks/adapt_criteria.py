"""Which evidence tells whether `stereo-kd adapt` made the student better (issue 22).

Short adapt runs of the shipped student on real pairs that have ground truth (../shared/realval,
validation only: the adapted weights are thrown away), with teachers of known quality:

  exact    labels:DIR with the ground truth itself (adapting should help)
  shift5   the ground truth + 5 px (a wrong teacher: adapting must hurt)
  shift1   the ground truth + 1 px (a subtly wrong teacher)
  sgbm     OpenCV SGBM, a real teacher worse than the student

Every run uses --holdout 0, so the judge (stereo_kd_core/train/adapt_judge.py) scores the
training frames at the start and every checkpoint, and records their ground-truth EPE beside
its criteria (never used to decide). Each (run, checkpoint) is one point: the change of each
criterion from the start against the change of ground-truth EPE. The table: how often the
criterion's sign agrees with the true sign, the Spearman rank correlation, and per run whether
the judge's decision (keep the best checkpoint when it beats the start by min_gain, else the
start) ended no worse than the start against ground truth.

    PYTHONPATH=. python benchmarks/adapt_criteria.py --work /tmp/adapt_criteria   # runs + table
    PYTHONPATH=. python benchmarks/adapt_criteria.py --work /tmp/adapt_criteria --summarize
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from stereo_kd_core.data.io import read_pfm, write_pfm
from stereo_kd_core.train.adapt import run_adapt
from stereo_kd_core.train.adapt_judge import CRITERIA

RESULTS = Path(__file__).resolve().parent / "results"
REALVAL = Path(__file__).resolve().parents[2] / "shared" / "realval"
GROUPS = {  # scenes adapted on together (one "recording")
    "mb2001": ["mb2001_Barn1", "mb2001_Bull", "mb2001_Poster", "mb2001_Venus"],
    "mb2005-06": ["mb2005_Dolls", "mb2006_Baby1", "mb2005_Art", "mb2006_Rocks1"],
    "kitti+sawtooth": ["kitti2012_000070", "mb2001_Sawtooth"],
}
TEACHERS = ("exact", "shift5", "sgbm", "shift1")
STEPS, CHECKPOINT_EVERY = 40, 10
MIN_GAINS = (0.0, 0.0025, 0.005, 0.01, 0.02)
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every": CHECKPOINT_EVERY, "train.batch_size": 4,
             "data.crop": [128, 256], "train.log_every": 1, "adapt.holdout": 0.0, "adapt.replay_synthetic": 0.0,
             "adapt.judge": {"criterion": "photometric", "min_gain": 0.0025, "max_frames": 8, "record_all": True},
             "adapt.evaluation": {"synthetic_n": 2, "synthetic_height": 256, "synthetic_width": 512}}


def prepare(work: Path, group: str, teacher: str, realval: Path = REALVAL) -> tuple[Path, str]:
    """The group's pairs copied into work/<group>/frames and the teacher spec."""
    frames = work / group / "frames"
    for scene in GROUPS[group]:
        target = frames / scene
        if not target.is_dir():
            target.mkdir(parents=True)
            for name in ("im0.png", "im1.png", "disp0GT.pfm"):
                shutil.copy(realval / scene / name, target / name)
    if teacher == "sgbm":
        return frames, "sgbm"
    labels = work / group / f"labels-{teacher}"
    labels.mkdir(parents=True, exist_ok=True)
    shift = {"exact": 0.0, "shift5": 5.0, "shift1": 1.0}[teacher]
    for scene in GROUPS[group]:
        truth = read_pfm(frames / scene / "disp0GT.pfm")
        write_pfm(labels / f"{scene}.pfm", np.where(np.isfinite(truth) & (truth > 0), truth + shift, np.inf)
                  .astype(np.float32))
    return frames, f"labels:{labels}"


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values))
        return ranked

    if len(x) < 3:
        return math.nan
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def summarize(work: Path, min_gain: float) -> dict:
    points: dict[str, list[tuple[float, float]]] = {c: [] for c in CRITERIA}
    runs = []
    for path in sorted(work.glob("*/run-*/judge.json")):
        scores = {int(k): v for k, v in json.loads(path.read_text())["scores"].items()}
        truth0 = scores[0]["ground_truth"]
        run = {"run": f"{path.parent.parent.name}/{path.parent.name[4:]}", "start_epe": truth0,
               "checkpoints": {str(k): v for k, v in sorted(scores.items())}}
        for criterion in CRITERIA:
            if scores[0][criterion] is None:
                continue
            for step, value in scores.items():
                if step > 0 and value[criterion] is not None:
                    points[criterion].append((value[criterion] - scores[0][criterion], value["ground_truth"] - truth0))
            best = min((s for s in scores if s > 0), key=lambda s: (scores[s][criterion], -s))
            keep = scores[best][criterion] < scores[0][criterion] * (1 - min_gain)
            final_epe = scores[best]["ground_truth"] if keep else truth0
            run[criterion] = {"kept": "adapted" if keep else "start", "best_step": best, "final_epe": final_epe,
                              "oracle_epe": min(v["ground_truth"] for v in scores.values())}
        runs.append(run)
    table = {}
    for criterion, found in points.items():
        if not found:
            continue
        judged = [r[criterion] for r in runs if criterion in r]
        agree = [np.sign(a) == np.sign(b) for a, b in found if b != 0]
        table[criterion] = {
            "points": len(found), "sign_agreement": float(np.mean(agree)),
            "spearman": spearman([a for a, _ in found], [b for _, b in found]),
            "runs": len(judged),
            "runs_no_worse": int(sum(j["final_epe"] <= r["start_epe"] + 1e-9 for j, r in
                                     zip(judged, [r for r in runs if criterion in r], strict=True))),
            "mean_epe_change": float(np.mean([j["final_epe"] - r["start_epe"] for j, r in
                                              zip(judged, [r for r in runs if criterion in r], strict=True)])),
        }
    sweep = {}  # the decision rule at other margins: runs no worse, mean final EPE change
    for criterion in table:
        for gain in MIN_GAINS:
            changes = []
            for run in runs:
                if criterion not in run:
                    continue
                scores = {int(k): v for k, v in run["checkpoints"].items()}
                best = min((s for s in scores if s > 0), key=lambda s: (scores[s][criterion], -s))
                keep = scores[best][criterion] < scores[0][criterion] * (1 - gain)
                changes.append((scores[best]["ground_truth"] if keep else run["start_epe"]) - run["start_epe"])
            sweep.setdefault(criterion, {})[str(gain)] = {"runs_no_worse": int(sum(c <= 1e-9 for c in changes)),
                                                          "runs": len(changes),
                                                          "mean_epe_change": float(np.mean(changes))}
    return {"min_gain": min_gain, "min_gain_sweep": sweep, "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY,
            "overrides": OVERRIDES,
            "groups": GROUPS, "table": table, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder: copies, labels, runs")
    parser.add_argument("--groups", nargs="*", default=list(GROUPS), help="scene groups to run")
    parser.add_argument("--teachers", nargs="*", default=list(TEACHERS), help="teachers to run")
    parser.add_argument("--realval", type=Path, default=REALVAL, help="the realval folder")
    parser.add_argument("--summarize", action="store_true", help="only tabulate the runs already in --work")
    parser.add_argument("--min-gain", type=float, default=0.0025, help="the judge's min_gain for the decisions")
    parser.add_argument("--json", type=Path, default=RESULTS / "adapt_criteria.json", help="results file")
    args = parser.parse_args()
    if not args.summarize:
        for teacher in args.teachers:
            for group in args.groups:
                out = args.work / group / f"run-{teacher}"
                if (out / "before_after.json").is_file():
                    continue
                frames, spec = prepare(args.work, group, teacher, args.realval)
                started = time.perf_counter()
                run_adapt([frames], out, teacher=spec, init="dsnet-fast", device="cpu", overrides=OVERRIDES)
                print(f"{group} {teacher}: {time.perf_counter() - started:.0f} s", flush=True)
    result = summarize(args.work, args.min_gain)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| criterion | points | sign agreement | Spearman | runs no worse than start | mean EPE change |")
    print("|---|---|---|---|---|---|")
    for criterion, row in result["table"].items():
        print(f"| {criterion} | {row['points']} | {row['sign_agreement']:.0%} | {row['spearman']:+.2f} | "
              f"{row['runs_no_worse']}/{row['runs']} | {row['mean_epe_change']:+.3f} px |")


if __name__ == "__main__":
    main()
