"""The rule that picks a model's CPU default backend and precision from measurements.

Candidates are (backend, precision) pairs with a median latency and an EPE per evaluation data
set, all measured on the same model, machine and thread count (benchmarks/cpu_backends.py
measures them). The reference is PyTorch fp32. A candidate is admissible when, on every data
set the reference was scored on, its EPE is at most FP_EPE_TOLERANCE_PX worse than the
reference's (floating-point variants: fp32 in another runtime, bf16) or less than
INT8_EPE_TOLERANCE_PX worse (int8). A candidate without an EPE on one of those data sets is not
admissible. The default is the fastest admissible candidate; the reference is always admissible,
so there is always a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP_EPE_TOLERANCE_PX = 0.02   # "fp32 accuracy unchanged": EPE loss at most this (inclusive)
INT8_EPE_TOLERANCE_PX = 0.1  # int8 is offered only when its EPE loss is under this (strict)
REFERENCE = ("pytorch", "fp32")


@dataclass
class BackendCandidate:
    backend: str                 # "pytorch" or "onnxruntime"
    precision: str               # "fp32", "bf16", "int8"
    median_ms: float             # per pair at the deployment size, on the target CPU
    epe: dict[str, float] = field(default_factory=dict)  # data set -> mean EPE, px

    @property
    def key(self) -> tuple[str, str]:
        return self.backend, self.precision


def epe_loss(candidate: BackendCandidate, reference: BackendCandidate) -> float | None:
    """Largest EPE increase over the reference's data sets; None when one is not measured."""
    if not reference.epe or any(name not in candidate.epe for name in reference.epe):
        return None
    return max(candidate.epe[name] - reference.epe[name] for name in reference.epe)


def verdict(candidate: BackendCandidate, reference: BackendCandidate) -> tuple[bool, str]:
    """(admissible, reason) of one candidate under the rule in the module docstring."""
    if candidate.key == reference.key:
        return True, "reference"
    loss = epe_loss(candidate, reference)
    if loss is None:
        needed = ", ".join(sorted(reference.epe)) or "any data set (the reference has none)"
        return False, f"EPE not measured on {needed}"
    if candidate.precision == "int8":
        ok = loss < INT8_EPE_TOLERANCE_PX
        return ok, f"int8 EPE loss {loss:+.3f} px ({'<' if ok else '>='} {INT8_EPE_TOLERANCE_PX})"
    ok = loss <= FP_EPE_TOLERANCE_PX
    return ok, f"EPE loss {loss:+.3f} px ({'<=' if ok else '>'} {FP_EPE_TOLERANCE_PX})"


def choose_cpu_default(candidates: list[BackendCandidate]) -> tuple[BackendCandidate, dict[str, str]]:
    """The fastest admissible candidate, and every candidate's verdict ("backend/precision" -> reason)."""
    references = [c for c in candidates if c.key == REFERENCE]
    if not references:
        raise ValueError("the candidates must include the reference, PyTorch fp32")
    reference = references[0]
    verdicts, admissible = {}, []
    for candidate in candidates:
        ok, reason = verdict(candidate, reference)
        verdicts["/".join(candidate.key)] = ("admissible: " if ok else "rejected: ") + reason
        if ok:
            admissible.append(candidate)
    return min(admissible, key=lambda c: c.median_ms), verdicts
