"""adapt's internal points from a cache: the teacher's cost distribution stored with its labels
(`LabelCache(costs=True)`), emptied where the label's evidence fails, mixed in batches with
replayed generated pairs (`collate_mixed`), and the batch-norm freeze for few-frame fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_adapt import FAST, MAX_DISPARITY, TINY_ARGS, synthetic_folder, tiny_checkpoint

from stereo_kd_core import StereoEstimator
from stereo_kd_core.data.mixed import collate_mixed
from stereo_kd_core.data.recordings import open_recordings
from stereo_kd_core.data.synthetic import write_middlebury_dataset
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.train.adapt import run_adapt
from stereo_kd_core.train.label_cache import AdaptFrames, EstimatorTeacher, LabelCache
from stereo_kd_core.train.trainer import freeze_batchnorm

ODD_HEIGHT, ODD_WIDTH = 40, 72  # not multiples of 32: the teacher pass pads, the padding gets no target


def odd_frames(root, n: int):
    write_middlebury_dataset(root / "frames", n, seed=5, height=ODD_HEIGHT, width=ODD_WIDTH,
                             max_disparity=MAX_DISPARITY, kind="planes")
    return open_recordings([root / "frames"], root / "out")[0]


def network_teacher(path) -> EstimatorTeacher:
    estimator = StereoEstimator.load(tiny_checkpoint(path, seed=1), device="cpu", precision="fp32")
    return EstimatorTeacher(estimator, {"teacher": str(path)}, lr_check_px=1.0)


def test_cost_cache_is_written_with_the_labels_and_empty_where_the_label_or_the_frame_is_not(tmp_path):
    frames = odd_frames(tmp_path, 2)
    teacher = network_teacher(tmp_path / "teacher.pt")
    cache = LabelCache(tmp_path / "out", teacher, costs=True)
    cache.fill(frames)
    assert cache.computed == 2 and all(cache.cost_path(f).is_file() for f in frames)
    confident = np.ones((ODD_HEIGHT, ODD_WIDTH), bool)
    confident[:, :36] = False  # the left half has no trusted label
    prob, stride = cache.cost_targets(frames[0], confident)
    assert stride == 4 and prob.shape == (MAX_DISPARITY // 4, 64 // 4, 96 // 4)  # the padded frame's grid
    mass = prob.sum(axis=0)
    assert (mass[:, :9] == 0).all()                       # cells over untrusted labels: no target
    assert (mass[ODD_HEIGHT // 4:] == 0).all() and (mass[:, ODD_WIDTH // 4:] == 0).all()  # padding
    np.testing.assert_allclose(mass[:ODD_HEIGHT // 4, 9:ODD_WIDTH // 4], 1.0, atol=1e-3)
    # a second fill runs nothing; a cache made without costs gets them added, labels kept
    again = LabelCache(tmp_path / "out", teacher, costs=True)
    again.fill(frames)
    assert again.computed == 0
    cache.cost_path(frames[1]).unlink()
    label_before = cache.read(frames[1])[0]
    again.fill(frames)
    assert again.computed == 1 and cache.cost_path(frames[1]).is_file()
    np.testing.assert_array_equal(cache.read(frames[1])[0], label_before)
    sample = AdaptFrames(frames, cache, min_confidence=0.0)[0]
    assert sample["teacher_prob"].shape == prob.shape and sample["teacher_stride"] == 4
    np.testing.assert_array_equal(sample["teacher_disparity"], sample["disparity"])


def test_labels_and_costs_come_from_one_teacher_pass(tmp_path):
    """With costs, each frame costs the teacher two passes (the pair and the left-right check's
    mirrored pair), not three: the label and its cost distribution come from the same forward,
    equal to what the separate label and training-mode cost passes gave."""
    from stereo_kd_core.distill.objective import frozen_layers
    from stereo_kd_core.distill.teacher_cache import teacher_targets

    frames = odd_frames(tmp_path, 2)
    teacher = network_teacher(tmp_path / "teacher.pt")
    passes = []
    # both views per pass; the estimator predicts with its BatchNorm-folded copy of teacher.network
    teacher.estimator.inference_network.features.register_forward_hook(lambda *_: passes.append(1))
    cache = LabelCache(tmp_path / "out", teacher, costs=True)
    cache.fill(frames)
    assert len(passes) == 2 * len(frames)
    sample = frames[0].sample()
    disparity, confidence = teacher.label(frames[0], sample["left"], sample["right"])
    cached_disparity, cached_confidence = cache.read(frames[0])
    np.testing.assert_allclose(cached_disparity, disparity, atol=0.05, equal_nan=True)  # float16 in the file
    np.testing.assert_allclose(cached_confidence, np.clip(confidence, 0, 1), atol=1e-3)
    cached = np.load(cache.cost_path(frames[0]))
    rows, cols = -(-ODD_HEIGHT // 4), -(-ODD_WIDTH // 4)
    assert cached["cost_prob"].shape == (8, 64 // 4, 96 // 4)  # the grid of the frame padded to 32
    assert (cached["cost_prob"][:, rows:] == 0).all() and (cached["cost_prob"][:, :, cols:] == 0).all()
    # where no padding enters (sides multiples of 32), the same distribution as the training-mode pass
    left, right = (np.ascontiguousarray(np.pad(v, ((0, 24), (0, 24), (0, 0)), mode="reflect"))
                   for v in (sample["left"], sample["right"]))  # 64 x 96
    with frozen_layers(teacher.network):  # the separate pass the cache used to make
        expected = teacher_targets(teacher.network, left, right)
    got = teacher.costs(left, right)
    assert int(got["stride"]) == 4 and int(got["levels"]) == MAX_DISPARITY // 4
    np.testing.assert_allclose(got["cost_prob"].astype(np.float32), expected["cost_prob"].astype(np.float32),
                               atol=1e-3)


def test_collate_gives_samples_without_cached_costs_empty_targets():
    with_costs = {"left": torch.zeros(3, 8, 8), "teacher_points": torch.tensor(True),
                  "teacher_prob": torch.full((4, 2, 2), 0.25), "teacher_disparity": torch.ones(8, 8)}
    replay = {"left": torch.ones(3, 8, 8), "teacher_points": torch.tensor(True)}
    batch = collate_mixed([with_costs, replay])
    assert batch["teacher_prob"].shape == (2, 4, 2, 2)
    assert (batch["teacher_prob"][0] == 0.25).all() and (batch["teacher_prob"][1] == 0).all()
    assert torch.isnan(batch["teacher_disparity"][1]).all() and (batch["teacher_disparity"][0] == 1).all()
    assert batch["teacher_points"].tolist() == [True, False]
    plain = collate_mixed([replay, replay])  # nothing cached: untouched
    assert "teacher_prob" not in plain and plain["teacher_points"].tolist() == [True, True]


def test_adapt_trains_the_cost_point_from_the_cache_with_replay_by_default(tmp_path):
    odd_frames(tmp_path, 3)
    report = run_adapt([tmp_path / "frames"], tmp_path / "run", teacher=tiny_checkpoint(tmp_path / "t.pt", seed=1),
                       init=tiny_checkpoint(tmp_path / "init.pt"), device="cpu",
                       overrides={**FAST, "train.steps": 4, "adapt.holdout": 0.0, "adapt.min_confidence": 0.0,
                                  "adapt.replay_synthetic": 0.5, "adapt.agreement": "none"})
    assert report["internal_distillation"] == "cache" and report["labels_computed"] == 3  # the recipe's default
    assert len(list((tmp_path / "run" / "labels").rglob("*.cost.npz"))) == 3
    with open(tmp_path / "run" / "log.csv") as f:
        rows = [line.strip().split(",") for line in f]
    cost = [float(row[rows[0].index("loss.cost")]) for row in rows[1:]]
    assert len(cost) == 4 and all(np.isfinite(cost)) and max(cost) > 0


def test_frozen_batchnorm_keeps_the_running_statistics_while_weights_train():
    torch.manual_seed(0)
    network = build_model(dict(default_config("dsnet", MAX_DISPARITY), **TINY_ARGS)).train()
    layers = freeze_batchnorm(network)
    assert layers > 0
    before = {k: v.clone() for k, v in network.state_dict().items() if "running_mean" in k}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    out = network(torch.rand(2, 3, 64, 128), torch.rand(2, 3, 64, 128))
    out["disp"].mean().backward()
    optimizer.step()
    after = network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert network.training  # the network still returns its training outputs
    unfrozen = build_model(dict(default_config("dsnet", MAX_DISPARITY), **TINY_ARGS)).train()
    stats = {k: v.clone() for k, v in unfrozen.state_dict().items() if "running_mean" in k}
    unfrozen(torch.rand(2, 3, 64, 128), torch.rand(2, 3, 64, 128))
    assert any(not torch.equal(stats[k], unfrozen.state_dict()[k]) for k in stats)


def test_a_teacher_without_cost_volumes_adapts_on_its_labels_alone(tmp_path):
    synthetic_folder(tmp_path, 2)
    report = run_adapt([tmp_path / "frames"], tmp_path / "run", teacher=f"labels:{tmp_path / 'labels'}",
                       init=tiny_checkpoint(tmp_path / "init.pt"), device="cpu",
                       overrides={**FAST, "train.steps": 2, "adapt.holdout": 0.0})
    assert report["internal_distillation"] is None and "no cost volumes" in report["internal_note"]
    assert not list((tmp_path / "run" / "labels").rglob("*.cost.npz"))


def test_internal_source_defaults_to_the_cache_and_rejects_anything_else():
    from stereo_kd_core.train.recipe import RecipeError, adapt_internal_source, load_recipe

    adapt = load_recipe("adapt")["adapt"]
    assert adapt_internal_source(adapt) == "cache"
    assert adapt_internal_source({k: v for k, v in adapt.items() if k != "internal_source"}) == "cache"
    assert adapt_internal_source({**adapt, "internal_source": "live"}) == "live"
    with pytest.raises(RecipeError, match="cache or live"):
        adapt_internal_source({**adapt, "internal_source": "teacher"})
