"""How the loss terms are combined: step-decay schedules, learned uncertainty weights, and
progressive stages that switch terms on and off by step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepDecay:
    """weight(step) = initial * decay ** (step // every): the paper's per-term schedule.

    decay = 1 (the default) keeps the weight constant.
    """

    initial: float = 1.0
    decay: float = 1.0
    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"step-decay 'every' must be >= 1, got {self.every}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"step-decay 'decay' must be in (0, 1], got {self.decay}")

    def __call__(self, step: int) -> float:
        return self.initial * self.decay ** (step // self.every)


@dataclass(frozen=True)
class Stage:
    """Terms enabled while step < until_step (None: until the end of training)."""

    until_step: int | None
    terms: frozenset[str]


class ProgressiveStages:
    """An ordered list of stages; past the last bounded stage the last stage's terms stay on."""

    def __init__(self, stages: Sequence[Mapping]) -> None:
        if not stages:
            raise ValueError("progressive stages: give at least one stage")
        self.stages: list[Stage] = []
        previous = -1
        for index, stage in enumerate(stages):
            unknown = set(stage) - {"until_step", "terms"}
            if unknown:
                raise ValueError(f"stage {index}: unknown keys {sorted(unknown)}")
            until = stage.get("until_step")
            if until is not None:
                if until <= previous:
                    raise ValueError(f"stage {index}: until_step {until} does not increase")
                previous = until
            elif index != len(stages) - 1:
                raise ValueError(f"stage {index}: only the last stage may have until_step null")
            self.stages.append(Stage(until, frozenset(stage["terms"])))

    def enabled(self, step: int) -> frozenset[str]:
        for stage in self.stages:
            if stage.until_step is None or step < stage.until_step:
                return stage.terms
        return self.stages[-1].terms

    def all_terms(self) -> frozenset[str]:
        return frozenset().union(*(stage.terms for stage in self.stages))


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic uncertainty weights (Kendall, Gal & Cipolla, CVPR 2018).

    total = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i with s_i = log(sigma_i^2) learned per term.
    """

    def __init__(self, terms: Sequence[str]) -> None:
        super().__init__()
        self.terms = list(terms)
        self.log_variance = nn.Parameter(torch.zeros(len(self.terms)))

    def weight(self, term: str) -> torch.Tensor:
        return 0.5 * torch.exp(-self.log_variance[self.terms.index(term)])

    def combine(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = self.log_variance.new_zeros(())
        for term, loss in losses.items():
            s = self.log_variance[self.terms.index(term)]
            total = total + 0.5 * torch.exp(-s) * loss + 0.5 * s
        return total


class LossWeighting(nn.Module):
    """Combines named loss terms at a given step: stages switch the terms they name (terms no
    stage names are always on), then either the per-term step-decay schedules or learned
    uncertainty weights weigh them."""

    def __init__(self, schedules: Mapping[str, StepDecay], mode: str = "schedule",
                 stages: ProgressiveStages | None = None) -> None:
        super().__init__()
        if mode not in ("schedule", "uncertainty"):
            raise ValueError(f"unknown weighting {mode!r}; known: schedule, uncertainty")
        self.mode = mode
        self.schedules = dict(schedules)
        terms = list(self.schedules)
        if stages is not None:
            unknown = stages.all_terms() - set(terms)
            if unknown:
                raise ValueError(f"stages name terms that are not configured: {sorted(unknown)}; "
                                 f"configured: {terms}")
        self.stages = stages
        self.uncertainty = UncertaintyWeighting(terms) if mode == "uncertainty" else None

    def enabled(self, step: int) -> frozenset[str]:
        """Terms on at `step`: the current stage's, plus every term no stage names."""
        if self.stages is None:
            return frozenset(self.schedules)
        unstaged = frozenset(self.schedules) - self.stages.all_terms()
        return self.stages.enabled(step) | unstaged

    def combine(self, losses: Mapping[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted total of the enabled terms among `losses`, and the weight of each term."""
        active = {name: loss for name, loss in losses.items() if name in self.enabled(step)}
        if not active:
            raise ValueError(f"no loss term enabled at step {step}")
        if self.uncertainty is not None:
            weights = {name: float(self.uncertainty.weight(name).detach()) for name in active}
            return self.uncertainty.combine(active), weights
        weights = {name: self.schedules[name](step) for name in active}
        total = sum(weights[name] * loss for name, loss in active.items())
        return total, weights
