"""What the image-guided refinement buys: two runs at equal budget (steps, data, seeds, init) that
differ only in `model.refine_channels` (0: the plain student; N: DisparityRefinement with N
channels, starting as the identity), each evaluated with `stereo-kd eval` on the scikit-image
Motorcycle pair (zero-shot) and the first pairs of the fixed synthetic test split (seed 2026).
Writes benchmarks/results/refinement_ablation.json and prints a Markdown table.

    python benchmarks/refinement_ablation.py --init-from runs/stage1c/final.pt --steps 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from model_results import RESULTS, evaluate

from stereo_kd_core.cli import main as cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cpu-dsnet-fast-larger", help="supervised recipe both runs use")
    parser.add_argument("--init-from", required=True, help="warm start of both runs (a checkpoint without refinement)")
    parser.add_argument("--steps", type=int, default=400, help="steps, the same for both runs")
    parser.add_argument("--channels", type=int, default=24, help="refine_channels of the refined run")
    parser.add_argument("--synthetic-n", type=int, default=50, help="pairs of the synthetic test split")
    parser.add_argument("--out", default="runs/refinement_ablation", help="folder for the two runs")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    init_sha = hashlib.sha256(Path(args.init_from).read_bytes()).hexdigest()
    rows = []
    for channels in (0, args.channels):
        out = Path(args.out) / f"refine_{channels}"
        overrides = [f"train.steps={args.steps}", f"model.refine_channels={channels}", "train.checkpoint_every=100000"]
        command = ["train", args.recipe, "--out", str(out), "--init-from", args.init_from,
                   *sum((["--set", o] for o in overrides), [])]
        if not (out / "final.pt").is_file():
            assert cli(command) == 0
        rows.append({"refine_channels": channels, **evaluate(str(out / "final.pt"), args.synthetic_n, out / "eval")})
    summary = {"recipe": args.recipe, "steps": args.steps, "init_from_sha256": init_sha,
               "synthetic_n": args.synthetic_n, "runs": rows}
    (RESULTS / "refinement_ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| refine_channels ({args.steps} steps each) | Motorcycle EPE | Motorcycle bad-2 % | synthetic EPE "
          "| synthetic bad-2 % |")
    print("|---|---|---|---|---|")
    for row in rows:
        moto, syn = row["motorcycle"], row["synthetic"]
        print(f"| {row['refine_channels']} | {moto['epe']:.2f} | {moto['bad2']:.1f} | {syn['epe']:.2f} "
              f"| {syn['bad2']:.1f} |")


if __name__ == "__main__":
    main()
