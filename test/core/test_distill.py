"""Distillation losses, adapters, weighting and the Distiller (tiny models, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from stereo_kd_core.distill import (
    ChannelAdapter,
    Distiller,
    LossWeighting,
    ProgressiveStages,
    StepDecay,
    UncertaintyWeighting,
    cosine_feature_loss,
    disparity_kl_loss,
    frozen_layers,
    ground_truth_loss,
    hint_loss,
    pool_mask,
    resample_feature,
    resample_volume,
    teacher_agreement_mask,
    teacher_disparity_loss,
)
from stereo_kd_core.models import build_model, default_config

MAX_DISPARITY = 32
TINY_TEACHER = dict(default_config("acv-teacher", MAX_DISPARITY), stem_channels=8,
                    layer_channels=[8, 8, 16, 16], layer_blocks=[1, 1, 1, 1], groups=4,
                    concat_channels=4, attention_channels=4, aggregation_channels=8)
TINY_STUDENT_ARGS = dict(stem_channels=8, layer_channels=[8, 8, 8, 8], layer_blocks=[1, 1, 1, 1],
                         groups=2, concat_channels=4, attention_channels=4, aggregation_channels=4,
                         mask_channels=8)
ALL_POINTS = {
    "features": {"stages": ["stem", "layer1", "layer2", "layer3", "layer4"], "loss": "cosine"},
    "volume": {"loss": "mse"},
    "cost": {"temperature": 2.0},
    "disparity": {},
    "ground_truth": {},
}


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "acv-teacher":
        return build_model(TINY_TEACHER)
    return build_model(dict(default_config(arch, MAX_DISPARITY), **TINY_STUDENT_ARGS))


def fixed_batch(batch_size: int = 2) -> dict[str, torch.Tensor]:
    """A textured pair whose right view is the left shifted by 3 px (disparity 3 everywhere)."""
    generator = torch.Generator().manual_seed(5)
    wide = torch.rand(batch_size, 3, 32, 67, generator=generator)
    left, right = wide[..., 3:], wide[..., :64]
    disparity = torch.full((batch_size, 32, 64), 3.0)
    return {"left": left, "right": right, "disparity": disparity,
            "valid": torch.ones(batch_size, 32, 64, dtype=torch.bool)}


# --- losses on hand-made tensors --------------------------------------------------------
def test_cosine_loss_analytic_value():
    student = torch.zeros(1, 2, 1, 3)
    teacher = torch.zeros(1, 2, 1, 3)
    student[0, :, 0, 0], teacher[0, :, 0, 0] = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # 45 deg
    student[0, :, 0, 1], teacher[0, :, 0, 1] = torch.tensor([0.0, 2.0]), torch.tensor([3.0, 0.0])  # 90 deg
    student[0, :, 0, 2], teacher[0, :, 0, 2] = torch.tensor([1.0, 1.0]), torch.tensor([-2.0, -2.0])  # 180
    expected = ((1 - 1 / math.sqrt(2)) + 1.0 + 2.0) / 3
    assert cosine_feature_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([[[True, False, False]]])
    assert cosine_feature_loss(student, teacher, mask).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    # scale invariance: the loss looks at direction only
    assert cosine_feature_loss(5 * student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_hint_losses_analytic_values():
    student = torch.tensor([0.0, 0.5, 3.0]).view(1, 1, 1, 3)
    teacher = torch.zeros(1, 1, 1, 3)
    assert hint_loss(student, teacher, "mse").item() == pytest.approx((0 + 0.25 + 9) / 3)
    # smooth L1 (beta 1): 0.5 x^2 below 1, |x| - 0.5 above
    assert hint_loss(student, teacher, "smooth_l1").item() == pytest.approx((0 + 0.125 + 2.5) / 3)
    with pytest.raises(ValueError, match="unknown hint loss 'l3'"):
        hint_loss(student, teacher, "l3")


def test_kl_two_level_analytic_value_and_temperature():
    teacher = torch.zeros(1, 2, 1, 1)  # uniform (1/2, 1/2)
    student = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)  # (3/4, 1/4)
    assert disparity_kl_loss(student, teacher).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # T = 2 halves the logits: student (sqrt3, 1)/(sqrt3 + 1); scaled by T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p)))
    assert disparity_kl_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_equal_costs_and_non_negative_otherwise():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 4, 6, generator=generator) * 3
    assert disparity_kl_loss(teacher.clone(), teacher, temperature=1.5).item() == pytest.approx(0.0, abs=1e-6)
    for _ in range(5):
        student = torch.randn(2, 8, 4, 6, generator=generator) * 3
        assert disparity_kl_loss(student, teacher).item() > 0
        pixelwise_mask = torch.rand(2, 4, 6, generator=generator) > 0.5
        assert disparity_kl_loss(student, teacher, mask=pixelwise_mask).item() >= 0


def test_kl_resamples_teacher_costs_to_the_student_grid():
    # a teacher that peaks sharply at level 2 (disparity 8 at stride 4) on a 1/4 grid ...
    teacher = torch.full((1, 8, 4, 8), -20.0)
    teacher[:, 2] = 20.0
    # ... equals, on the 1/8 grid with 4 levels, a student peaking at level 1 (disparity 8)
    student = torch.full((1, 4, 2, 4), -20.0)
    student[:, 1] = 20.0
    assert disparity_kl_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    wrong = torch.roll(student, 1, dims=1)
    assert disparity_kl_loss(wrong, teacher).item() > 10


def test_resample_volume_disparity_axis_is_origin_aligned():
    levels = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 2, 2)
    resampled = resample_volume(levels, (4, 2, 2))
    assert resampled[0, 0, :, 0, 0].tolist() == pytest.approx([0.0, 2.0, 4.0, 6.0], abs=1e-5)
    ramp = torch.arange(4.0).view(1, 1, 1, 1, 4).expand(1, 1, 2, 2, 4)
    # spatial axes are pixel-centre aligned: halving averages neighbouring columns
    assert resample_volume(ramp, (2, 2, 2))[0, 0, 0, 0].tolist() == pytest.approx([0.5, 2.5], abs=1e-5)
    assert resample_volume(levels, (8, 2, 2)) is levels
    feature = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 2, 2, 4)
    assert resample_feature(feature, (1, 2))[0, 0, 0].tolist() == [0.5, 2.5]


def test_teacher_disparity_loss_ignores_invalid_teacher_pixels():
    student = torch.tensor([[[1.0, 2.0, 5.0, 0.0, 7.0]]])
    teacher = torch.tensor([[[1.5, 4.0, float("nan"), -1.0, 40.0]]])  # only the first two valid
    expected = (0.5 * 0.5**2 + (2.0 - 0.5)) / 2
    assert teacher_disparity_loss(student, teacher, max_disparity=32).item() == pytest.approx(expected)
    assert teacher_disparity_loss(teacher.nan_to_num(), teacher.nan_to_num(), 32).item() == 0.0


def test_teacher_agreement_keeps_agreeing_or_unlabelled_pixels_only():
    teacher = torch.tensor([[[3.0, 3.9, 5.5, float("nan"), 9.0, 1.0]]])
    label = torch.tensor([[[3.5, 3.0, 3.0, 4.0, float("nan"), 7.0]]])
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    # within 1 px | 0.9 px | 2.5 px off | no teacher | label not finite | not labelled
    assert teacher_agreement_mask(teacher, label, valid, 1.0).tolist() == [[[True, True, False, False, True, True]]]
    assert teacher_agreement_mask(teacher, label, valid, 0.5).tolist() == [[[True, False, False, False, True, True]]]
    # the disparity point counts only those pixels
    student = torch.tensor([[[4.0, 3.9, 0.0, 4.0, 9.0, 3.0]]])
    mask = teacher_agreement_mask(teacher, label, valid, 1.0)
    expected = (0.5 * 1.0**2 + 0.0 + 0.0 + (2.0 - 0.5)) / 4  # pixels 0, 1, 4, 5 (smooth L1)
    assert teacher_disparity_loss(student, teacher, 32, mask).item() == pytest.approx(expected)


def test_pool_mask_drops_every_coarse_cell_with_a_rejected_pixel():
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, 3, 1] = False
    assert pool_mask(mask, (2, 3)).tolist() == [[[True, True, True], [False, True, True]]]
    assert pool_mask(mask, (4, 6)) is mask and pool_mask(None, (2, 3)) is None


def test_agreement_gate_silences_a_teacher_that_contradicts_the_labels():
    """distill.teacher_agreement_px: with the labels moved 5 px from what the teacher says, its
    cost and disparity points count nowhere; with the labels unmoved they count as without it."""
    batch = fixed_batch()
    student, teacher = tiny("dsnet-fast"), tiny("acv-teacher")
    points = {"cost": {}, "disparity": {}, "ground_truth": {}}
    open_gate = Distiller(student, teacher, points)
    gated = Distiller(student, teacher, {**points, "teacher_agreement_px": 1.0})
    with torch.no_grad():
        said = gated.teacher_outputs(batch["left"], batch["right"], step=0)["disp"]
        _, logs = open_gate({**batch, "disparity": said}, step=0)
        _, agreeing = gated({**batch, "disparity": said}, step=0)
        _, contradicted = gated({**batch, "disparity": said + 5.0}, step=0)
    for term in ("cost", "disparity"):
        assert float(agreeing[f"loss.{term}"]) == pytest.approx(float(logs[f"loss.{term}"]), rel=1e-5)
        assert float(logs[f"loss.{term}"]) > 0 and float(contradicted[f"loss.{term}"]) == 0.0
    assert float(contradicted["loss.ground_truth"]) > 0
    for bad in (0, -1.0, "one", True):
        with pytest.raises(ValueError, match="teacher_agreement_px"):
            Distiller(student, teacher, {**points, "teacher_agreement_px": bad})


def test_ground_truth_loss_weights_align_to_the_last_outputs():
    gt = torch.full((1, 2, 2), 10.0)
    valid = torch.tensor([[[True, True], [True, False]]])
    coarse, final = gt + 3.0, gt + 0.5
    final[0, 1, 1] = 1000.0  # invalid pixel: ignored
    # two outputs take the last two weights (0.7, 1.0)
    expected = 0.7 * (3.0 - 0.5) + 1.0 * (0.5 * 0.25)
    assert ground_truth_loss([coarse, final], gt, valid).item() == pytest.approx(expected)
    expected_log = 0.5 * math.log1p(3.0) + 0.7 * math.log1p(3.0) + 1.0 * math.log1p(0.5)
    assert ground_truth_loss([coarse, coarse, final], gt, valid, kind="log_l1").item() == pytest.approx(expected_log)
    with pytest.raises(ValueError, match="unknown ground-truth loss"):
        ground_truth_loss([final], gt, valid, kind="l2")


# --- adapters ----------------------------------------------------------------------------
def test_adapters_are_identity_or_one_by_one_convolutions():
    assert isinstance(ChannelAdapter(8, 8, volumetric=False).project, torch.nn.Identity)
    features = ChannelAdapter(8, 16, volumetric=False)
    assert features(torch.zeros(2, 8, 5, 7)).shape == (2, 16, 5, 7)
    assert features.project.kernel_size == (1, 1)
    volume = ChannelAdapter(2, 4, volumetric=True)
    assert volume(torch.zeros(1, 2, 3, 5, 7)).shape == (1, 4, 3, 5, 7)
    assert volume.project.kernel_size == (1, 1, 1)


# --- weighting ---------------------------------------------------------------------------
def test_step_decay_schedule():
    schedule = StepDecay(initial=2.0, decay=0.5, every=10)
    assert [schedule(s) for s in (0, 9, 10, 19, 20, 35)] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.25]
    assert StepDecay()(12345) == 1.0
    with pytest.raises(ValueError):
        StepDecay(decay=1.5)


def test_progressive_stages():
    stages = ProgressiveStages([{"until_step": 5, "terms": ["features"]},
                                {"until_step": 10, "terms": ["features", "cost"]},
                                {"until_step": None, "terms": ["cost"]}])
    assert stages.enabled(0) == {"features"} and stages.enabled(4) == {"features"}
    assert stages.enabled(5) == {"features", "cost"}
    assert stages.enabled(10) == {"cost"} and stages.enabled(10**6) == {"cost"}
    with pytest.raises(ValueError, match="does not increase"):
        ProgressiveStages([{"until_step": 5, "terms": []}, {"until_step": 5, "terms": []}])
    weighting = LossWeighting({"features": StepDecay(), "cost": StepDecay(0.5)}, stages=stages)
    losses = {"features": torch.tensor(2.0), "cost": torch.tensor(4.0)}
    assert weighting.combine(losses, 3)[0].item() == 2.0
    assert weighting.combine(losses, 7)[0].item() == 4.0
    assert weighting.combine(losses, 12)[0].item() == 2.0
    with pytest.raises(ValueError, match="not configured"):
        LossWeighting({"cost": StepDecay()}, stages=stages)
    # a term no stage names is always on
    weighting = LossWeighting({"features": StepDecay(), "cost": StepDecay(0.5), "extra": StepDecay()},
                              stages=stages)
    assert weighting.combine({**losses, "extra": torch.tensor(1.0)}, 3)[0].item() == 3.0


def test_uncertainty_weighting_value_and_gradient():
    weighting = UncertaintyWeighting(["a", "b"])
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    total = weighting.combine(losses)
    assert total.item() == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)  # s = 0
    total.backward()
    # d/ds (0.5 e^-s L + 0.5 s) = 0.5 - 0.5 L at s = 0
    assert weighting.log_variance.grad.tolist() == pytest.approx([0.0, -1.0])


# --- the distiller -----------------------------------------------------------------------
def test_distillation_loss_is_zero_when_student_and_teacher_coincide():
    student = tiny("dsnet")
    distiller = Distiller(student, copy.deepcopy(student), ALL_POINTS)
    assert all(isinstance(a.project, torch.nn.Identity) for a in distiller.feature_adapters.values())
    batch = fixed_batch()
    with torch.no_grad(), frozen_layers(student):
        outputs = student(batch["left"], batch["right"])
    teacher_outputs = distiller.teacher_outputs(batch["left"], batch["right"], step=0)
    losses = distiller.distillation_losses(outputs, teacher_outputs,
                                           frozenset({"features", "volume", "cost", "disparity"}))
    assert set(losses) == {"features", "volume", "cost", "disparity"}
    for name, value in losses.items():
        assert value.item() == pytest.approx(0.0, abs=1e-5), name


def test_adapters_bridge_a_narrow_student_and_resample_a_coarser_one():
    distiller = Distiller(tiny("dsnet"), tiny("acv-teacher"), ALL_POINTS)
    # teacher layer3/4 have 16 channels, the student 8; stem..layer2 agree
    assert isinstance(distiller.feature_adapters["stem"].project, torch.nn.Identity)
    assert distiller.feature_adapters["layer3"].project.out_channels == 16
    assert distiller.volume_adapter.project.in_channels == 2
    assert distiller.volume_adapter.project.out_channels == 4
    fast = Distiller(tiny("dsnet-fast"), tiny("acv-teacher"), ALL_POINTS)
    loss, logs = fast(fixed_batch(), step=0)
    assert torch.isfinite(loss) and logs["loss.cost"] > 0
    with pytest.raises(ValueError, match="no feature stage 'layer9'"):
        Distiller(tiny("dsnet"), tiny("acv-teacher"), {"features": {"stages": ["layer9"]}})


def test_distillation_steps_reduce_the_loss_and_leave_the_teacher_frozen():
    teacher = tiny("acv-teacher")
    distiller = Distiller(tiny("dsnet"), teacher, ALL_POINTS)
    teacher_state = copy.deepcopy(teacher.state_dict())  # weights and BN running statistics
    optimizer = torch.optim.Adam([p for n, p in distiller.named_parameters() if not n.startswith("teacher.")],
                                 lr=2e-3)
    batch = fixed_batch()
    distiller.train()
    losses = []
    for step in range(8):
        loss, _ = distiller(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_uncertainty_weighting_refuses_fixed_weights():
    with pytest.raises(ValueError, match="weighting is 'uncertainty'"):
        Distiller(tiny("dsnet"), tiny("acv-teacher"),
                  {"weighting": "uncertainty", "cost": {"weight": {"initial": 2.0}}})
    distiller = Distiller(tiny("dsnet"), tiny("acv-teacher"),
                          {"weighting": "uncertainty", "cost": {}, "ground_truth": {}})
    loss, logs = distiller(fixed_batch(), step=0)
    assert logs["weight.cost"] == 0.5 and logs["weight.ground_truth"] == 0.5
    expected = 0.5 * (logs["loss.cost"] + logs["loss.ground_truth"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "weighting.uncertainty.log_variance" in distiller.auxiliary_state_dict()


def test_co_training_unfreezes_the_teacher_from_its_start_step():
    teacher = tiny("acv-teacher")
    distiller = Distiller(tiny("dsnet"), teacher, {"cost": {}, "co_training": {"start_step": 2, "lr": 1e-4}})
    batch = fixed_batch(1)
    distiller.set_step(1)
    loss, logs = distiller(batch, 1)
    assert "loss.teacher_ground_truth" not in logs
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    distiller.set_step(2)
    loss, logs = distiller(batch, 2)
    assert "loss.teacher_ground_truth" in logs and teacher.training
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())


def test_cosine_loss_of_zero_vectors():
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    assert cosine_feature_loss(zero, zero).item() == 0.0
    assert cosine_feature_loss(zero, one).item() == 1.0


def test_teacher_and_student_regressions_read_cost_levels_as_the_same_disparity():
    from stereo_kd_core.models.blocks import full_resolution_regression, soft_argmin

    cost = torch.zeros(1, 12, 3, 5)
    cost[:, 3] = 100.0  # a sharp peak at cost level 3 (stride 4: 12 px)
    teacher_px = full_resolution_regression(cost, max_disparity=48, size=(12, 20))
    student_px = soft_argmin(cost) * 4
    assert torch.allclose(teacher_px, torch.full_like(teacher_px, 12.0), atol=1e-3)
    assert torch.allclose(student_px, torch.full_like(student_px, 12.0), atol=1e-3)


def test_rebinning_keeps_mass_and_expected_disparity_and_drops_no_peak():
    from stereo_kd_core.distill.losses import rebin_disparity_distribution

    probability = torch.zeros(1, 48, 1, 1)
    probability[0, 3] = 1.0  # odd teacher level (12 px) between two student levels (8 px, 16 px)
    coarse = rebin_disparity_distribution(probability, 24)
    assert coarse[0, :, 0, 0].sum().item() == pytest.approx(1.0)
    assert coarse[0, 1, 0, 0].item() == pytest.approx(0.5) and coarse[0, 2, 0, 0].item() == pytest.approx(0.5)
    random = torch.rand(2, 48, 3, 4).softmax(dim=1)
    rebinned = rebin_disparity_distribution(random, 24)
    levels_in, levels_out = torch.arange(48.0) * 4, torch.arange(24.0) * 8  # pixels
    expected_in = (random * levels_in.view(1, -1, 1, 1)).sum(1)
    expected_out = (rebinned * levels_out.view(1, -1, 1, 1)).sum(1)
    # equal except for the mass beyond the last coarse level (level 47 = 188 px > 184 px)
    assert torch.allclose(expected_out, expected_in - 4 * random[:, 47], atol=1e-4)
