"""Evaluation of any StereoEstimator on a data set: per-case and mean metrics."""

from __future__ import annotations

import time
from collections.abc import Iterable

from stereo_kd_core.data.motorcycle import motorcycle_geometry, motorcycle_sample  # noqa: F401 (re-exported)
from stereo_kd_core.estimator import StereoEstimator


def open_eval_dataset(name: str, root: str | None = None, **kwargs) -> Iterable[dict]:
    """A data set by name; "motorcycle" is built in, the rest come from stereo_kd_core.data."""
    if name == "motorcycle":
        return [motorcycle_sample()]
    from stereo_kd_core.data import open_dataset

    return open_dataset(name, root, **kwargs)


def evaluate(estimator: StereoEstimator, samples: Iterable[dict], max_disparity: int | None = None,
             use_nocc: bool = False, progress=None) -> dict:
    """Run the estimator on every sample that has ground truth; returns {"cases": [...], "mean": {...}}."""
    from stereo_kd_core.metrics import aggregate_metrics, stereo_metrics

    max_disparity = max_disparity or estimator.max_disparity
    cases = []
    for sample in samples:
        if sample.get("disparity") is None:
            continue
        start = time.perf_counter()
        prediction = estimator.predict(sample["left"], sample["right"])
        elapsed_ms = (time.perf_counter() - start) * 1e3
        mask = sample.get("nocc") if use_nocc else None
        metrics = stereo_metrics(prediction.disparity, sample["disparity"], max_disparity=max_disparity, mask=mask)
        metrics.update(name=sample["name"], ms=elapsed_ms)
        cases.append(metrics)
        if progress is not None:
            progress(metrics)
    if not cases:
        raise ValueError("no sample with ground truth disparity in the data set")
    numeric = [{k: v for k, v in c.items() if k not in ("name",)} for c in cases]
    return {"model": estimator.name, "max_disparity": max_disparity, "cases": cases,
            "mean": aggregate_metrics(numeric)}
