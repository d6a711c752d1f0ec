"""Recipes trained side by side on one batch stream give what each gives alone (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
import yaml

from stereo_kd_core.checkpoint import load_checkpoint, save_checkpoint
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.train import RecipeError, load_recipe, run_training
from stereo_kd_core.train.side_by_side import FIT_MARGIN, fitted_steps, main, train_side_by_side

TINY_TEACHER = dict(default_config("acv-teacher", 32), stem_channels=8, layer_channels=[8, 8, 16, 16],
                    layer_blocks=[1, 1, 1, 1], groups=4, concat_channels=4, attention_channels=4,
                    aggregation_channels=8)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> list[dict]:
    """A supervised and a distillation recipe over the same batches, with different learning rates."""
    torch.manual_seed(0)
    teacher = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(teacher, build_model(TINY_TEACHER), TINY_TEACHER)
    supervised = load_recipe("tiny-dsnet", {"train.steps": 3})
    distill = load_recipe("tiny-distill-dsnet", {"train.steps": 3, "teacher.checkpoint": str(teacher),
                                                 "train.optimizer.lr": 3.0e-3})
    distill["data"] = supervised["data"]
    distill["train"]["batch_size"] = supervised["train"]["batch_size"]
    distill["train"]["seed"] = supervised["train"]["seed"]
    return [supervised, distill]


def test_side_by_side_gives_what_each_recipe_gives_alone(recipes, tmp_path):
    results = train_side_by_side(recipes, tmp_path / "together", log=lambda text: None)
    assert sorted(results) == ["run0", "run1"]
    for index, recipe in enumerate(recipes):
        alone = load_checkpoint(run_training(recipe, tmp_path / f"alone{index}"))["state_dict"]
        together = load_checkpoint(results[f"run{index}"])["state_dict"]
        assert results[f"run{index}"].name == "final.pt"
        for key, value in alone.items():
            assert torch.allclose(together[key].float(), value.float(), rtol=0, atol=1e-6), key
    # the two runs did learn differently (a test that could not tell them apart would pass anyway)
    first = load_checkpoint(results["run0"])["state_dict"]
    start = build_model(load_checkpoint(results["run0"])["config"]).state_dict()
    assert any(not torch.equal(first[key], start[key]) for key in start if start[key].is_floating_point())


def test_recipes_that_draw_other_batches_are_refused(recipes, tmp_path):
    other = {**recipes[1], "data": {**recipes[1]["data"], "crop": [32, 32]}}
    with pytest.raises(RecipeError, match="differs at data"):
        train_side_by_side([recipes[0], other], tmp_path, log=lambda text: None)
    seeded = {**recipes[1], "train": {**recipes[1]["train"], "seed": 5}}
    with pytest.raises(RecipeError, match="train.seed"):
        train_side_by_side([recipes[0], seeded], tmp_path, log=lambda text: None)


def test_fitted_steps_follow_the_probe_rate():
    # 30 steps in 10 s = 3 steps/s; 80 s left of 100 -> 40 + 0.92 * 240 = 260 steps
    assert fitted_steps(40, 20.0, 100.0, 10.0, 30, 10_000) == 40 + int(FIT_MARGIN * 240)
    assert fitted_steps(40, 20.0, 100.0, 10.0, 30, 100) == 100  # never beyond the recipe's steps
    assert fitted_steps(40, 150.0, 100.0, 10.0, 30, 10_000) == 40  # over budget: stop now


def test_a_spent_budget_ends_at_the_probe_and_records_the_steps(recipes, tmp_path):
    """With no time left after the probe the run ends there: final.pt, and recipe.yaml says how many
    steps its schedule spanned (so `stereo-kd train` of that recipe reproduces it)."""
    path = tmp_path / "supervised.yaml"
    path.write_text(yaml.safe_dump(recipes[0]))
    assert main([str(path), "--out", str(tmp_path / "out"), "--seconds", "1e-9", "--probe-steps", "2",
                 "--steps", "50"]) == 0
    run = tmp_path / "out" / "supervised"
    assert load_checkpoint(run / "final.pt")["step"] == 2
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["steps"] == 2
