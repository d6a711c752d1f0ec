"""Cached teacher outputs (one teacher pass per pair) and distillation from them; warm starts
and bf16 training on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stereo_kd_core.checkpoint import load_checkpoint, load_model, save_checkpoint
from stereo_kd_core.data import TrainingDataset, augment_sample, open_dataset
from stereo_kd_core.data.synthetic import write_middlebury_dataset
from stereo_kd_core.distill import frozen_layers
from stereo_kd_core.distill.losses import cached_distribution_kl_loss, disparity_kl_loss
from stereo_kd_core.distill.teacher_cache import (
    dense_probability,
    read_teacher_file,
    teacher_file,
)
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.train import RecipeError, Trainer, load_recipe
from stereo_kd_core.train.label_cache import cache_teacher

HEIGHT, WIDTH = 64, 128
TINY_STUDENT = dict(default_config("dsnet-fast", 32))


@pytest.fixture(scope="module")
def cached_folder(tmp_path_factory):
    """Three generated pairs with teacher outputs of a small project model."""
    root = tmp_path_factory.mktemp("kd")
    write_middlebury_dataset(root / "data", 3, seed=5, height=HEIGHT, width=WIDTH, max_disparity=32)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_model(TINY_STUDENT), TINY_STUDENT)
    assert cache_teacher(root / "teacher.pt", root / "data", top_k=4, progress=False) == 3
    return root


def test_dense_probability_round_trip_and_renormalisation():
    rng = np.random.default_rng(0)
    probability = rng.random((6, 3, 4)).astype(np.float32)
    probability /= probability.sum(0, keepdims=True)
    order = np.argsort(-probability, axis=0)
    top = np.take_along_axis(probability, order, 0)
    np.testing.assert_allclose(dense_probability(order.astype(np.uint8), top, 6), probability, atol=1e-6)
    # top-2 of a column (0.5, 0.3, 0.2) -> (0.625, 0.375, 0)
    index = np.array([[[0]], [[1]]], np.uint8)
    kept = np.array([[[0.5]], [[0.3]]], np.float16)
    np.testing.assert_allclose(dense_probability(index, kept, 3)[:, 0, 0], [0.625, 0.375, 0.0], atol=1e-3)


def test_cache_holds_the_teachers_outputs_and_resumes(cached_folder):
    assert cache_teacher(cached_folder / "teacher.pt", cached_folder / "data", progress=False) == 0
    dataset = open_dataset("middlebury", cached_folder / "data")
    case = dataset.cases[0]
    cached = read_teacher_file(teacher_file(case.left.parent))
    assert cached["disparity"].shape == (HEIGHT, WIDTH) and cached["disparity"].dtype == np.float16
    assert cached["cost_index"].shape == (4, HEIGHT // 8, WIDTH // 8) and int(cached["stride"]) == 8
    assert np.all(cached["cost_prob"].astype(np.float32).sum(0) <= 1.001)
    teacher = load_model(cached_folder / "teacher.pt")
    sample = dataset[0]

    def tensor(image):
        return torch.from_numpy(image.transpose(2, 0, 1).copy()).float().div(255)[None]

    with torch.no_grad(), frozen_layers(teacher):
        expected = teacher(tensor(sample["left"]), tensor(sample["right"]))["disp"][0].numpy()
    np.testing.assert_allclose(cached["disparity"].astype(np.float32), expected, atol=0.05, rtol=2e-3)


def test_cached_kl_matches_the_live_kl_and_vanishes_for_equal_distributions():
    torch.manual_seed(0)
    student = torch.randn(2, 12, 5, 7)
    teacher_logits = torch.randn(2, 24, 10, 14)
    teacher_prob = F.softmax(teacher_logits, dim=1)
    # the live loss resamples logits, the cached one probabilities: equal on the same grid
    same_grid = F.interpolate(teacher_logits, size=(5, 7), mode="bilinear", align_corners=False)
    live = disparity_kl_loss(student, same_grid)
    cached = cached_distribution_kl_loss(student, F.softmax(same_grid, dim=1))
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    assert float(cached_distribution_kl_loss(student, F.softmax(student, dim=1))) == pytest.approx(0.0, abs=1e-5)
    assert float(cached_distribution_kl_loss(student, teacher_prob)) > 0.01
    # columns without mass (padding) carry no target
    empty = torch.zeros_like(teacher_prob)
    assert float(cached_distribution_kl_loss(student, empty)) == 0.0


def test_crops_stay_on_the_teacher_cost_grid(cached_folder):
    dataset = open_dataset("teacher-cache", cached_folder / "data")
    sample = dataset[1]
    from stereo_kd_core.data import AugmentConfig

    for seed in range(5):
        out = augment_sample(sample, np.random.default_rng(seed), (32, 64), AugmentConfig(photometric=False,
                                                                                           occlusion_prob=0))
        assert out["teacher_prob"].shape[1:] == (4, 8)
        # find the window from the images, then check the teacher's maps were cut at the same place
        top, left = next((t, c) for t in range(HEIGHT - 31) for c in range(WIDTH - 63)
                         if np.array_equal(sample["left"][t:t + 32, c:c + 64], out["left"]))
        assert top % 8 == 0 and left % 8 == 0
        np.testing.assert_array_equal(out["teacher_prob"],
                                      sample["teacher_prob"][:, top // 8:top // 8 + 4, left // 8:left // 8 + 8])
        np.testing.assert_array_equal(out["teacher_disparity"],
                                      sample["teacher_disparity"][top:top + 32, left:left + 64])
    training = TrainingDataset(dataset, crop_size=(32, 64), max_disparity=192)
    item = training[0]
    assert item["teacher_prob"].shape == (32 // 8, 4, 8) and item["teacher_disparity"].shape == (32, 64)


def _cached_recipe(root, **distill) -> dict:
    return {
        "model": {"arch": "dsnet-fast", "max_disparity": 32},
        "teacher": {"cached": True},
        "data": {"train": {"name": "teacher-cache", "root": str(root / "data")}, "crop": [32, 64]},
        "train": {"steps": 2, "batch_size": 2, "optimizer": {"name": "adamw", "lr": 1e-3},
                  "schedule": {"name": "one_cycle"}, "log_every": 1, "amp": "bf16"},
        "distill": distill or {"cost": {}, "disparity": {}, "ground_truth": {}},
    }


def test_cached_distillation_trains_in_bf16_on_the_cpu(cached_folder, tmp_path):
    trainer = Trainer(_cached_recipe(cached_folder), tmp_path)
    assert trainer.autocast_dtype is torch.bfloat16
    final = trainer.run()
    assert load_checkpoint(final)["step"] == 2
    import csv

    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for term in ("cost", "disparity", "ground_truth"):
            assert np.isfinite(float(row[f"loss.{term}"])) and float(row[f"loss.{term}"]) > 0


def test_cached_distillation_gates_the_teacher_by_its_agreement_with_the_labels(cached_folder, tmp_path):
    recipe = _cached_recipe(cached_folder, cost={}, disparity={}, ground_truth={}, teacher_agreement_px=1.0)
    trainer = Trainer(recipe, tmp_path)
    assert trainer.objective.agreement_px == 1.0
    training = TrainingDataset(open_dataset("teacher-cache", cached_folder / "data"), crop_size=(32, 64),
                               max_disparity=192)
    batch = {k: torch.as_tensor(v).unsqueeze(0) for k, v in training[0].items() if k != "name"}
    agreeing = {**batch, "disparity": batch["teacher_disparity"].clone(),
                "valid": torch.ones_like(batch["valid"])}
    contradicted = {**agreeing, "disparity": agreeing["disparity"] + 5.0}
    with torch.no_grad():
        _, agree_logs = trainer.objective(agreeing, step=0)
        _, contradicted_logs = trainer.objective(contradicted, step=0)
    assert float(agree_logs["loss.cost"]) > 0 and float(contradicted_logs["loss.cost"]) == 0.0
    assert float(contradicted_logs["loss.disparity"]) == 0.0
    assert trainer.run().is_file()


def test_cached_distillation_refuses_live_only_points_and_uncached_data(cached_folder, tmp_path):
    with pytest.raises(ValueError, match="internal tensors"):
        Trainer(_cached_recipe(cached_folder, features={"stages": ["layer1"]}, disparity={}), tmp_path)
    recipe = _cached_recipe(cached_folder)
    recipe["data"]["train"] = {"name": "middlebury", "root": str(cached_folder / "data")}
    with pytest.raises(RecipeError, match="teacher-cache"):
        load_recipe(recipe)
    recipe = _cached_recipe(cached_folder)
    recipe["teacher"] = {"cached": True, "checkpoint": "x.pt"}
    with pytest.raises(RecipeError, match="either"):
        load_recipe(recipe)


def test_uncached_folder_is_a_clear_error(tmp_path):
    write_middlebury_dataset(tmp_path, 1, seed=1, height=32, width=64, max_disparity=16)
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        open_dataset("teacher-cache", tmp_path)


def test_init_from_warm_starts_the_student(cached_folder, tmp_path):
    recipe = _cached_recipe(cached_folder)
    recipe["train"]["init_from"] = str(cached_folder / "teacher.pt")  # a dsnet-fast checkpoint
    trainer = Trainer(recipe, tmp_path)
    expected = load_checkpoint(cached_folder / "teacher.pt")["state_dict"]
    for name, value in trainer.student.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    acv = dict(default_config("acv-teacher", 32), stem_channels=8, layer_channels=[8, 8, 16, 16],
               layer_blocks=[1, 1, 1, 1], groups=4, concat_channels=4, attention_channels=4,
               aggregation_channels=8)
    save_checkpoint(tmp_path / "acv.pt", build_model(acv), acv)
    recipe["train"]["init_from"] = str(tmp_path / "acv.pt")
    with pytest.raises(RecipeError, match="cannot start a dsnet-fast"):
        Trainer(recipe, tmp_path / "other")


def test_init_from_adds_a_refinement_as_the_identity(cached_folder, tmp_path):
    """A student with the refinement warm-starts from one trained without it: every trained key
    loads, the refinement starts as the identity, so the outputs are the checkpoint's."""
    recipe = _cached_recipe(cached_folder)
    recipe["model"]["refine_channels"] = 8
    recipe["train"]["init_from"] = str(cached_folder / "teacher.pt")  # a dsnet-fast checkpoint, no refinement
    # fp32: in bf16 this tiny random network's first steps can overflow the gradient norm and be
    # skipped (seen only after the whole core suite ran in one process), and then nothing moves
    recipe["train"]["amp"] = "none"
    trainer = Trainer(recipe, tmp_path)
    student = trainer.student.eval()
    plain = load_model(cached_folder / "teacher.pt")
    left, right = torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(student(left, right), plain(left, right), rtol=0, atol=0)
    assert trainer.run() is not None  # and it trains: the refinement's last layer moves
    trained = load_checkpoint(tmp_path / "final.pt")["state_dict"]["refinement.residual.weight"]
    assert trained.abs().sum() > 0
