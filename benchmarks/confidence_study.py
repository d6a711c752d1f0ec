"""How well the shipped network's confidence ranks its errors and what it means (issue 26).

1. Cues (stereo_kd_core.models.confidence) of the shipped `dsnet-fast`, run as the estimator runs
   it on the CPU (its measured precision), on generated pairs with ground truth (the photograph
   generator, fresh seed and scikit-image photographs the network never trained on) and on the
   validation pairs: ../shared/realval (16 real pairs) and Motorcycle. Optionally the network's own
   left-right consistency (a second, mirrored pass) as an extra cue, to measure what it would add.
2. Fit the calibration (logistic model on the cues, then an isotonic map to P(|error| <= 2 px)) on
   the GENERATED pairs only, and write it next to the weights (`--write-table`).
3. Score candidates per data set: sparsification (bad-2 after dropping the x % least confident
   pixels, against an oracle that drops the worst), its area, calibration error (10 bins) and
   the kept fraction / bad-2 at candidate thresholds. Writes benchmarks/results/confidence_*.json
   and prints the README's tables.

    PYTHONPATH=. python benchmarks/confidence_study.py --realval ../shared/realval --write-table
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import numpy as np
import torch

from stereo_kd_core.data.photo_stereo import PhotoStereoGenerator
from stereo_kd_core.data.recordings import scale_sample
from stereo_kd_core.estimator import PRECISIONS, StereoEstimator
from stereo_kd_core.evaluate import motorcycle_sample
from stereo_kd_core.models.confidence import (
    CUE_NAMES,
    ConfidenceCalibration,
    calibration_path,
    cue_features,
)
from stereo_kd_core.models.frames import StereoNetwork

RESULTS = Path(__file__).resolve().parent / "results"
BAD_PX = 2.0
DROP_FRACTIONS = (0.1, 0.2, 0.3)
AUC_FRACTIONS = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ECE_BINS = 10
ISOTONIC_KNOTS = 10
FIT_PIXELS_PER_PAIR = 40000
GENERATED = {"seed": 9026, "height": 320, "width": 512, "max_disparity": 160}  # scenes up to 128 px


def load_pairs(realval: Path | None) -> dict[str, list[dict]]:
    """{dataset: [sample, ...]} of the validation pairs (never fitted on)."""
    from stereo_kd_core.data.io import read_image_rgb, read_pfm

    groups: dict[str, list[dict]] = {}
    if realval is not None:
        for case in sorted(p for p in realval.iterdir() if (p / "im0.png").is_file()):
            disparity = read_pfm(case / "disp0GT.pfm").astype(np.float32)
            disparity[~np.isfinite(disparity) | (disparity <= 0)] = np.nan
            groups.setdefault(case.name.split("_")[0], []).append(
                {"left": read_image_rgb(case / "im0.png"), "right": read_image_rgb(case / "im1.png"),
                 "disparity": disparity, "name": case.name})
    groups["motorcycle"] = [motorcycle_sample()]
    return groups


class CueRunner:
    """The shipped network as the estimator runs it (device, precision, layout), returning cues."""

    def __init__(self, model: str, with_lr: bool):
        loaded = StereoEstimator.load(model, device="cpu", precision="auto")
        # a model run at a scale of its own (the default): its network on pairs resized by it
        self.scale = getattr(loaded, "scale", 1.0)
        self.estimator = getattr(loaded, "inner", loaded)
        self.network = self.estimator.network
        self.with_lr = False  # also the left-right consistency (a second, mirrored pass)
        self.with_bilinear = False  # also today's peak: cost resolution, bilinear (a second pass)
        self.lr_wanted = with_lr

    @torch.inference_mode()
    def _infer(self, left: np.ndarray, right: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = torch.from_numpy(np.stack([left, right])).permute(0, 3, 1, 2).float() / 255.0
        dtype = PRECISIONS[self.estimator.precision]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return self.network.infer_with_cues(images[0:1], images[1:2])

    def __call__(self, sample: dict) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        left, right = sample["left"], sample["right"]
        if left.ndim == 2:
            left, right = np.repeat(left[..., None], 3, -1), np.repeat(right[..., None], 3, -1)
        start = time.perf_counter()
        disparity, cues = self._infer(left, right)
        elapsed_ms = 1e3 * (time.perf_counter() - start)
        out = {k: v[0].numpy() for k, v in cues.items()}
        disparity = disparity[0].numpy()
        if self.with_bilinear:
            self.network.upsample_cues = types.MethodType(StereoNetwork.upsample_cues, self.network)
            try:
                out["peak_bilinear"] = self._infer(left, right)[1]["peak"][0].numpy()
            finally:
                del self.network.upsample_cues
        if self.with_lr:  # the right view's disparity: the mirrored pair through the same network
            mirrored, _ = self._infer(np.ascontiguousarray(right[:, ::-1]), np.ascontiguousarray(left[:, ::-1]))
            right_disparity = mirrored[0].numpy()[:, ::-1]
            columns = np.arange(disparity.shape[1])[None, :] - disparity
            index = np.clip(np.rint(columns), 0, disparity.shape[1] - 1).astype(np.int64)
            out["lr"] = np.abs(disparity - np.take_along_axis(right_disparity, index, axis=1))
        return disparity, out, elapsed_ms


def collect(runner: CueRunner, samples, max_disparity: float, subsample: int | None, rng) -> list[dict]:
    """Per pair: error |pred - gt| (in the pair's pixels) and cues over the pixels with ground truth
    (optionally a random subset). A scaled model sees the pair resized; its errors are brought back
    to the pair's pixels, so "within 2 px" means what a caller of that model gets."""
    pairs = []
    for sample in samples:
        sample = scale_sample(sample, runner.scale)
        disparity, cues, elapsed_ms = runner(sample)
        gt = sample["disparity"]
        valid = np.isfinite(gt) & (gt > 0) & (gt < max_disparity)
        index = np.flatnonzero(valid)
        if subsample is not None and index.size > subsample:
            index = rng.choice(index, subsample, replace=False)
        error = np.abs(disparity.ravel()[index] - gt.ravel()[index]) / runner.scale
        error[~np.isfinite(error)] = np.inf
        pairs.append({"name": sample["name"], "error": error.astype(np.float32), "ms": elapsed_ms,
                      "cues": {k: v.ravel()[index].astype(np.float32) for k, v in cues.items()}})
        print(f"  {sample['name']}: {index.size} px, bad-2 {100 * np.mean(error > BAD_PX):.1f} %, "
              f"{elapsed_ms:.0f} ms", flush=True)
    return pairs


def save_pairs(path: Path, pairs: list[dict]) -> None:
    arrays = {"names": np.array([p["name"] for p in pairs]), "ms": np.array([p["ms"] for p in pairs])}
    for i, pair in enumerate(pairs):
        arrays[f"{i}/error"] = pair["error"]
        arrays.update({f"{i}/cue/{k}": v for k, v in pair["cues"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_saved_pairs(path: Path) -> list[dict]:
    with np.load(path, allow_pickle=False) as data:
        pairs = [{"name": str(name), "ms": float(ms), "error": data[f"{i}/error"], "cues": {}}
                 for i, (name, ms) in enumerate(zip(data["names"], data["ms"], strict=True))]
        for key in data.files:
            if "/cue/" in key:
                i, _, cue = key.split("/")
                pairs[int(i)]["cues"][cue] = data[key]
    return pairs


def cached(cache: Path | None, name: str, make) -> list[dict]:
    path = None if cache is None else cache / f"{name}.npz"
    if path is not None and path.is_file():
        return load_saved_pairs(path)
    pairs = make()
    if path is not None:
        save_pairs(path, pairs)
    return pairs


def fit_logistic(features: np.ndarray, correct: np.ndarray, l2: float = 1e-4) -> tuple[np.ndarray, float]:
    """Weights and bias of P(correct) = sigmoid(features . w + b), by L-BFGS on the mean log loss."""
    x = torch.from_numpy(features).double()
    y = torch.from_numpy(correct.astype(np.float64))
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights = (w / std).detach()
    return weights.numpy(), float((b - (mean / std) @ w).detach())


def fit_isotonic(score: np.ndarray, correct: np.ndarray, knots: int) -> tuple[list[float], list[float]]:
    """Monotone map score -> P(correct): equal-count bins of the score, pool-adjacent-violators on
    the bins' correct fractions; knots at the bins' mean scores, ends at 0 and 1."""
    order = np.argsort(score, kind="stable")
    bins = np.array_split(order, knots)
    xs = [float(score[b].mean()) for b in bins]
    blocks = [[float(correct[b].mean()), float(b.size)] for b in bins]  # [value, weight] per bin
    merged: list[list] = []  # [value, weight, count of bins]
    for value, weight in blocks:
        merged.append([value, weight, 1])
        while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
            v2, w2, n2 = merged.pop()
            v1, w1, n1 = merged.pop()
            merged.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    ys = [value for value, _, count in merged for _ in range(count)]
    return [0.0, *xs, 1.0], [ys[0], *ys, ys[-1]]


def fit_table(pairs: list[dict], cues: tuple[str, ...], note: str) -> dict:
    """The calibration table (ConfidenceCalibration's format) fitted on `pairs`."""
    features = np.concatenate([features_of(p, cues) for p in pairs])
    correct = np.concatenate([p["error"] <= BAD_PX for p in pairs])
    weights, bias = fit_logistic(features, correct)
    score = 1.0 / (1.0 + np.exp(-(features @ weights + bias)))
    knots_x, knots_y = fit_isotonic(score, correct, ISOTONIC_KNOTS)
    return {"cues": list(cues), "weights": [float(w) for w in weights], "bias": bias,
            "isotonic": {"x": knots_x, "y": knots_y}, "target": f"P(|error| <= {BAD_PX:g} px)",
            "fitted_on": note, "pixels": int(correct.size), "fraction_correct": float(correct.mean())}


def features_of(pair: dict, cues: tuple[str, ...]) -> np.ndarray:
    return cue_features({k: torch.from_numpy(v) for k, v in pair["cues"].items()}, cues).numpy()


def confidence_of(pair: dict, candidate) -> np.ndarray:
    if isinstance(candidate, ConfidenceCalibration):
        return candidate({k: torch.from_numpy(v) for k, v in pair["cues"].items()}).numpy()
    return candidate(pair["cues"])


def scene_scores(error: np.ndarray, confidence: np.ndarray) -> dict:
    """Sparsification, its area, calibration error and threshold figures of one scene."""
    wrong = error > BAD_PX
    n = wrong.size
    by_confidence = wrong[np.argsort(confidence, kind="stable")]  # least confident first
    by_error = np.sort(wrong)[::-1]  # oracle: wrong pixels dropped first

    def bad_after_drop(ranked: np.ndarray, fraction: float) -> float:
        return 100.0 * float(ranked[int(round(fraction * n)):].mean())

    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, ECE_BINS - 1)
    ece = sum(abs(float(confidence[which == b].mean()) - float((~wrong[which == b]).mean())) * np.sum(which == b) / n
              for b in range(ECE_BINS) if np.any(which == b))
    return {
        "bad2": 100.0 * float(wrong.mean()),
        "drop": {f"{f:g}": bad_after_drop(by_confidence, f) for f in DROP_FRACTIONS},
        "oracle": {f"{f:g}": bad_after_drop(by_error, f) for f in DROP_FRACTIONS},
        "auc": float(np.mean([bad_after_drop(by_confidence, f) for f in AUC_FRACTIONS])),
        "auc_oracle": float(np.mean([bad_after_drop(by_error, f) for f in AUC_FRACTIONS])),
        "ece": float(ece),
        "mean_confidence": float(confidence.mean()),
        "thresholds": {f"{t:g}": {"kept": 100.0 * float(np.mean(confidence >= t)),
                                  "bad2_kept": 100.0 * float(wrong[confidence >= t].mean())
                                  if np.any(confidence >= t) else float("nan")} for t in THRESHOLDS},
    }


def mean_scores(scenes: list[dict]) -> dict:
    """Mean over scenes of every figure (nested dicts averaged key by key)."""
    def average(values):
        if isinstance(values[0], dict):
            return {k: average([v[k] for v in values]) for k in values[0]}
        return float(np.nanmean(values))
    return average(scenes)


def report(groups: dict[str, list[dict]], candidates: dict) -> dict:
    result = {}
    for candidate_name, candidate in candidates.items():
        result[candidate_name] = {}
        for dataset, pairs in groups.items():
            confidences = [confidence_of(p, candidate) for p in pairs]
            if any(np.isnan(c).any() for c in confidences):  # a cue measured on the validation pairs only
                continue
            scenes = [scene_scores(p["error"], c) | {"name": p["name"]}
                      for p, c in zip(pairs, confidences, strict=True)]
            result[candidate_name][dataset] = {"mean": mean_scores([{k: v for k, v in s.items() if k != "name"}
                                                                     for s in scenes]), "scenes": scenes}
    return result


def markdown(result: dict, datasets: list[str], chosen: str, threshold_keys: tuple[str, ...]) -> str:
    lines = ["| confidence | data | bad-2 all | drop 10 % (oracle) | drop 20 % (oracle) | drop 30 % (oracle) "
             "| AUC (oracle) | calib. error |", "|---|---|---|---|---|---|---|---|"]
    for name, per_dataset in result.items():
        for dataset in [d for d in datasets if d in per_dataset]:
            m = per_dataset[dataset]["mean"]
            drops = " | ".join(f"{m['drop'][k]:.1f} ({m['oracle'][k]:.1f})" for k in m["drop"])
            lines.append(f"| {name} | {dataset} | {m['bad2']:.1f} | {drops} | {m['auc']:.2f} ({m['auc_oracle']:.2f}) "
                         f"| {m['ece']:.3f} |")
    lines += ["", f"Thresholds ({chosen}): kept % of ground-truth pixels / bad-2 % of the kept ones",
              "", "| data | " + " | ".join(f">= {t}" for t in threshold_keys) + " |",
              "|---|" + "---|" * len(threshold_keys)]
    for dataset in datasets:
        t = result[chosen][dataset]["mean"]["thresholds"]
        lines.append(f"| {dataset} | " + " | ".join(f"{t[k]['kept']:.1f} / {t[k]['bad2_kept']:.1f}"
                                                     for k in threshold_keys) + " |")
    return "\n".join(lines)


def confidence_latency_ms(network, height: int, width: int, runs: int = 15) -> dict:
    """Median CPU time of the confidence's own work at one input size, in the estimator's precision:
    today's (cost-resolution peak, bilinear) against the full-resolution cues + calibration, on
    tensors of the network's shapes (the rest of the forward is the same for both)."""
    from stereo_kd_core.models.blocks import convex_weights, soft_argmin
    from stereo_kd_core.models.confidence import distribution_statistics, image_cues

    stride = network.cost_stride
    padded = [-(-size // network.stride) * network.stride for size in (height, width)]
    h, w = padded[0] // stride, padded[1] // stride
    knots = [float(v) for v in np.linspace(0, 1, ISOTONIC_KNOTS + 2)]
    calibration = network.confidence_calibration or ConfidenceCalibration(  # a table of the shipped size
        {"cues": list(CUE_NAMES), "weights": [0.1] * len(CUE_NAMES), "bias": 0.0,
         "isotonic": {"x": knots, "y": knots}})
    logits = torch.randn(1, network.num_disparities, h, w)
    mask = convex_weights(torch.randn(1, 9 * stride * stride, h, w), stride)
    disparity, unrefined = torch.rand(1, h * stride, w * stride) * 50, torch.rand(1, h * stride, w * stride) * 50
    left, right = torch.rand(1, 3, h * stride, w * stride), torch.rand(1, 3, h * stride, w * stride)
    levels = soft_argmin(logits)

    def today():
        peak = distribution_statistics(logits, levels)[0]
        return torch.nn.functional.interpolate(peak.unsqueeze(1), size=disparity.shape[-2:], mode="bilinear")

    def full_resolution():
        peak, spread = distribution_statistics(logits, levels)  # as StereoNetwork.infer_with_cues
        edge = torch.nn.functional.max_pool2d(levels.unsqueeze(1), 3, 1, 1) + \
            torch.nn.functional.max_pool2d(-levels.unsqueeze(1), 3, 1, 1)
        up = network.upsample_cues(torch.stack([peak, spread * stride, edge[:, 0] * stride], dim=1), mask)
        cues = {"peak": up[:, 0], "spread": up[:, 1], "coarse_edge": up[:, 2],
                "refinement": (disparity - unrefined).abs(), "disparity": disparity,
                **image_cues(disparity, left, right)}
        return calibration(cues)

    def whole_forward():  # for scale: the network's eval forward, confidence included
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return network(left[:, :, :height, :width], right[:, :, :height, :width])

    times = {}
    with torch.inference_mode():
        for name, fn in (("today_ms", today), ("full_resolution_ms", full_resolution), ("forward_ms", whole_forward)):
            fn()
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                samples.append(1e3 * (time.perf_counter() - start))
            times[name] = float(np.median(samples))
    return times | {"added_ms": times["full_resolution_ms"] - times["today_ms"]}


def write_latency(network) -> None:
    latency = {f"{h}x{w}": confidence_latency_ms(network, h, w) for h, w in ((384, 640), (480, 640))}
    print(f"confidence cost on the CPU (2 threads, ms): {json.dumps(latency)}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "confidence_latency_cpu.json").write_text(json.dumps(latency, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dsnet-fast", help="registry name or checkpoint of the network")
    parser.add_argument("--realval", type=Path, default=None, help="folder of real validation pairs (never fitted)")
    parser.add_argument("--generated-n", type=int, default=120, help="generated pairs to fit the calibration on")
    parser.add_argument("--textures", nargs="*", default=["/usr/share/wallpapers", "/usr/share/backgrounds"],
                        help="photograph folders for the generated pairs (besides scikit-image's)")
    parser.add_argument("--lr", action="store_true", help="also measure the left-right consistency cue (2 passes)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the collected errors and cues in this folder (.npz) and reuse them when there")
    parser.add_argument("--write-table", action="store_true", help="write the fitted table next to the weights")
    parser.add_argument("--latency-only", action="store_true", help="only time the confidence's cost (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runner = CueRunner(args.model, args.lr)
    if args.latency_only:
        write_latency(runner.network)
        return
    max_disparity = float(runner.network.max_disparity)
    rng = np.random.default_rng(0)
    print(f"generated pairs ({GENERATED}):", flush=True)
    generator = PhotoStereoGenerator(GENERATED["height"], GENERATED["width"], GENERATED["max_disparity"],
                                     seed=GENERATED["seed"], textures=args.textures or None, builtin_photos=True)
    generated = cached(args.cache, f"generated_{args.generated_n}", lambda: collect(
        runner, (generator.sample(i) for i in range(args.generated_n)), max_disparity, FIT_PIXELS_PER_PAIR, rng))
    half = len(generated) // 2
    validation = {}
    runner.with_bilinear, runner.with_lr = True, runner.lr_wanted  # on the validation pairs only
    for dataset, samples in load_pairs(args.realval).items():
        print(f"{dataset}:", flush=True)
        validation[dataset] = cached(args.cache, dataset,
                                     lambda s=samples: collect(runner, s, max_disparity, None, rng))

    note = (f"{args.generated_n} generated pairs (PhotoStereoGenerator {GENERATED}, scikit-image photographs "
            f"and {args.textures}), {FIT_PIXELS_PER_PAIR} random pixels each")
    all_cues = tuple(CUE_NAMES)
    candidates = {
        "peak, cost resolution (bilinear)": lambda c: c["peak_bilinear"],
        "peak, full resolution (convex)": lambda c: c["peak"],
        "-spread": lambda c: -c["spread"],
        "-refinement": lambda c: -c["refinement"],
        "calibrated peak + spread": ConfidenceCalibration(fit_table(generated, ("peak", "spread"), note)),
        "calibrated all cues": ConfidenceCalibration(fit_table(generated, all_cues, note)),
    }
    # held-out check of the fit on generated pairs: fitted on the first half, scored on the second
    held_out = ConfidenceCalibration(fit_table(generated[:half], all_cues, "first half"))
    if args.lr:  # as a ranking only (its calibration would need a second pass on the generated pairs too)
        candidates["-left-right difference"] = lambda c: -c["lr"]
    groups = {"generated (held out)": generated[half:], **validation}
    for pair in generated:
        pair["cues"].setdefault("peak_bilinear", np.full_like(pair["cues"]["peak"], np.nan))
        pair["cues"].setdefault("lr", np.full_like(pair["cues"]["peak"], np.nan))
    result = report(groups, candidates)
    result["calibrated all cues, fitted on the first half"] = report({"generated (held out)": generated[half:]},
                                                                       {"x": held_out})["x"]
    chosen = "calibrated all cues"
    table = candidates[chosen].table
    RESULTS.mkdir(exist_ok=True)
    summary = {k: {d: v["mean"] for d, v in per.items()} for k, per in result.items()}
    out = RESULTS / ("confidence_study.json" if args.model == "dsnet-fast" else
                     f"confidence_study_{Path(args.model).stem if args.model.endswith('.pt') else args.model}.json")
    out.write_text(json.dumps(
        {"model": args.model, "precision": runner.estimator.precision, "input_scale": runner.scale,
         "generated": GENERATED, "table": table, "means": summary, "details": result}, indent=1, default=float) + "\n")
    print(markdown({k: v for k, v in result.items() if k != "calibrated all cues, fitted on the first half"},
                   list(groups), chosen, tuple(f"{t:g}" for t in THRESHOLDS)))
    if args.write_table:
        from stereo_kd_core import registry

        if Path(args.model).suffix == ".pt":
            path = calibration_path(args.model)
        elif runner.scale != 1.0:  # the weights file's own table is its 1x entry's: this entry gets one of its own
            path = registry.shipped_calibration(args.model) or registry.WEIGHTS_DIR / f"{args.model}.confidence.json"
        else:
            path = calibration_path(registry.resolve_shipped(args.model)[0])
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}" + ("" if runner.scale == 1.0 or registry.shipped_calibration(args.model) else
                                 f'; name it in the manifest entry: "confidence": "{path.name}"'))


if __name__ == "__main__":
    main()
