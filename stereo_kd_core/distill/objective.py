"""The one training objective: every recipe (`train`, `distill`, `adapt`) is a configuration of
`TrainingObjective`, whose forward(batch, step) returns the weighted loss of a batch that may
mix samples of different sources (`stereo_kd_core.distill.signals`):

- the label term ("ground_truth", or "labels" in adapt) on every sample's target, weighted per
  pixel by the sample's `weight`; with `drop_worst`, the worst fraction of the pseudo-labelled
  pixels of the batch does not count;
- the teacher's points (features, cost volume, aggregated cost, disparity) on the samples whose
  `teacher_points` is set: from a live teacher network, or cached in the batch
  ("teacher_prob", "teacher_disparity"; cost and disparity only);
- photometric self-supervision on the samples without ground truth.

Config of the teacher points and their weighting (the recipe's `distill:` section, or adapt's
`internal:`; every point optional):

    features:  {stages: [stem, layer1, ...] | {student_stage: teacher_stage},
                loss: cosine | mse | smooth_l1, weight: WEIGHT}
    volume:    {student: volume.gwc, teacher: volume.gwc, loss: mse | smooth_l1 | cosine,
                weight: WEIGHT}
    cost:      {temperature: T, weight: WEIGHT}     # KL over the aggregated costs
    disparity: {weight: WEIGHT}                     # smooth L1 to the teacher's disparity
    ground_truth: {weight: WEIGHT}                  # the recipe's `loss:` against the targets
    weighting: schedule | uncertainty
    stages:    [{until_step: N | null, terms: [...]}, ...]   # terms no stage names: always on
    co_training: {start_step: N, lr: LR}            # teacher unfrozen from start_step on
    teacher_agreement_px: PX                        # cost and disparity points only where the
                                                    # teacher is within PX of the label (unlabelled
                                                    # pixels: everywhere); absent: everywhere

WEIGHT is {initial, decay, every} (step decay); it must be absent with `weighting: uncertainty`.
Terms outside that config (`fixed`: supervised training's and adapt's label term, adapt's
photometric term) count with constant weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from stereo_kd_core.distill.adapters import ChannelAdapter, resample_feature, resample_volume
from stereo_kd_core.distill.losses import (
    OUTPUT_WEIGHTS,
    cached_distribution_kl_loss,
    cosine_feature_loss,
    disparity_kl_loss,
    edge_aware_smoothness,
    ground_truth_loss,
    hint_loss,
    photometric_loss,
    pool_mask,
    teacher_agreement_mask,
    teacher_disparity_loss,
)
from stereo_kd_core.distill.signals import SOURCE_GROUND_TRUTH, SOURCE_PSEUDO_LABEL
from stereo_kd_core.distill.weighting import LossWeighting, ProgressiveStages, StepDecay

DISTILLATION_TERMS = ("features", "volume", "cost", "disparity")
CACHED_TERMS = ("cost", "disparity")  # what a teacher cache holds
LABEL_TERMS = ("ground_truth", "labels")  # the label term's name: "labels" in adapt (targets of both sources)
PHOTOMETRIC_TERM = "photometric"
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


def _rows(batch: Mapping[str, torch.Tensor], key: str, value: int | None = None) -> torch.Tensor | None:
    """(B,) bool of the samples whose `key` is set (equals `value`); None when the batch has no such
    field (every sample)."""
    if key not in batch:
        return None
    field = batch[key].view(-1)
    return field.bool() if value is None else field == value


class TrainingObjective(nn.Module):
    """Student (+ teacher, adapters, loss weighting); forward(batch, step) -> (weighted loss, logs).

    points: the teacher points and their weighting (module docstring), or None. teacher: a live
    teacher network; None with distillation points = the points are cached in the batch. fixed:
    {term: constant weight} of the terms outside `points` (a label term, "photometric").
    """

    def __init__(self, student: nn.Module, points: Mapping | None = None, teacher: nn.Module | None = None,
                 loss_kind: str = "smooth_l1", output_weights: tuple[float, ...] = OUTPUT_WEIGHTS,
                 fixed: Mapping[str, float] | None = None, drop_worst: float = 0.0, smoothness: float = 0.0,
                 probe_size: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.loss_kind = loss_kind
        self.output_weights = tuple(output_weights)
        self.config = dict(points or {})
        self.fixed = {term: float(weight) for term, weight in (fixed or {}).items()}
        unknown_fixed = set(self.fixed) - {*LABEL_TERMS, PHOTOMETRIC_TERM}
        if unknown_fixed:
            raise ValueError(f"fixed-weight terms {sorted(unknown_fixed)}; known: {', '.join(LABEL_TERMS)}, "
                             f"{PHOTOMETRIC_TERM}")
        if not 0.0 <= drop_worst < 1.0:
            raise ValueError(f"--drop-worst must be in [0, 1), got {drop_worst}")
        if self.fixed.get(PHOTOMETRIC_TERM, 0.0) < 0 or smoothness < 0:
            raise ValueError("photometric and smoothness weights must be >= 0")
        self.drop_worst, self.smoothness = float(drop_worst), float(smoothness)
        if teacher is not None and student.max_disparity != teacher.max_disparity:
            raise ValueError(f"student max_disparity {student.max_disparity} != teacher "
                             f"{teacher.max_disparity}: distillation needs the same disparity range")
        self.cached = teacher is None and bool(points)
        if self.cached:
            live_only = sorted(set(self.config) & {"features", "volume", "co_training"})
            if live_only:
                raise ValueError(f"distill.{live_only[0]} needs the teacher's internal tensors, which a cache "
                                 "does not hold: distill with a live teacher (teacher.checkpoint) instead")
            if float(self.config.get("cost", {}).get("temperature", 1.0)) != 1.0:
                raise ValueError("distill.cost.temperature must be 1 with cached teacher outputs "
                                 "(cached as probabilities)")
        available = CACHED_TERMS if self.cached else DISTILLATION_TERMS
        self.points = {term: self.config[term] for term in (*available, "ground_truth")
                       if self.config.get(term) is not None}
        if points is not None and not set(self.points) & set(available):
            raise ValueError(f"distill: configure at least one of {', '.join(available)}")
        labels = [term for term in LABEL_TERMS if term in self.fixed or term in self.points]
        if len(labels) > 1:
            raise ValueError(f"one label term, got {labels}")
        self.label_term = labels[0] if labels else None

        weighting = self.config.get("weighting", "schedule")
        co_training = self.config.get("co_training") if teacher is not None else None
        self.co_training_start = None if co_training is None else int(co_training["start_step"])
        self.co_training_lr = None if co_training is None else float(co_training["lr"])
        schedules = {term: _weight_schedule(cfg, weighting, term) for term, cfg in self.points.items()}
        if co_training is not None:
            schedules[TEACHER_GROUND_TRUTH] = StepDecay()
        stages = self.config.get("stages")
        self.weighting = LossWeighting(schedules, weighting, None if stages is None else ProgressiveStages(stages))
        self.terms: tuple[str, ...] = (*self.fixed, *schedules)
        if not self.terms:
            raise ValueError("the objective has no loss term")
        self.agreement_px = _agreement_px(self.config)

        features = self.points.get("features", {})
        stage_pairs = features.get("stages", list(getattr(student, "feature_stages", ())))
        self.feature_pairs = (dict(stage_pairs) if isinstance(stage_pairs, Mapping)
                              else {stage: stage for stage in stage_pairs})
        self.feature_loss = features.get("loss", "cosine")
        volume = self.points.get("volume", {})
        self.volume_keys = (volume.get("student", "volume.gwc"), volume.get("teacher", "volume.gwc"))
        self.volume_loss = volume.get("loss", "mse")
        self.temperature = float(self.points.get("cost", {}).get("temperature", 1.0))
        for term, kind in (("features", self.feature_loss), ("volume", self.volume_loss)):
            if kind not in ("cosine", "mse", "smooth_l1"):
                raise ValueError(f"distill.{term}.loss: unknown {kind!r}; known: cosine, mse, smooth_l1")

        self.teacher = teacher  # registered after the student: its parameters are named teacher.*
        self.feature_adapters = nn.ModuleDict()
        self.volume_adapter: nn.Module = nn.Identity()
        if teacher is not None:
            self.freeze_teacher()
            self._build_adapters(probe_size or 2 * max(student.stride, teacher.stride))

    # --- teacher state -------------------------------------------------------------------
    def co_training_active(self, step: int) -> bool:
        return self.co_training_start is not None and step >= self.co_training_start

    def freeze_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.eval()
            self.teacher.requires_grad_(False)

    def set_step(self, step: int) -> None:
        """Freeze or (from co_training.start_step on) unfreeze the teacher for this step."""
        if self.co_training_active(step):
            self.teacher.requires_grad_(True)
            self.teacher.train()
        else:
            self.freeze_teacher()

    def train(self, mode: bool = True) -> TrainingObjective:
        super().train(mode)
        if self.teacher is not None and not any(p.requires_grad for p in self.teacher.parameters()):
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

    # --- losses --------------------------------------------------------------------------
    def distillation_losses(self, student_out: Mapping[str, torch.Tensor],
                            teacher_out: Mapping[str, torch.Tensor],
                            enabled: frozenset[str], agreement: torch.Tensor | None = None
                            ) -> dict[str, torch.Tensor]:
        """Unweighted loss of each enabled point against a live teacher; `agreement` (B, H, W):
        the pixels where the cost and disparity points count (None: all)."""
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

    def cached_losses(self, student_out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                      enabled: frozenset[str]) -> dict[str, torch.Tensor]:
        """The cost (KL, every student output against the teacher's final distribution) and
        disparity points against teacher outputs cached in the batch ("teacher_prob"
        (B, D/s, H/s, W/s), "teacher_disparity" (B, H, W))."""
        if "teacher_prob" not in batch:
            raise ValueError("cached distillation needs a data set with teacher outputs (name: teacher-cache)")
        agreement = self._agreement(batch["teacher_disparity"], batch)
        losses: dict[str, torch.Tensor] = {}
        if "cost" in enabled and "cost" in self.points:
            per_output = [cached_distribution_kl_loss(student_out[f"cost.{i}"], batch["teacher_prob"],
                                                      pool_mask(agreement, student_out[f"cost.{i}"].shape[-2:]))
                          for i in range(self.student.num_costs)]
            losses["cost"] = torch.stack(per_output).mean()
        if "disparity" in enabled and "disparity" in self.points:
            losses["disparity"] = teacher_disparity_loss(student_out["disp"], batch["teacher_disparity"],
                                                         self.student.max_disparity, agreement)
        return losses

    def _agreement(self, teacher_disparity: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Where the teacher's points count (B, H, W), or None for everywhere."""
        if self.agreement_px is None:
            return None
        return teacher_agreement_mask(teacher_disparity.detach(), batch["disparity"], batch["valid"],
                                      self.agreement_px)

    def label_loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                   num_outputs: int, max_disparity: int) -> torch.Tensor:
        """The label loss of a network's outputs: every sample's target, weighted per pixel by its
        `weight` (batches without one: `valid`)."""
        disparity = batch["disparity"]  # (B, H, W)
        valid = batch["valid"] & (disparity > 0) & (disparity < max_disparity)
        outputs_list = [outputs[f"disp.{i}"] for i in range(num_outputs)]
        return ground_truth_loss(outputs_list, disparity, valid, self.loss_kind, self.output_weights,
                                 batch.get("weight"))

    def _drop_worst_pseudo_labels(self, final: torch.Tensor, batch: Mapping[str, torch.Tensor]
                                  ) -> Mapping[str, torch.Tensor]:
        """The batch with the worst `drop_worst` fraction of its pseudo-labelled pixels (largest
        residual to the student's final disparity) unsupervised: robust to teacher errors."""
        pseudo_rows = _rows(batch, "source", SOURCE_PSEUDO_LABEL)
        if self.drop_worst <= 0 or pseudo_rows is None:
            return batch
        disparity = batch["disparity"]
        pseudo = batch["valid"] & (disparity > 0) & (disparity < self.student.max_disparity)
        pseudo = pseudo & pseudo_rows.view(-1, 1, 1)
        if not pseudo.any():
            return batch
        with torch.no_grad():
            residual = (final.float() - disparity).abs()
            keep = max(1, math.ceil((1.0 - self.drop_worst) * int(pseudo.sum())))
            threshold = residual[pseudo].kthvalue(keep).values
            dropped = pseudo & (residual > threshold)
        return {**batch, "valid": batch["valid"] & ~dropped}

    def forward(self, batch: Mapping[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """batch: left, right (B, 3, H, W); disparity, valid (B, H, W); optional weight (B, H, W),
        source and teacher_points (B,), cached teacher outputs (see the module docstring)."""
        enabled = self.weighting.enabled(step)
        student_out = self.student(batch["left"], batch["right"])
        losses: dict[str, torch.Tensor] = {}
        if enabled & set(DISTILLATION_TERMS):
            rows = _rows(batch, "teacher_points")
            if rows is None or bool(rows.all()):
                losses.update(self._teacher_losses(student_out, batch, enabled, step))
            elif bool(rows.any()):
                losses.update(self._teacher_losses({k: v[rows] for k, v in student_out.items()},
                                                   {k: v[rows] for k, v in batch.items()}, enabled, step))
        if self.label_term is not None and (self.label_term in self.fixed or self.label_term in enabled):
            labelled = self._drop_worst_pseudo_labels(student_out["disp"], batch)
            losses[self.label_term] = self.label_loss(student_out, labelled, self.student.num_outputs,
                                                      self.student.max_disparity)
        if self.fixed.get(PHOTOMETRIC_TERM, 0.0) > 0:
            losses[PHOTOMETRIC_TERM] = self._photometric(student_out["disp"], batch)
        return self._combine(losses, step)

    def _teacher_losses(self, student_out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                        enabled: frozenset[str], step: int) -> dict[str, torch.Tensor]:
        if self.cached:
            return self.cached_losses(student_out, batch, enabled)
        teacher_out = self.teacher_outputs(batch["left"], batch["right"], step)
        losses = self.distillation_losses(student_out, teacher_out, enabled,
                                          self._agreement(teacher_out["disp"], batch))
        if self.co_training_active(step):
            losses[TEACHER_GROUND_TRUTH] = self.label_loss(teacher_out, batch, self.teacher.num_outputs,
                                                           self.teacher.max_disparity)
        return losses

    def _photometric(self, final: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """SSIM + L1 reconstruction of the left view and edge-aware smoothness, on the samples
        without ground truth."""
        rows = _rows(batch, "source", SOURCE_GROUND_TRUTH)
        rows = torch.ones(final.shape[0], dtype=torch.bool, device=final.device) if rows is None else ~rows
        if not rows.any():
            return final.sum() * 0.0
        term = photometric_loss(batch["left"][rows], batch["right"][rows], final[rows])
        return term + self.smoothness * edge_aware_smoothness(final[rows], batch["left"][rows])

    def _combine(self, losses: dict[str, torch.Tensor], step: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Fixed-weight terms plus the weighting's combination of the others, and the log of every
        loss and its weight."""
        weighted = {name: loss for name, loss in losses.items() if name not in self.fixed}
        logs: dict[str, torch.Tensor | float] = {}
        total = None
        if weighted:
            total, weights = self.weighting.combine(weighted, step)
            logs.update({f"weight.{name}": weight for name, weight in weights.items()})
        for name, weight in self.fixed.items():
            if name in losses:
                total = weight * losses[name] if total is None else total + weight * losses[name]
                logs[f"weight.{name}"] = weight
        if total is None:
            raise ValueError(f"no loss term enabled at step {step}")
        logs.update({f"loss.{name}": loss.detach() for name, loss in losses.items()})
        return total, logs

    # --- checkpoint state ------------------------------------------------------------------
    def auxiliary_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the student: adapters, learned weights, and the teacher when it is
        trained (co-training)."""
        keep_teacher = self.co_training_start is not None
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith("student.") and (keep_teacher or not k.startswith("teacher."))}

    def load_auxiliary_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.auxiliary_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"objective state does not match its config: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        self.load_state_dict(dict(state), strict=False)


# --- the recipes' objectives ---------------------------------------------------------------
class SupervisedObjective(TrainingObjective):
    """`stereo-kd train`: the label loss alone."""

    def __init__(self, student: nn.Module, loss_kind: str = "smooth_l1",
                 output_weights: tuple[float, ...] = OUTPUT_WEIGHTS) -> None:
        super().__init__(student, None, None, loss_kind, output_weights, fixed={"ground_truth": 1.0})


class Distiller(TrainingObjective):
    """`stereo-kd distill` with a live teacher: student + frozen teacher + adapters."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: Mapping,
                 loss_kind: str = "smooth_l1", output_weights: tuple[float, ...] = OUTPUT_WEIGHTS,
                 probe_size: int | None = None) -> None:
        super().__init__(student, config, teacher, loss_kind, output_weights, probe_size=probe_size)


class CachedTeacherDistiller(TrainingObjective):
    """`stereo-kd distill` from teacher outputs cached beside the pairs (`teacher_cache.py`): the
    aggregated cost distribution and the final disparity, plus the label loss."""

    def __init__(self, student: nn.Module, config: Mapping, loss_kind: str = "smooth_l1",
                 output_weights: tuple[float, ...] = OUTPUT_WEIGHTS) -> None:
        super().__init__(student, config, None, loss_kind, output_weights)
