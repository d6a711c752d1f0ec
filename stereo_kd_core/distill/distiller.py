"""The distillation objective: a student, a frozen teacher, adapters and loss weighting in one
module whose forward returns the weighted loss of a batch.

Config (the recipe's `distill:` section; every point optional, at least one given):

    features:  {stages: [stem, layer1, ...] | {student_stage: teacher_stage},
                loss: cosine | mse | smooth_l1, weight: WEIGHT}
    volume:    {student: volume.gwc, teacher: volume.gwc, loss: mse | smooth_l1 | cosine,
                weight: WEIGHT}
    cost:      {temperature: T, weight: WEIGHT}     # KL over the aggregated costs
    disparity: {weight: WEIGHT}                     # smooth L1 to the teacher's disparity
    ground_truth: {weight: WEIGHT}                  # the recipe's `loss:` against labels
    weighting: schedule | uncertainty
    stages:    [{until_step: N | null, terms: [...]}, ...]   # terms no stage names: always on
    co_training: {start_step: N, lr: LR}            # teacher unfrozen from start_step on
    teacher_agreement_px: PX                        # cost and disparity points only where the
                                                    # teacher is within PX of the label (unlabelled
                                                    # pixels: everywhere); absent: everywhere

WEIGHT is {initial, decay, every} (step decay); it must be absent with `weighting: uncertainty`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from stereo_kd_core.distill.adapters import ChannelAdapter, resample_feature, resample_volume
from stereo_kd_core.distill.losses import (
    OUTPUT_WEIGHTS,
    cached_distribution_kl_loss,
    cosine_feature_loss,
    disparity_kl_loss,
    ground_truth_loss,
    hint_loss,
    pool_mask,
    teacher_agreement_mask,
    teacher_disparity_loss,
)
from stereo_kd_core.distill.weighting import LossWeighting, ProgressiveStages, StepDecay

DISTILLATION_TERMS = ("features", "volume", "cost", "disparity")
TERMS = (*DISTILLATION_TERMS, "ground_truth")
TEACHER_GROUND_TRUTH = "teacher_ground_truth"  # the teacher's own label loss while co-training
VIEWS = ("left", "right")


@contextlib.contextmanager
def frozen_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Every layer in eval mode (BN running statistics used, not updated) while the model's own
    flag says training, so its forward returns the dict of distillation points."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    model.training = True
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def _weight_schedule(term_config: Mapping, weighting: str, term: str) -> StepDecay:
    weight = term_config.get("weight")
    if weight is None:
        return StepDecay()
    if weighting == "uncertainty":
        raise ValueError(f"distill.{term}.weight is set but weighting is 'uncertainty', which "
                         "learns the weights: remove it")
    return StepDecay(**weight)


def _pair_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "cosine":
        return cosine_feature_loss(student, teacher)
    return hint_loss(student, teacher, kind)


def _agreement_px(config: Mapping) -> float | None:
    value = config.get("teacher_agreement_px")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"distill.teacher_agreement_px must be a number of pixels > 0, got {value!r}")
    return float(value)


def _agreement(max_error_px: float | None, teacher_disparity: torch.Tensor,
               batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Where the teacher's points count (B, H, W), or None for everywhere."""
    if max_error_px is None:
        return None
    return teacher_agreement_mask(teacher_disparity.detach(), batch["disparity"], batch["valid"], max_error_px)


def _weighted_total(weighting: LossWeighting, losses: dict[str, torch.Tensor], step: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The weighted sum of a step's losses, and the log of every loss and its weight."""
    total, weights = weighting.combine(losses, step)
    logs: dict[str, torch.Tensor | float] = {f"loss.{name}": loss.detach() for name, loss in losses.items()}
    logs.update({f"weight.{name}": weight for name, weight in weights.items()})
    return total, logs


class SupervisedObjective(nn.Module):
    """Ground-truth loss of a model's outputs; the supervised counterpart of `Distiller`."""

    def __init__(self, student: nn.Module, loss_kind: str = "smooth_l1",
                 output_weights: tuple[float, ...] = OUTPUT_WEIGHTS) -> None:
        super().__init__()
        self.student = student
        self.loss_kind = loss_kind
        self.output_weights = tuple(output_weights)
        self.terms: tuple[str, ...] = ("ground_truth",)

    def label_loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                   num_outputs: int, max_disparity: int) -> torch.Tensor:
        disparity = batch["disparity"]  # (B, H, W)
        valid = batch["valid"] & (disparity > 0) & (disparity < max_disparity)
        outputs_list = [outputs[f"disp.{i}"] for i in range(num_outputs)]
        return ground_truth_loss(outputs_list, disparity, valid, self.loss_kind, self.output_weights)

    def forward(self, batch: Mapping[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """batch: left, right (B, 3, H, W); disparity (B, H, W); valid (B, H, W) bool."""
        outputs = self.student(batch["left"], batch["right"])
        loss = self.label_loss(outputs, batch, self.student.num_outputs, self.student.max_disparity)
        return loss, {"loss.ground_truth": loss.detach()}

    def auxiliary_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_auxiliary_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"supervised objective has no auxiliary state, got {sorted(state)[:5]}")


class Distiller(SupervisedObjective):
    """Student + frozen teacher + adapters; forward(batch, step) -> (weighted loss, logs)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: Mapping,
                 loss_kind: str = "smooth_l1", output_weights: tuple[float, ...] = OUTPUT_WEIGHTS,
                 probe_size: int | None = None) -> None:
        super().__init__(student, loss_kind, output_weights)
        if student.max_disparity != teacher.max_disparity:
            raise ValueError(f"student max_disparity {student.max_disparity} != teacher "
                             f"{teacher.max_disparity}: distillation needs the same disparity range")
        self.teacher = teacher
        self.config = dict(config)
        weighting = self.config.get("weighting", "schedule")
        self.points = {term: self.config[term] for term in TERMS if self.config.get(term) is not None}
        if not set(self.points) & set(DISTILLATION_TERMS):
            raise ValueError(f"distill: configure at least one of {', '.join(DISTILLATION_TERMS)}")
        self.terms = tuple(self.points)

        co_training = self.config.get("co_training")
        self.co_training_start = None if co_training is None else int(co_training["start_step"])
        self.co_training_lr = None if co_training is None else float(co_training["lr"])
        schedules = {term: _weight_schedule(cfg, weighting, term) for term, cfg in self.points.items()}
        if co_training is not None:
            schedules[TEACHER_GROUND_TRUTH] = StepDecay()
            self.terms = (*self.terms, TEACHER_GROUND_TRUTH)
        stages = self.config.get("stages")
        self.weighting = LossWeighting(schedules, weighting,
                                       None if stages is None else ProgressiveStages(stages))

        features = self.points.get("features", {})
        stage_pairs = features.get("stages", list(student.feature_stages))
        self.feature_pairs = (dict(stage_pairs) if isinstance(stage_pairs, Mapping)
                              else {stage: stage for stage in stage_pairs})
        self.feature_loss = features.get("loss", "cosine")
        volume = self.points.get("volume", {})
        self.volume_keys = (volume.get("student", "volume.gwc"), volume.get("teacher", "volume.gwc"))
        self.volume_loss = volume.get("loss", "mse")
        self.temperature = float(self.points.get("cost", {}).get("temperature", 1.0))
        self.agreement_px = _agreement_px(self.config)
        for term, kind in (("features", self.feature_loss), ("volume", self.volume_loss)):
            if kind not in ("cosine", "mse", "smooth_l1"):
                raise ValueError(f"distill.{term}.loss: unknown {kind!r}; known: cosine, mse, smooth_l1")

        self.freeze_teacher()
        self.feature_adapters = nn.ModuleDict()
        self.volume_adapter: nn.Module = nn.Identity()
        self._build_adapters(probe_size or 2 * max(student.stride, teacher.stride))

    # --- teacher state -------------------------------------------------------------------
    def co_training_active(self, step: int) -> bool:
        return self.co_training_start is not None and step >= self.co_training_start

    def freeze_teacher(self) -> None:
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def set_step(self, step: int) -> None:
        """Freeze or (from co_training.start_step on) unfreeze the teacher for this step."""
        if self.co_training_active(step):
            self.teacher.requires_grad_(True)
            self.teacher.train()
        else:
            self.freeze_teacher()

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if not any(p.requires_grad for p in self.teacher.parameters()):
            self.teacher.eval()  # a frozen teacher stays in eval mode whatever the trainer does
        return self

    def teacher_outputs(self, left: torch.Tensor, right: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if self.co_training_active(step):
            return self.teacher(left, right)
        with torch.no_grad(), frozen_layers(self.teacher):
            return self.teacher(left, right)

    # --- adapters ------------------------------------------------------------------------
    def _build_adapters(self, probe_size: int) -> None:
        """Probe both networks once on a tiny input to learn the channel counts."""
        device = next(self.student.parameters()).device
        probe = torch.zeros(1, 3, probe_size, probe_size, device=device)
        with torch.no_grad(), frozen_layers(self.student), frozen_layers(self.teacher):
            student_out = self.student(probe, probe)
            teacher_out = self.teacher(probe, probe)
        if "features" in self.points:
            for student_stage, teacher_stage in self.feature_pairs.items():
                keys = (f"feat.{student_stage}.left", f"feat.{teacher_stage}.left")
                for key, outputs, who in ((keys[0], student_out, "student"), (keys[1], teacher_out, "teacher")):
                    if key not in outputs:
                        known = sorted({k.split(".")[1] for k in outputs if k.startswith("feat.")})
                        raise ValueError(f"distill.features: the {who} has no feature stage "
                                         f"{key.split('.')[1]!r}; it has {known}")
                self.feature_adapters[student_stage] = ChannelAdapter(
                    student_out[keys[0]].shape[1], teacher_out[keys[1]].shape[1], volumetric=False)
        if "volume" in self.points:
            for key, outputs, who in ((self.volume_keys[0], student_out, "student"),
                                      (self.volume_keys[1], teacher_out, "teacher")):
                if key not in outputs:
                    known = sorted(k for k in outputs if k.startswith("volume."))
                    raise ValueError(f"distill.volume: the {who} has no {key!r}; it has {known}")
            self.volume_adapter = ChannelAdapter(student_out[self.volume_keys[0]].shape[1],
                                                 teacher_out[self.volume_keys[1]].shape[1], volumetric=True)
        self.to(device)

    # --- loss ----------------------------------------------------------------------------
    def distillation_losses(self, student_out: Mapping[str, torch.Tensor],
                            teacher_out: Mapping[str, torch.Tensor],
                            enabled: frozenset[str], agreement: torch.Tensor | None = None
                            ) -> dict[str, torch.Tensor]:
        """Unweighted loss of each enabled distillation point; `agreement` (B, H, W): the pixels
        where the cost and disparity points count (None: all)."""
        losses: dict[str, torch.Tensor] = {}
        if "features" in enabled and "features" in self.points:
            per_stage = []
            for student_stage, teacher_stage in self.feature_pairs.items():
                adapter = self.feature_adapters[student_stage]
                for view in VIEWS:
                    student = adapter(student_out[f"feat.{student_stage}.{view}"])  # (B, Ct, H, W)
                    teacher = resample_feature(teacher_out[f"feat.{teacher_stage}.{view}"],
                                               tuple(student.shape[-2:]))
                    per_stage.append(_pair_loss(self.feature_loss, student, teacher))
            losses["features"] = torch.stack(per_stage).mean()
        if "volume" in enabled and "volume" in self.points:
            student = self.volume_adapter(student_out[self.volume_keys[0]])  # (B, Ct, D, H, W)
            teacher = resample_volume(teacher_out[self.volume_keys[1]], tuple(student.shape[-3:]))
            losses["volume"] = _pair_loss(self.volume_loss, student, teacher)
        if "cost" in enabled and "cost" in self.points:
            # the student's K aggregated costs against the teacher's last K
            student_k, teacher_k = self.student.num_costs, self.teacher.num_costs
            per_output = [disparity_kl_loss(student_out[f"cost.{i}"],
                                            teacher_out[f"cost.{i + teacher_k - student_k}"],
                                            self.temperature,
                                            pool_mask(agreement, student_out[f"cost.{i}"].shape[-2:]))
                          for i in range(student_k)]
            losses["cost"] = torch.stack(per_output).mean()
        if "disparity" in enabled and "disparity" in self.points:
            losses["disparity"] = teacher_disparity_loss(student_out["disp"], teacher_out["disp"],
                                                         self.student.max_disparity, agreement)
        return losses

    def forward(self, batch: Mapping[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """batch: left, right (B, 3, H, W); disparity (B, H, W); valid (B, H, W) bool."""
        enabled = self.weighting.enabled(step)
        student_out = self.student(batch["left"], batch["right"])
        losses: dict[str, torch.Tensor] = {}
        if enabled & set(DISTILLATION_TERMS):
            teacher_out = self.teacher_outputs(batch["left"], batch["right"], step)
            agreement = _agreement(self.agreement_px, teacher_out["disp"], batch)
            losses.update(self.distillation_losses(student_out, teacher_out, enabled, agreement))
            if self.co_training_active(step):
                losses[TEACHER_GROUND_TRUTH] = self.label_loss(
                    teacher_out, batch, self.teacher.num_outputs, self.teacher.max_disparity)
        if "ground_truth" in enabled and "ground_truth" in self.points:
            losses["ground_truth"] = self.label_loss(student_out, batch, self.student.num_outputs,
                                                     self.student.max_disparity)
        return _weighted_total(self.weighting, losses, step)

    def auxiliary_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the student: adapters, learned weights, and the teacher when it
        is trained (co-training)."""
        keep_teacher = self.co_training_start is not None
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith("student.") and (keep_teacher or not k.startswith("teacher."))}

    def load_auxiliary_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.auxiliary_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"distiller state does not match its config: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        self.load_state_dict(dict(state), strict=False)


CACHED_TERMS = ("cost", "disparity")


class CachedTeacherDistiller(SupervisedObjective):
    """Distillation from teacher outputs cached beside the training pairs (`teacher_cache.py`):
    the aggregated cost distribution (KL, every student output against the teacher's final one)
    and the final disparity, plus ground truth. Same config and weighting as `Distiller`; the
    batch carries "teacher_prob" (B, D/s, H/s, W/s) and "teacher_disparity" (B, H, W)."""

    def __init__(self, student: nn.Module, config: Mapping, loss_kind: str = "smooth_l1",
                 output_weights: tuple[float, ...] = OUTPUT_WEIGHTS) -> None:
        super().__init__(student, loss_kind, output_weights)
        self.config = dict(config)
        live_only = sorted(set(self.config) & {"features", "volume", "co_training"})
        if live_only:
            raise ValueError(f"distill.{live_only[0]} needs the teacher's internal tensors, which a cache "
                             "does not hold: distill with a live teacher (teacher.checkpoint) instead")
        if float(self.config.get("cost", {}).get("temperature", 1.0)) != 1.0:
            raise ValueError("distill.cost.temperature must be 1 with cached teacher outputs (cached as probabilities)")
        weighting = self.config.get("weighting", "schedule")
        self.points = {term: self.config[term] for term in (*CACHED_TERMS, "ground_truth")
                       if self.config.get(term) is not None}
        if not set(self.points) & set(CACHED_TERMS):
            raise ValueError(f"distill: configure at least one of {', '.join(CACHED_TERMS)}")
        self.terms = tuple(self.points)
        self.agreement_px = _agreement_px(self.config)
        stages = self.config.get("stages")
        schedules = {term: _weight_schedule(cfg, weighting, term) for term, cfg in self.points.items()}
        self.weighting = LossWeighting(schedules, weighting, None if stages is None else ProgressiveStages(stages))

    def forward(self, batch: Mapping[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """batch: left, right, disparity, valid as for `SupervisedObjective`, plus teacher_prob and
        teacher_disparity."""
        if "teacher_prob" not in batch:
            raise ValueError("cached distillation needs a data set with teacher outputs (name: teacher-cache)")
        enabled = self.weighting.enabled(step)
        student_out = self.student(batch["left"], batch["right"])
        losses: dict[str, torch.Tensor] = {}
        agreement = _agreement(self.agreement_px, batch["teacher_disparity"], batch)
        if "cost" in enabled and "cost" in self.points:
            per_output = [cached_distribution_kl_loss(student_out[f"cost.{i}"], batch["teacher_prob"],
                                                      pool_mask(agreement, student_out[f"cost.{i}"].shape[-2:]))
                          for i in range(self.student.num_costs)]
            losses["cost"] = torch.stack(per_output).mean()
        if "disparity" in enabled and "disparity" in self.points:
            losses["disparity"] = teacher_disparity_loss(student_out["disp"], batch["teacher_disparity"],
                                                         self.student.max_disparity, agreement)
        if "ground_truth" in enabled and "ground_truth" in self.points:
            losses["ground_truth"] = self.label_loss(student_out, batch, self.student.num_outputs,
                                                     self.student.max_disparity)
        return _weighted_total(self.weighting, losses, step)

    def auxiliary_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    load_auxiliary_state_dict = Distiller.load_auxiliary_state_dict  # same check: keys must match the config
