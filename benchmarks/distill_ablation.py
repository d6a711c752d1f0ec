"""What distillation buys: the paper's ablation at equal student budget (steps, data, seed, init).

Runs of the cached-distillation recipe that differ only in their loss:
  ground truth only      (cost and disparity weights 0)
  teacher only           (ground-truth weight 0)
  teacher + ground truth (the recipe as shipped)
  agreeing teacher + ground truth (the teacher's points only where it is within 1 px of the
                         label: distill.teacher_agreement_px), at the ground truth's weight
                         and at a fifth of it (light)
each evaluated with `stereo-kd eval` on the scikit-image Motorcycle pair (zero-shot) and the fixed
synthetic test split (seed 2026). Writes benchmarks/results/ablation_<variant>_{motorcycle,synthetic}.json
(or ablation_<label>_<variant>_... with --label) and prints a Markdown table.

    python benchmarks/distill_ablation.py --steps 300 --out runs/ablation
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_results import RESULTS, evaluate

from stereo_kd_core.cli import main as cli

VARIANTS = {
    "ground_truth_only": ["distill.cost.weight.initial=0", "distill.disparity.weight.initial=0"],
    "teacher_only": ["distill.ground_truth.weight.initial=0"],
    "teacher_and_ground_truth": [],
    "agreeing_teacher_and_ground_truth": ["distill.teacher_agreement_px=1.0"],
    "agreeing_teacher_light_and_ground_truth": ["distill.teacher_agreement_px=1.0",
                                                "distill.cost.weight.initial=0.2",
                                                "distill.disparity.weight.initial=0.2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="distill-cpu-dsnet-fast", help="cached-distillation recipe")
    parser.add_argument("--steps", type=int, default=300, help="student steps, the same for every variant")
    parser.add_argument("--init-from", default=None, help="warm start (default: the recipe's)")
    parser.add_argument("--synthetic-n", type=int, default=50, help="pairs of the synthetic test split")
    parser.add_argument("--out", default="runs/ablation", help="folder for the three runs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which runs (default all)")
    parser.add_argument("--label", default="", help="prefix of the result files (e.g. the warm start's name)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        out = Path(args.out) / variant
        overrides = [f"train.steps={args.steps}", *VARIANTS[variant]]
        command = ["distill", args.recipe, "--out", str(out), *sum((["--set", o] for o in overrides), [])]
        if args.init_from:
            command += ["--init-from", args.init_from]
        if not (out / "final.pt").is_file():
            assert cli(command) == 0
        rows.append({"variant": variant,
                     **evaluate(str(out / "final.pt"), args.synthetic_n,
                                RESULTS / f"ablation_{args.label + '_' if args.label else ''}{variant}")})
    print(f"| variant ({args.steps} steps each) | Motorcycle EPE | Motorcycle bad-2 % | synthetic EPE "
          "| synthetic bad-2 % |")
    print("|---|---|---|---|---|")
    for row in rows:
        moto, syn = row["motorcycle"], row["synthetic"]
        print(f"| {row['variant']} | {moto['epe']:.2f} | {moto['bad2']:.1f} | {syn['epe']:.2f} | {syn['bad2']:.1f} |")


if __name__ == "__main__":
    main()
