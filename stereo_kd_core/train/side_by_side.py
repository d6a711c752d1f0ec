"""Several recipes trained side by side on one batch stream: one data pipeline, one device.

An ablation compares recipes at equal data and equal budget; on a GPU the data generator, not the
small networks, is the bottleneck. Here one DataLoader feeds every recipe's `Trainer.train_step`
with the same batch. The recipes must agree on everything that decides the batches (`data`,
`train.batch_size`, `train.seed`): the batches are then exactly those each recipe draws when it
is trained alone, so `stereo-kd train RECIPE` (or `distill`) with the same steps reproduces each
result (up to the device's floating-point order). Every recipe runs the largest `train.steps`
among them (its schedule spans that count), and each run's recipe.yaml records it.

`seconds` fits the step count to a time budget: after `probe_steps` steps the rate is measured and
every recipe's `train.steps` (which its one-cycle or cosine schedule spans) is set so that the run
ends inside the budget; the decided count is written to each run's recipe.yaml. A run that still
overruns by a quarter stops and keeps last.pt (no final.pt).

    python -m stereo_kd_core.train.side_by_side RECIPE RECIPE ... --out DIR [--seconds S]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from stereo_kd_core.train.recipe import RecipeError, load_recipe
from stereo_kd_core.train.trainer import LAST_CHECKPOINT, Trainer

FIT_MARGIN = 0.92  # a fitted run plans to end 8 % early: the rate can drop
OVERRUN_LIMIT = 1.25  # a budgeted run stops at 1.25 x its seconds, whatever its schedule says


def run_name(recipe: str | Mapping, index: int) -> str:
    """The output folder of one recipe: its file stem, or run<index> for a mapping."""
    return Path(recipe).stem if isinstance(recipe, str) else f"run{index}"


def check_same_stream(recipes: Sequence[Mapping], names: Sequence[str]) -> None:
    """Raise RecipeError unless every recipe draws the same batches as the first."""
    def stream(recipe: Mapping) -> dict:
        return {"data": recipe["data"], "train.batch_size": recipe["train"]["batch_size"],
                "train.seed": recipe["train"]["seed"]}

    first = stream(recipes[0])
    for name, recipe in zip(names[1:], recipes[1:], strict=True):
        mine = stream(recipe)
        differing = sorted(key for key in first if first[key] != mine[key])
        if differing:
            raise RecipeError(f"{name} draws other batches than {names[0]} (it differs at "
                              f"{', '.join(differing)}); side by side needs one batch stream")


def fitted_steps(done: int, elapsed: float, seconds: float, probe_elapsed: float, probe_steps: int,
                 maximum: int) -> int:
    """Total steps that end inside `seconds` (with FIT_MARGIN to spare) at the probe window's rate."""
    rate = probe_steps / max(probe_elapsed, 1e-9)
    return max(done, min(maximum, done + int(FIT_MARGIN * rate * max(seconds - elapsed, 0.0))))


def train_side_by_side(recipes: Sequence[str | Mapping], out_dir: str | Path, *,
                       overrides: Mapping | None = None, steps: int | None = None,
                       seconds: float | None = None, probe_steps: int = 40,
                       log=print) -> dict[str, Path]:
    """Train `recipes` on one batch stream; returns {run name: final.pt (or last.pt)}."""
    if not recipes:
        raise ValueError("give at least one recipe")
    names = [run_name(recipe, index) for index, recipe in enumerate(recipes)]
    if len(set(names)) != len(names):
        raise ValueError(f"two recipes share a run name: {names}")
    extra = dict(overrides or {})
    if steps is not None:
        extra["train.steps"] = int(steps)
    loaded = [load_recipe(recipe, extra) for recipe in recipes]
    check_same_stream(loaded, names)
    out_dir = Path(out_dir)
    trainers = []
    for name, recipe in zip(names, loaded, strict=True):
        trainer = Trainer(recipe, out_dir / name)
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        trainers.append(trainer)
    first = trainers[0]
    total = max(trainer.total_steps for trainer in trainers)
    for trainer in trainers:
        trainer.total_steps = total
    train = first.recipe["train"]
    loader = first.batch_loader(0, total)
    logs = [trainer.open_log(0) for trainer in trainers]
    for trainer in trainers:
        trainer.enter_training()
    started = time.perf_counter()
    probe_started, probe_from = started, probe_steps // 4  # the first quarter warms up
    done = 0
    try:
        for step, batch in enumerate(loader):
            if step == probe_from:
                probe_started = time.perf_counter()
            records = [trainer.timed_step(step, batch) for trainer in trainers]
            done = step + 1
            now = time.perf_counter()
            if seconds is not None and done == probe_steps:
                total = fitted_steps(done, now - started, seconds, now - probe_started,
                                     probe_steps - probe_from, total)
                for trainer in trainers:
                    trainer.total_steps = total
                log(f"side by side: {done} steps in {now - started:.0f} s; {total} steps fit in {seconds:.0f} s")
            for trainer, record, (log_file, writer) in zip(trainers, records, logs, strict=True):
                if done % train["log_every"] == 0 or done == total or record["skipped"]:
                    writer.writerow(record)
                    log_file.flush()
                trainer.check_nonfinite_streak(done)
            if done % train["log_every"] == 0:
                losses = ", ".join(f"{n} {r['loss']:.4f}" for n, r in zip(names, records, strict=True))
                log(f"step {done}/{total} ({now - started:.0f} s): {losses}")
            if done % train["checkpoint_every"] == 0 and done < total:
                for trainer in trainers:
                    trainer.save(done, trainer.out_dir / LAST_CHECKPOINT)
            if done >= total:
                break
            if seconds is not None and done > probe_steps and now - started > OVERRUN_LIMIT * seconds:
                log(f"side by side: over {OVERRUN_LIMIT} x {seconds:.0f} s at step {done} of {total}; stopping")
                break
    finally:
        for log_file, _ in logs:
            log_file.close()
    results = {}
    for name, trainer in zip(names, trainers, strict=True):
        trainer.recipe["train"]["steps"] = total
        trainer.write_recipe()
        trainer.save(done, trainer.out_dir / LAST_CHECKPOINT)
        results[name] = trainer.save_final(done) if done >= total else trainer.out_dir / LAST_CHECKPOINT
    log(f"side by side: {done} steps in {time.perf_counter() - started:.0f} s on {first.device}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stereo_kd_core.train.side_by_side", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="recipe names or YAML files (one batch stream)")
    parser.add_argument("--out", required=True, help="one folder per recipe is made below this")
    parser.add_argument("--steps", type=int, help="override every recipe's train.steps")
    parser.add_argument("--seconds", type=float, help="fit the step count to this time budget")
    parser.add_argument("--probe-steps", type=int, default=40, help="steps timed before fitting (default 40)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every recipe")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set or [])
    torch.backends.cudnn.benchmark = True
    try:
        results = train_side_by_side(args.recipes, args.out, overrides=overrides, steps=args.steps,
                                     seconds=args.seconds, probe_steps=args.probe_steps,
                                     log=lambda text: print(text, flush=True))
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in results.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
