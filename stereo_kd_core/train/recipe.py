"""Training recipes: YAML files that say everything about a run (model, data, optimizer,
schedule, losses, distillation). Loading fills defaults and rejects unknown keys by name, so a
typo never silently falls back to a default."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TEST_SPLIT_SEED = 2026  # the fixed synthetic test split: never trained on

ANY = None  # a leaf: any value
FREE = "free"  # a mapping whose keys are checked by its consumer (model args, dataset kwargs)

_WEIGHT = {"initial": ANY, "decay": ANY, "every": ANY}
SCHEMA: dict[str, Any] = {
    "model": FREE,
    "teacher": {"checkpoint": ANY, "cached": ANY},
    "data": {"train": FREE, "crop": ANY, "augment": FREE, "num_workers": ANY},
    "train": {
        "steps": ANY, "batch_size": ANY, "seed": ANY, "grad_clip": ANY, "amp": ANY,
        "checkpoint_every": ANY, "log_every": ANY, "max_nonfinite_steps": ANY, "init_from": ANY,
        "freeze_batchnorm": ANY,
        "optimizer": {"name": ANY, "lr": ANY, "weight_decay": ANY, "betas": ANY},
        "schedule": {"name": ANY, "pct_start": ANY, "milestones": ANY, "gamma": ANY},
    },
    "loss": {"kind": ANY, "output_weights": ANY},
    "distill": {
        "features": {"stages": ANY, "loss": ANY, "weight": _WEIGHT},
        "volume": {"student": ANY, "teacher": ANY, "loss": ANY, "weight": _WEIGHT},
        "cost": {"temperature": ANY, "weight": _WEIGHT},
        "disparity": {"weight": _WEIGHT},
        "ground_truth": {"weight": _WEIGHT},
        "weighting": ANY,
        "stages": ANY,
        "co_training": {"start_step": ANY, "lr": ANY},
        "teacher_agreement_px": ANY,
    },
    # `stereo-kd adapt` (stereo_kd_core/train/adapt.py checks the values)
    "adapt": {
        "every": ANY, "holdout": ANY, "min_confidence": ANY, "lr_check_px": ANY, "drop_worst": ANY,
        "photometric": ANY, "smoothness": ANY, "replay_synthetic": ANY, "internal": ANY,
        "evaluation": {"synthetic_n": ANY, "synthetic_height": ANY, "synthetic_width": ANY},
        "judge": {"criterion": ANY, "min_gain": ANY, "max_frames": ANY, "record_all": ANY, "guard": ANY,
                  "guard_tolerance": ANY},
        "agreement": ANY, "photometric_max_error": ANY, "teacher_precision": ANY, "internal_source": ANY,
    },
}
REQUIRED = ("model.arch", "data.train.name", "data.crop", "train.steps", "train.batch_size",
            "train.optimizer.name", "train.optimizer.lr", "train.schedule.name")
DEFAULTS: dict[str, Any] = {
    "model": {"max_disparity": 192},
    "data": {"augment": {}, "num_workers": 0},
    "train": {"seed": 0, "grad_clip": None, "amp": "none", "checkpoint_every": 1000, "init_from": None,
              "log_every": 10, "max_nonfinite_steps": 10, "freeze_batchnorm": False,
              "optimizer": {"weight_decay": 0.0, "betas": [0.9, 0.999]}},
    "loss": {"kind": "smooth_l1", "output_weights": [0.5, 0.7, 1.0]},
}
SCHEDULE_KEYS = {"one_cycle": {"pct_start"}, "multistep": {"milestones", "gamma"}}
OPTIMIZERS = ("adam", "adamw")
AMP_MODES = ("none", "bf16", "fp16", "auto")  # auto: trainer.resolve_amp


class RecipeError(ValueError):
    """A recipe has unknown, missing or invalid keys."""


ADAPT_INTERNAL_SOURCES = ("cache", "live")


def adapt_internal_source(adapt: Mapping) -> str:
    """Where adapt's internal points come from: `cache` (the default: the teacher's cost
    distributions cached with the labels) or `live` (the teacher runs every step)."""
    source = adapt.get("internal_source") or ADAPT_INTERNAL_SOURCES[0]
    if source not in ADAPT_INTERNAL_SOURCES:
        raise RecipeError(f"adapt.internal_source must be {' or '.join(ADAPT_INTERNAL_SOURCES)}, got {source!r}")
    return source


def _check_keys(recipe: Mapping, schema: Mapping, prefix: str = "") -> None:
    for key, value in recipe.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise RecipeError(f"unknown recipe key {path!r}; allowed here: {', '.join(sorted(schema))}")
        sub = schema[key]
        if isinstance(sub, Mapping):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise RecipeError(f"recipe key {path!r} must be a mapping, got {type(value).__name__}")
            _check_keys(value, sub, path + ".")
        elif sub == FREE and not isinstance(value, Mapping):
            raise RecipeError(f"recipe key {path!r} must be a mapping, got {type(value).__name__}")


def _merge_defaults(recipe: dict, defaults: Mapping) -> None:
    for key, value in defaults.items():
        if isinstance(value, Mapping):
            _merge_defaults(recipe.setdefault(key, {}), value)
        else:
            recipe.setdefault(key, copy.deepcopy(value))


def _get(recipe: Mapping, dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _parse_override(value: Any) -> Any:
    """Command-line values arrive as text: read them as YAML ("100" -> 100, "[1, 2]" -> list),
    and as floats where YAML 1.1 leaves "1e-4" a string."""
    if not isinstance(value, str):
        return value
    parsed = yaml.safe_load(value) if value.strip() else value
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def apply_overrides(recipe: dict, overrides: Mapping[str, Any]) -> dict:
    """Set dotted keys, e.g. {"train.steps": 100, "data.train.n": "8"}, creating mappings;
    text values are parsed as YAML."""
    for dotted, value in overrides.items():
        value = _parse_override(value)
        parts = dotted.split(".")
        node = recipe
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {dotted!r}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return recipe


def validate_recipe(recipe: Mapping) -> None:
    """Raise RecipeError naming the first unknown, missing or invalid key."""
    _check_keys(recipe, SCHEMA)
    for dotted in REQUIRED:
        try:
            _get(recipe, dotted)
        except KeyError:
            raise RecipeError(f"recipe is missing required key {dotted!r}") from None
    train = recipe["train"]
    schedule = train["schedule"]
    if schedule["name"] not in SCHEDULE_KEYS:
        raise RecipeError(f"train.schedule.name {schedule['name']!r}; known: {', '.join(SCHEDULE_KEYS)}")
    extra = set(schedule) - {"name"} - SCHEDULE_KEYS[schedule["name"]]
    if extra:
        raise RecipeError(f"train.schedule: keys {sorted(extra)} do not apply to {schedule['name']!r}")
    if schedule["name"] == "multistep" and not {"milestones", "gamma"} <= set(schedule):
        raise RecipeError("train.schedule: multistep needs milestones and gamma")
    if train["optimizer"]["name"] not in OPTIMIZERS:
        raise RecipeError(f"train.optimizer.name {train['optimizer']['name']!r}; known: {', '.join(OPTIMIZERS)}")
    if train["amp"] not in AMP_MODES:
        raise RecipeError(f"train.amp {train['amp']!r}; known: {', '.join(AMP_MODES)}")
    for key in ("steps", "batch_size", "checkpoint_every", "log_every", "max_nonfinite_steps"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise RecipeError(f"train.{key} must be a positive integer, got {train[key]!r}")
    crop = recipe["data"]["crop"]
    if not (isinstance(crop, list | tuple) and len(crop) == 2 and all(isinstance(c, int) and c > 0 for c in crop)):
        raise RecipeError(f"data.crop must be [height, width] in pixels, got {crop!r}")
    dataset = recipe["data"]["train"]
    if dataset["name"] == "synthetic" and dataset.get("seed") == TEST_SPLIT_SEED:
        raise RecipeError(f"data.train.seed {TEST_SPLIT_SEED} is the synthetic test split: "
                          "train on another seed")
    if ("teacher" in recipe) != ("distill" in recipe):
        raise RecipeError("a distillation recipe needs both 'teacher' and 'distill'; "
                          "a supervised recipe neither")
    teacher = recipe.get("teacher") or {}
    if "teacher" in recipe and ("checkpoint" in teacher) == bool(teacher.get("cached")):
        raise RecipeError("teacher: give either 'checkpoint' (a live teacher) or 'cached: true' "
                          "(teacher outputs stored beside the data, data.train.name: teacher-cache)")
    if teacher.get("cached") and dataset["name"] != "teacher-cache":
        raise RecipeError(f"teacher.cached needs data.train.name 'teacher-cache', got {dataset['name']!r}")


def load_recipe(source: Mapping | str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """A validated recipe with defaults filled in.

    source: a mapping, a YAML path, or the name of a shipped recipe ("dsnet", "distill-dsnet").
    """
    if isinstance(source, Mapping):
        recipe = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            shipped = RECIPES_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
            if not shipped.is_file():
                known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
                raise RecipeError(f"recipe {str(source)!r} is neither a file nor a shipped recipe; "
                                  f"shipped: {', '.join(known)}")
            path = shipped
        with open(path) as f:
            recipe = yaml.safe_load(f)
        if not isinstance(recipe, dict):
            raise RecipeError(f"recipe {path} is not a YAML mapping")
    if overrides:
        apply_overrides(recipe, overrides)
    _check_keys(recipe, SCHEMA)
    _merge_defaults(recipe, DEFAULTS)
    validate_recipe(recipe)
    return recipe
