"""One objective for every source of teaching signal: a batch may mix ground-truth samples and
pseudo-labelled ones; each pixel's target counts by its weight (0: not at all), the teacher's
points count only on the samples that have them, and the trainer steps on such a mixed batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from stereo_kd_core.data import MixedDataset, TrainingDataset
from stereo_kd_core.data.synthetic import SyntheticStereoDataset
from stereo_kd_core.distill import SOURCE_GROUND_TRUTH, SOURCE_PSEUDO_LABEL, TrainingObjective, frozen_layers
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.train import Trainer, load_recipe

H, W = 8, 16


class PixelStudent(nn.Module):
    """A 'network' whose one output is a learnable disparity map, so the loss gradient of every
    output pixel can be read directly."""

    num_outputs, max_disparity, num_costs, stride, feature_stages = 1, 32, 0, 4, ()

    def __init__(self, batch: int, value: float) -> None:
        super().__init__()
        self.disparity = nn.Parameter(torch.full((batch, H, W), value))

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"disp.0": self.disparity, "disp": self.disparity}


def mixed_batch() -> dict[str, torch.Tensor]:
    """Sample 0: ground truth 3 px, weight 1. Sample 1: a pseudo-label, 3 px with confidence 0.5
    on the right half, and a wild 30 px with weight 0 on the left half."""
    target = torch.full((2, H, W), 3.0)
    target[1, :, : W // 2] = 30.0
    weight = torch.ones(2, H, W)
    weight[1, :, : W // 2] = 0.0
    weight[1, :, W // 2:] = 0.5
    return {"left": torch.zeros(2, 3, H, W), "right": torch.zeros(2, 3, H, W), "disparity": target,
            "valid": weight > 0, "weight": weight, "source": torch.tensor([SOURCE_GROUND_TRUTH, SOURCE_PSEUDO_LABEL])}


def test_the_label_loss_weighs_each_pixel_and_weight_zero_has_no_gradient():
    student = PixelStudent(2, 5.0)  # 2 px off wherever the target is 3 px
    objective = TrainingObjective(student, fixed={"labels": 1.0})
    loss, logs = objective(mixed_batch(), step=0)
    # every counted pixel is 2 px off: smooth L1 = 2 - 0.5, whatever the weights
    assert loss.item() == pytest.approx(1.5) and float(logs["loss.labels"]) == pytest.approx(1.5)
    loss.backward()
    grad = student.disparity.grad
    total_weight = H * W * 1.0 + H * (W // 2) * 0.5
    assert torch.all(grad[1, :, : W // 2] == 0)  # the 30 px pseudo-labels: no effect at all
    torch.testing.assert_close(grad[0], torch.full((H, W), 1.0 / total_weight))
    torch.testing.assert_close(grad[1, :, W // 2:], torch.full((H, W // 2), 0.5 / total_weight))
    # without the weights the wild labels would dominate
    unweighted = {k: v for k, v in mixed_batch().items() if k != "weight"}
    unweighted["valid"] = torch.ones(2, H, W, dtype=torch.bool)
    assert objective(unweighted, step=0)[0].item() > 5.0


def test_photometric_and_dropped_pseudo_labels_touch_only_pseudo_labelled_samples():
    student = PixelStudent(2, 5.0)
    batch = mixed_batch()
    batch["disparity"][1, :, W // 2:] = torch.linspace(3.0, 4.8, W // 2)  # residuals 2 .. 0.2 px
    batch["disparity"][0, 0, 0] = 25.0  # a ground-truth outlier is never dropped
    objective = TrainingObjective(student, fixed={"labels": 1.0}, drop_worst=0.5)
    objective(batch, step=0)[0].backward()
    grad = student.disparity.grad
    assert grad[0, 0, 0] != 0  # ground truth: kept
    worst = batch["disparity"][1, :, W // 2:] < 3.9  # the larger residual half of the pseudo-labels
    assert torch.all(grad[1, :, W // 2:][worst] == 0) and torch.all(grad[1, :, W // 2:][~worst] != 0)
    # photometric self-supervision looks at sample 1 only: sample 0's images cannot change it
    photometric = TrainingObjective(PixelStudent(2, 5.0), fixed={"labels": 1.0, "photometric": 1.0})
    textured = {**batch, "left": torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))}
    textured["right"] = textured["left"].roll(-2, dims=-1)
    first = photometric(textured, step=0)[1]["loss.photometric"]
    textured["left"][0], textured["right"][0] = 1.0, 0.0
    assert float(photometric(textured, step=0)[1]["loss.photometric"]) == pytest.approx(float(first))


TINY = dict(stem_channels=8, layer_channels=[8, 8, 8, 8], layer_blocks=[1, 1, 1, 1], groups=2,
            concat_channels=4, attention_channels=4, aggregation_channels=4, mask_channels=8)


def test_the_teachers_points_count_only_on_the_samples_that_have_them():
    torch.manual_seed(0)
    student = build_model(dict(default_config("dsnet", 32), **TINY))
    teacher = build_model(dict(default_config("dsnet", 32), **TINY))  # other weights: it disagrees
    objective = TrainingObjective(student, {"cost": {}, "disparity": {}}, teacher)
    images = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    batch = {"left": images, "right": images.roll(-3, dims=-1), "disparity": torch.full((2, 32, 64), 3.0),
             "valid": torch.ones(2, 32, 64, dtype=torch.bool), "teacher_points": torch.tensor([True, False])}
    with torch.no_grad(), frozen_layers(student):  # BN on running statistics: samples do not interact
        _, both = objective(batch, step=0)
        _, first = objective({k: v[:1] for k, v in batch.items()}, step=0)
        batch["right"][1] = 0.0  # what the teacher would say about sample 1 changes; it must not count
        _, changed = objective(batch, step=0)
    for term in ("cost", "disparity"):
        assert float(first[f"loss.{term}"]) > 1e-3
        assert float(both[f"loss.{term}"]) == pytest.approx(float(first[f"loss.{term}"]), rel=1e-5)
        assert float(changed[f"loss.{term}"]) == pytest.approx(float(first[f"loss.{term}"]), rel=1e-5)


class PseudoLabelled(Dataset):
    """Generated pairs standing in for real ones: their disparity given as a pseudo-label with a
    confidence of 0 on the left half of the image and 0.8 elsewhere."""

    def __init__(self) -> None:
        self.pairs = SyntheticStereoDataset(2, seed=31, height=32, width=64, max_disparity=32, kind="planes")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        sample = self.pairs[index]
        confidence = np.full(sample["disparity"].shape, 0.8, np.float32)
        confidence[:, :32] = 0.0
        return {"left": sample["left"], "right": sample["right"], "disparity": sample["disparity"],
                "confidence": confidence, "source": SOURCE_PSEUDO_LABEL, "name": sample["name"]}


def test_the_trainer_steps_on_a_batch_mixing_ground_truth_and_pseudo_labels(tmp_path):
    recipe = load_recipe("tiny-dsnet", {"train.batch_size": 4})
    ground_truth = TrainingDataset(SyntheticStereoDataset(2, seed=32, height=32, width=64, max_disparity=32,
                                                          kind="planes"), crop_size=(32, 64), max_disparity=32,
                                   teacher_points=False)  # a teacher, were there one, would not teach these
    pseudo = TrainingDataset(PseudoLabelled(), crop_size=(32, 64), max_disparity=32)
    mixed = MixedDataset(pseudo, ground_truth, 0.5)
    assert len(mixed) == 4
    batch = default_collate([mixed[i] for i in range(4)])
    assert batch["source"].tolist() == [SOURCE_PSEUDO_LABEL] * 2 + [SOURCE_GROUND_TRUTH] * 2
    assert batch["teacher_points"].tolist() == [True, True, False, False]
    assert torch.all(batch["weight"][:2, :, :32] == 0) and not batch["valid"][:2, :, :32].any()
    torch.testing.assert_close(batch["weight"][:2, :, 32:][batch["valid"][:2, :, 32:]], torch.tensor(0.8).expand(
        int(batch["valid"][:2, :, 32:].sum())))
    assert torch.all(batch["weight"][2:][batch["valid"][2:]] == 1.0)

    trainer = Trainer(recipe, tmp_path, dataset=mixed)
    before = copy.deepcopy(trainer.student.state_dict())
    record = trainer.train_step(0, batch)
    assert record["skipped"] == 0 and np.isfinite(record["loss"]) and record["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
    # what the zero-confidence half of the pseudo-labels says does not change the loss at all
    with torch.no_grad(), frozen_layers(trainer.student):
        loss = trainer.objective(batch, step=0)[0]
        batch["disparity"][:2, :, :32] = 31.0
        assert trainer.objective(batch, step=0)[0].item() == loss.item()
