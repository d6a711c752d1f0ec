"""`stereo-kd`: train, distill, adapt, evaluate, predict, benchmark, export, generate data, inspect models."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from stereo_kd_core.allocator import keep_freed_memory


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")


def _model(args: argparse.Namespace) -> str:
    """--model as given, or the registry's default student (the one default of every command)."""
    from stereo_kd_core import registry

    return registry.default_model() if args.model is None else args.model


def _load_estimator(args: argparse.Namespace) -> tuple:
    """(estimator, registry.describe_estimator of it): what runs, and what every output says ran."""
    from stereo_kd_core import StereoEstimator, registry

    model = _model(args)
    estimator = StereoEstimator.load(model, device=args.device, precision=args.precision,
                                     max_disparity=args.max_disparity, compile=getattr(args, "compile", False),
                                     threads=getattr(args, "threads", 0) or None,
                                     input_scale=getattr(args, "input_scale", 1.0),
                                     align_rows=getattr(args, "align_rows", True))
    return estimator, registry.describe_estimator(estimator, model)


MODEL_HELP = ("registry name (see `stereo-kd info --list`), checkpoint path, ONNX model (*.onnx, run in "
              "onnxruntime), or 'sgbm' (OpenCV SGBM); default: the shipped default student")
PRECISION_HELP = ("inference precision (default auto: fp16 on CUDA, the shipped model's measured CPU default on "
                  "the CPU; fp16 needs CUDA; ONNX: fp16 = TensorRT fp16 engine; int8: networks on the CPU, "
                  "quantised and compiled per input size in the background, needs torchao)")


def _add_estimator_args(parser: argparse.ArgumentParser, model_flag: bool = True, input_scale: bool = True) -> None:
    """--model (or, for bench, a positional model), --device, --precision, --max-disparity and
    (where an estimator runs on pairs) --input-scale."""
    if model_flag:
        parser.add_argument("--model", "--checkpoint", dest="model", default=None, help=MODEL_HELP)
    else:
        parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available; ONNX: TensorRT > CUDA > CPU), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
                        help=PRECISION_HELP)
    parser.add_argument("--max-disparity", type=int, default=192, help="largest disparity searched, pixels")
    if not input_scale:
        return
    parser.add_argument("--input-scale", type=float, default=1.0,
                        help="run on each pair resized by this factor, the disparity brought back to its size "
                             "(above 1: more exact for about the square of the factor in time, while the "
                             "enlarged disparities stay within the model's range; README 'Input scale')")
    parser.add_argument("--no-align-rows", dest="align_rows", action="store_false",
                        help="run each pair as given (default: where the right view's rows lie against the left's, "
                             "an offset, a tilt, a stretch, is measured and taken out first; README 'Rows that do "
                             "not line up')")


def _add_min_confidence_arg(parser: argparse.ArgumentParser, meaning: str) -> None:
    from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE

    parser.add_argument("--min-confidence", type=_unit_interval, default=DEFAULT_MIN_CONFIDENCE,
                        help=f"{meaning} (default {DEFAULT_MIN_CONFIDENCE:g}, the node's; confidence c = "
                             "P(|error| <= 2 px))")


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from stereo_kd_core.train import run_training

    overrides = dict(item.split("=", 1) for item in args.set or [])
    if args.init_from is not None:
        overrides["train.init_from"] = args.init_from
    path = run_training(args.recipe, out_dir=args.out, resume=args.resume, overrides=overrides,
                        max_steps=args.max_steps)
    print(f"final checkpoint: {path}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from stereo_kd_core.registry import describe_line
    from stereo_kd_core.train.adapt import run_adapt

    overrides: dict = dict(item.split("=", 1) for item in args.set or [])
    for key, value in (("train.steps", args.steps), ("adapt.holdout", args.holdout),
                       ("adapt.every", args.every), ("adapt.min_confidence", args.min_confidence),
                       ("adapt.drop_worst", args.drop_worst), ("adapt.photometric", args.photometric),
                       ("adapt.replay_synthetic", args.replay_synthetic)):
        if value is not None:
            overrides[key] = value
    topics = {"left_image": args.left_image_topic, "right_image": args.right_image_topic,
              "left_info": args.left_info_topic, "right_info": args.right_info_topic}
    report = run_adapt(args.data, args.out, teacher=args.teacher, init=args.init, recipe=args.recipe,
                       overrides=overrides, device=args.device, topics=topics, keep_anyway=args.keep_anyway)
    seconds = report["seconds"]
    print(f"student {describe_line(report['student'])}: labels {seconds['labels']:.1f} s, "
          f"training {seconds['training']:.1f} s")
    for key in ("holdout_vs_teacher", "holdout_vs_ground_truth", "synthetic_test"):
        if report.get(key):
            before, after = report[key]["before"]["mean"], report[key]["after"]["mean"]
            turned_down = report[key].get("adapted")
            note = "" if turned_down is None else f" (adapted, not kept: EPE {turned_down['mean']['epe']:.3f} px)"
            print(f"{key}: EPE {before['epe']:.3f} -> {after['epe']:.3f} px, "
                  f"bad-2 {before['bad2']:.2f} -> {after['bad2']:.2f} %{note}")
    from stereo_kd_core.train.adapt_judge import describe

    print(describe(report["judge"]))
    print(f"final checkpoint: {report['final']}; report: {Path(args.out) / 'before_after.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stereo_kd_core.evaluate import evaluate, open_eval_dataset
    from stereo_kd_core.registry import describe_line

    kwargs = {}
    if args.dataset == "synthetic":
        kwargs = {"n": args.n, "seed": args.seed, "height": args.height, "width": args.width,
                  "max_disparity": args.max_disparity, "kind": args.kind}
    estimator, ran = _load_estimator(args)
    samples = open_eval_dataset(args.dataset, args.data_root, **kwargs)

    def show(case: dict) -> None:
        if args.per_case:
            print(f"{case['name']:>24}  EPE {case['epe']:.3f}  bad2 {case['bad2']:.2f}%  D1 {case['d1']:.2f}%")

    result = evaluate(estimator, samples, max_disparity=args.max_disparity, use_nocc=args.nocc, progress=show,
                      min_confidence=args.min_confidence)
    result.update(ran, dataset=args.dataset, per_pair_ms=statistics.mean(case["ms"] for case in result["cases"]))
    mean = result["mean"]
    print(f"{args.dataset} ({len(result['cases'])} cases), {describe_line(ran)}: EPE {mean['epe']:.3f} px, "
          f"bad-1 {mean['bad1']:.2f}%, bad-2 {mean['bad2']:.2f}%, bad-3 {mean['bad3']:.2f}%, D1 {mean['d1']:.2f}%; "
          f"mean {result['per_pair_ms']:.0f} ms per pair")
    if "kept" in mean:
        print(f"confidence >= {args.min_confidence:g}: {mean['kept']:.1f}% of the pixels kept, "
              f"bad-2 {mean['bad2_kept']:.2f}% and EPE {mean['epe_kept']:.3f} px on them")
    _write_json(args.json, result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import cv2

    from stereo_kd_core.confidence import density_percent, drop_low_confidence
    from stereo_kd_core.data.io import read_image_rgb, write_image_rgb, write_pfm
    from stereo_kd_core.geometry import StereoGeometry
    from stereo_kd_core.registry import SHA256_SHOWN, describe_line
    from stereo_kd_core.viz import colorize_disparity, stereo_panel

    estimator, ran = _load_estimator(args)
    left, right = read_image_rgb(args.left), read_image_rgb(args.right)
    start = time.perf_counter()
    prediction = estimator.predict(left, right)
    ran["per_pair_ms"] = (time.perf_counter() - start) * 1e3  # a first run: includes one-time set-up
    disparity = drop_low_confidence(prediction.disparity, prediction.confidence, args.min_confidence)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_pfm(out / "disparity.pfm", disparity)
    colour = colorize_disparity(disparity, max_disparity=estimator.max_disparity)
    cv2.imwrite(str(out / "disparity.png"), cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
    # No calibration here: a nominal camera (focal = image width, unit baseline) shows the
    # shape of the scene up to scale.
    height, width = left.shape[:2]
    nominal = StereoGeometry.from_intrinsics(float(width), (width - 1) / 2, (height - 1) / 2, 1.0)
    sha = f" {ran['model_sha256'][:SHA256_SHOWN]}" if ran["model_sha256"] else ""
    title = f"{ran['model']}{sha} {ran['precision']} on {ran['device']}: {ran['per_pair_ms']:.0f} ms (first run)"
    panel = stereo_panel(left, disparity, prediction.confidence, nominal.points_from_disparity(disparity),
                         max_disparity=estimator.max_disparity, title=title)
    write_image_rgb(out / "panel.png", panel)
    density = density_percent(disparity)
    print(f"{describe_line(ran)}: {ran['per_pair_ms']:.0f} ms for this pair (a first run, one-time set-up "
          "included; `stereo-kd bench` measures steady latency)")
    print(f"wrote {out / 'disparity.pfm'}, {out / 'disparity.png'} and {out / 'panel.png'} "
          f"({density:.1f}% of the pixels at confidence >= {args.min_confidence:g})")
    rows = _rows_report(estimator)
    if rows is not None:
        print(rows["line"])
    _write_json(args.json, {**ran, "min_confidence": args.min_confidence, "density": density,
                            "mean_confidence": float(prediction.confidence.mean()),
                            **({} if rows is None else {"rows": rows["figures"]})})
    return 0


def _rows_report(estimator) -> dict | None:
    """What an estimator that aligns rows measured on its last pair: {"line": console text, "figures":
    {measured, taken_out (px: offset, tilt, stretch), swapped}}; None for one that does not align."""
    if not hasattr(estimator, "last_measurement"):
        return None
    measured, taken_out = estimator.last_measurement, estimator.last_shift
    terms = ("offset_px", "tilt_px", "scale_px")
    figures = {"measured": None if measured is None or measured.swapped
               else {term: round(getattr(measured.shift, term), 3) for term in terms},
               "taken_out": {term: round(getattr(taken_out, term), 3) for term in terms},
               "swapped": None if measured is None else measured.swapped}
    if measured is None:
        line = "rows: this pair does not say where its right rows lie (too few corners tracked both ways)"
    elif measured.swapped:
        line = "rows: left and right look swapped (the left image's corners lie to the right in the right image)"
    else:
        shift = measured.shift
        line = (f"rows: the right image's rows lie {shift.offset_px:+.2f} px from the left's at the centre "
                f"(tilt {shift.tilt_px:+.2f}, stretch {shift.scale_px:+.2f} px at the edges); "
                + ("taken out" if taken_out else "within what is left alone") + " (--no-align-rows: as given)")
    return {"line": line, "figures": figures}


def cmd_bag(args: argparse.Namespace) -> int:
    from stereo_kd_core.registry import describe_line
    from stereo_kd_ros.bag import run_bag  # rosbags only: no ROS install needed

    summary = run_bag(args.input, args.out, model=_model(args), device=args.device, precision=args.precision,
                      max_disparity=args.max_disparity, left_image_topic=args.left_image_topic,
                      right_image_topic=args.right_image_topic, left_info_topic=args.left_info_topic,
                      right_info_topic=args.right_info_topic, disparity_topic=args.disparity_topic,
                      points_topic=args.points_topic, use_color=not args.no_color, max_pairs=args.max_pairs,
                      storage=args.storage, animation=args.animation, min_confidence=args.min_confidence)
    skipped = ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items()) or "none"
    per_pair = f", {summary['per_pair_ms']:.0f} ms per pair" if summary["per_pair_ms"] is not None else ""
    print(f"wrote {summary['output']} ({summary['storage']}): {summary['pairs_processed']} pairs with "
          f"{describe_line(summary)}{per_pair}, {summary['messages_copied']} input messages copied; "
          f"skipped: {skipped}")
    _write_json(args.json, summary)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from stereo_kd_core.bench import benchmark
    from stereo_kd_core.registry import describe_line

    if args.threads:
        torch.set_num_threads(args.threads)
    estimator, _ = _load_estimator(args)
    result = benchmark(estimator, args.height, args.width, runs=args.runs, warmup=args.warmup, model=_model(args))
    result["compiled"] = bool(getattr(estimator, "compiled", False))
    line = (f"{describe_line(result)}{' compiled' if result['compiled'] else ''}, {args.height}x{args.width} "
            f"({result['machine']}): median {result['median_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms")
    if "peak_gpu_mb" in result:
        line += f", peak GPU {result['peak_gpu_mb']:.0f} MiB"
    print(line)
    _write_json(args.json, result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stereo_kd_core.export import export_model
    from stereo_kd_core.rectification import input_size
    from stereo_kd_core.registry import describe_line

    estimator, ran = _load_estimator(args)
    network = getattr(getattr(estimator, "inner", estimator), "network", None)  # a scaled model: its network
    if network is None:
        raise SystemExit(f"stereo-kd export: '{_model(args)}' is not a network; give a checkpoint or registry name")
    scale = getattr(estimator, "scale", 1.0)  # a model that runs on enlarged pairs: the graph is built enlarged
    path = export_model(network.float(), args.out, args.format, args.height, args.width, dynamic=args.dynamic,
                        model_name=estimator.name, source_sha256=ran["model_sha256"], input_scale=scale)
    graph_width, graph_height = input_size(args.width, args.height, scale)
    resized = "" if scale == 1.0 else f" (graph {graph_width}x{graph_height}: pairs are resized by {scale:g} first)"
    print(f"wrote {path} from {describe_line(ran)}{resized}")
    if args.int8_calibration_pairs:
        if args.format != "onnx" or args.dynamic:
            raise ValueError("--int8-calibration-pairs needs a fixed-size ONNX export")
        from stereo_kd_core.quantize import quantize_int8_static, synthetic_calibration_pairs

        pairs = synthetic_calibration_pairs(args.int8_calibration_pairs, graph_height, graph_width,
                                            network.max_disparity)
        int8_path = quantize_int8_static(path, path.with_name(f"{path.stem}_int8.onnx"), pairs)
        print(f"wrote {int8_path} (static int8; its EPE loss decides whether it is offered: "
              "benchmarks/cpu_backends.py)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from stereo_kd_core.data.synthetic import write_middlebury_dataset

    cases = write_middlebury_dataset(args.out, args.n, seed=args.seed, height=args.height, width=args.width,
                                     max_disparity=args.max_disparity, kind=args.kind, textures=args.textures,
                                     builtin_photos=not args.no_builtin_photos)
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from stereo_kd_core.train.label_cache import cache_teacher

    written = cache_teacher(args.teacher, args.data, top_k=args.top_k, precision=args.precision, device=args.device)
    print(f"teacher outputs written for {written} cases in {args.data}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from stereo_kd_core import registry
    from stereo_kd_core.models import ARCHITECTURES, build_model, default_config
    from stereo_kd_core.models.profile import count_flops, count_parameters

    if args.list or not args.model:
        print("architectures:", ", ".join(sorted(ARCHITECTURES)))
        print("registry (shipped weights and classical backends):", ", ".join(registry.known_model_names()))
        print("default (run when no model is given):", registry.default_model())
        return 0
    if args.model in ARCHITECTURES:
        model = build_model(default_config(args.model, max_disparity=args.max_disparity))
    else:
        from stereo_kd_core.checkpoint import load_model

        path = args.model if Path(args.model).is_file() else registry.resolve_shipped(args.model)[0]
        model = load_model(path)
    params = count_parameters(model)
    flops = count_flops(model, height=args.height, width=args.width)
    result = {"model": args.model, "parameters": params, "gflops": flops / 1e9, "height": args.height,
              "width": args.width, "config": model.config}
    print(f"{args.model}: {params / 1e6:.3f} M parameters, {flops / 1e9:.1f} GFLOPs at {args.height}x{args.width}")
    _write_json(args.json, result)
    return 0


def cmd_fetch_teacher(args: argparse.Namespace) -> int:
    from stereo_kd_core.teachers import convert_psmnet_checkpoint, fetch_psmnet_kitti2015

    source = fetch_psmnet_kitti2015(cache_dir=args.cache_dir)
    out = convert_psmnet_checkpoint(source, args.out)
    print(f"verified {source} and wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stereo-kd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, helptext in (("train", "supervised training from a YAML recipe"),
                           ("distill", "knowledge distillation from a YAML recipe with a teacher")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("recipe", help="recipe name in stereo_kd_core/recipes (e.g. dsnet) or a YAML path")
        p.add_argument("--out", default="runs/latest", help="output folder for checkpoints and logs")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        p.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many steps in total (resumable chunks)")
        p.add_argument("--init-from", default=None, metavar="CHECKPOINT|NAME",
                       help="warm start: the student's weights from a checkpoint or registry name "
                            "(same as --set train.init_from=...)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe value, dotted keys (e.g. optim.lr=1e-4); repeatable")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("adapt", help="distill a teacher into a student on your own unlabeled recordings")
    p.add_argument("--data", action="append", required=True,
                   help="rosbag2 bag (folder, .db3 or .mcap) or folder of rectified pairs (Middlebury layout, "
                        "KITTI layout, or left/ + right/ with matching names); repeatable")
    p.add_argument("--teacher", default="psmnet",
                   help="registry name (psmnet is fetched on first use), checkpoint, ONNX file, labels:DIR "
                        "(precomputed .pfm / 16-bit KITTI .png / .npy named after the frame) or none")
    p.add_argument("--init", default=None, help="student to start from: registry name or checkpoint "
                   "(default: the shipped default student)")
    p.add_argument("--out", default="runs/adapt", help="output folder: frames, label cache, checkpoints, report")
    p.add_argument("--recipe", default="adapt", help="recipe name or YAML path with the defaults")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--holdout", type=float, default=None,
                   help="fraction of each recording's last frames kept out of training (default 0.2)")
    p.add_argument("--every", type=int, default=None, help="use every Nth frame (default 1)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="pseudo-labelled pixels below this confidence do not supervise (default 0.5)")
    p.add_argument("--drop-worst", type=float, default=None,
                   help="fraction of the worst pseudo-labelled pixels per batch ignored (default 0)")
    p.add_argument("--photometric", type=float, default=None,
                   help="weight of the SSIM + L1 reconstruction and smoothness self-supervision (default 0)")
    p.add_argument("--replay-synthetic", type=float, default=None,
                   help="fraction of samples that are synthetic ground truth (default 0.1; 0 = off)")
    p.add_argument("--keep-anyway", action="store_true",
                   help="final.pt gets the best adapted weights even when the judge finds them no better than "
                        "the start (by default the start is kept and the adapted weights are left in adapted.pt)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    for side in ("left", "right"):
        p.add_argument(f"--{side}-image-topic", default=None,
                       help=f"bags: {side} rectified image topic (default /{side}/image_rect, else found by name)")
        p.add_argument(f"--{side}-info-topic", default=None,
                       help=f"bags: {side} camera_info topic (default: next to the {side} image topic)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, dotted keys (e.g. adapt.internal=null); repeatable")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("eval", help="EPE, bad-1/2/3 and D1 on a data set")
    _add_estimator_args(p)
    p.add_argument("--dataset", required=True,
                   help="motorcycle (built in), synthetic, middlebury, sceneflow, kitti2012, kitti2015, eth3d, ...")
    p.add_argument("--data-root", default=None, help="data set folder (not needed for motorcycle, synthetic)")
    p.add_argument("--n", type=int, default=200, help="synthetic: number of pairs")
    p.add_argument("--seed", type=int, default=2026, help="synthetic: seed (2026 = the fixed test split)")
    p.add_argument("--height", type=int, default=256, help="synthetic: image height")
    p.add_argument("--width", type=int, default=512, help="synthetic: image width")
    p.add_argument("--kind", choices=["photo", "planes"], default="photo",
                   help="synthetic: pairs from real photographs (the test split) or procedural planes")
    p.add_argument("--nocc", action="store_true", help="only non-occluded pixels (where the data set has a mask)")
    p.add_argument("--per-case", action="store_true", help="print every case")
    _add_min_confidence_arg(p, "also score only the pixels at or above this confidence (kept %%, bad2_kept, "
                               "epe_kept); 0: off")
    p.add_argument("--json", default=None, help="write per-case and mean figures to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="disparity of one pair: PFM + colourised PNG")
    _add_estimator_args(p)
    p.add_argument("left", help="left image")
    p.add_argument("right", help="right image")
    p.add_argument("--out", default="predict_out", help="output folder")
    _add_min_confidence_arg(p, "pixels below this confidence are left out of the outputs; 0 keeps all")
    p.add_argument("--json", default=None, help="write what ran (model, file, SHA-256, backend, device, "
                   "precision), the time per pair and the density left to this JSON file")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bag", help="estimate a recorded ROS 2 bag offline: a new bag with disparity and points2")
    _add_estimator_args(p)
    p.add_argument("input", help="rosbag2 folder (sqlite3 or MCAP) or a single .db3/.mcap file")
    p.add_argument("--out", required=True, help="output bag folder (must not exist)")
    p.add_argument("--storage", choices=["sqlite3", "mcap"], default=None,
                   help="output storage format (default: the input's)")
    p.add_argument("--left-image-topic", default="/left/image_rect", help="left rectified image topic in the bag")
    p.add_argument("--right-image-topic", default="/right/image_rect", help="right rectified image topic in the bag")
    p.add_argument("--left-info-topic", default="/left/camera_info", help="left camera_info topic in the bag")
    p.add_argument("--right-info-topic", default="/right/camera_info", help="right camera_info topic in the bag")
    p.add_argument("--disparity-topic", default="/disparity", help="topic of the added DisparityImage messages")
    p.add_argument("--points-topic", default="/points2", help="topic of the added PointCloud2 messages")
    p.add_argument("--no-color", action="store_true", help="points2 without the packed rgb field")
    p.add_argument("--max-pairs", type=int, default=None, help="estimate at most this many pairs")
    p.add_argument("--animation", default=None, metavar="FILE.gif",
                   help="also write the result panels of the first 60 pairs as an animated GIF")
    _add_min_confidence_arg(p, "pixels below this confidence are invalid in disparity and points2; 0 keeps all")
    p.add_argument("--json", default=None, help="write the summary to this JSON file")
    p.set_defaults(func=cmd_bag)

    p = sub.add_parser("bench", help="median latency and peak memory")
    _add_estimator_args(p, model_flag=False)
    p.add_argument("--height", type=int, default=384, help="input height")
    p.add_argument("--width", type=int, default=640, help="input width")
    p.add_argument("--runs", type=int, default=50, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads: torch's, or onnxruntime's intra-op threads for ONNX models (0 = default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (CUDA graphs on CUDA); falls back to eager where unavailable")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="ONNX or TorchScript file of a network")
    _add_estimator_args(p, input_scale=False)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="output format")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--height", type=int, default=576, help="input height of the exported graph")
    p.add_argument("--width", type=int, default=960, help="input width of the exported graph")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX: dynamic batch, height and width (checked against PyTorch at a second size; "
                        "refused if wrong)")
    p.add_argument("--int8-calibration-pairs", type=int, default=0, metavar="N",
                   help="also write OUT_int8.onnx, static int8 calibrated on N synthetic pairs (0: no)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="write a synthetic data set in Middlebury layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--height", type=int, default=256, help="image height")
    p.add_argument("--width", type=int, default=512, help="image width")
    p.add_argument("--max-disparity", type=int, default=192, help="disparity range of the scenes")
    p.add_argument("--kind", choices=["photo", "planes"], default="photo",
                   help="pairs from real photographs or procedural textured planes")
    p.add_argument("--textures", action="append", default=None, metavar="DIR",
                   help="kind photo: a folder of photographs for the texture pool (repeatable)")
    p.add_argument("--no-builtin-photos", action="store_true",
                   help="kind photo: leave scikit-image's photographs (the test split's textures) out of the pool")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("cache-teacher",
                       help="run a teacher once per pair of a Middlebury-layout folder and store its outputs "
                            "(CASE/teacher.npz) for cached distillation; resumable")
    p.add_argument("--teacher", required=True,
                   help="teacher checkpoint (e.g. teachers/psmnet_kitti2015.pt from stereo-kd fetch-teacher)")
    p.add_argument("--data", required=True, help="Middlebury-layout folder (e.g. written by stereo-kd synth)")
    p.add_argument("--top-k", type=int, default=8, help="disparity levels of the cost distribution kept per pixel")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="teacher precision (bf16 autocast: about 2x faster on CPUs with AMX)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("info", help="parameters and FLOPs of a model")
    p.add_argument("model", nargs="?", help="architecture, registry name or checkpoint")
    p.add_argument("--list", action="store_true", help="list architectures and registry names")
    p.add_argument("--height", type=int, default=576, help="input height for FLOPs")
    p.add_argument("--width", type=int, default=960, help="input width for FLOPs")
    p.add_argument("--max-disparity", type=int, default=192, help="max disparity of an architecture's default")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("fetch-teacher", help="download, verify and convert PSMNet's official KITTI 2015 weights")
    p.add_argument("--out", default="teachers/psmnet_kitti2015.pt", help="converted checkpoint path")
    p.add_argument("--cache-dir", default=None, help="download cache (default $STEREO_KD_CACHE or ~/.cache/stereo-kd)")
    p.set_defaults(func=cmd_fetch_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # large tensors and images every pair: reuse their pages
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"stereo-kd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
