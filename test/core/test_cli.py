"""The stereo-kd command line end to end on small generated data (in-process, CPU)."""

import json

import numpy as np
import pytest
import torch

from stereo_kd_core.checkpoint import save_checkpoint
from stereo_kd_core.cli import main
from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE
from stereo_kd_core.data.io import read_pfm, write_image_rgb
from stereo_kd_core.metrics import stereo_metrics
from stereo_kd_core.models import build_model, default_config


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "5", "--height", "64", "--width", "128",
                 "--max-disparity", "32"]) == 0
    return out


def test_synth_writes_middlebury_layout(synth_folder):
    cases = sorted(p for p in synth_folder.iterdir() if p.is_dir())
    assert len(cases) == 3
    for case in cases:
        for name in ("im0.png", "im1.png", "disp0GT.pfm", "mask0nocc.png", "calib.txt"):
            assert (case / name).is_file(), f"{case / name} missing"
        gt = read_pfm(case / "disp0GT.pfm")
        assert gt.shape == (64, 128)


def test_eval_json_matches_metrics_computed_by_hand(synth_folder, tmp_path):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", "sgbm", "--dataset", "middlebury", "--data-root", str(synth_folder),
                 "--max-disparity", "32", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert len(result["cases"]) == 3 and result["model"] == "sgbm"
    # recompute one case independently from the files
    from stereo_kd_core import StereoEstimator
    from stereo_kd_core.data.io import read_image_rgb

    case_dir = sorted(p for p in synth_folder.iterdir() if p.is_dir())[0]
    gt = read_pfm(case_dir / "disp0GT.pfm")
    gt[~np.isfinite(gt)] = np.nan
    pred = StereoEstimator.load("sgbm", max_disparity=32).predict(
        read_image_rgb(case_dir / "im0.png"), read_image_rgb(case_dir / "im1.png")).disparity
    expected = stereo_metrics(pred, gt, max_disparity=32)
    case = next(c for c in result["cases"] if c["name"] == result["cases"][0]["name"])
    assert case_dir.name in case["name"]
    for key in ("epe", "bad2", "d1"):
        assert case[key] == pytest.approx(expected[key], rel=1e-6)
    assert result["mean"]["epe"] == pytest.approx(np.mean([c["epe"] for c in result["cases"]]), rel=1e-6)


def test_predict_writes_pfm_and_png(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(48, 120, 3), dtype=np.uint8)
    write_image_rgb(tmp_path / "l.png", base[:, :100])
    write_image_rgb(tmp_path / "r.png", base[:, 8:108])
    assert main(["predict", "--model", "sgbm", "--max-disparity", "16", str(tmp_path / "l.png"),
                 str(tmp_path / "r.png"), "--out", str(tmp_path / "out"), "--json", str(tmp_path / "ran.json")]) == 0
    disparity = read_pfm(tmp_path / "out" / "disparity.pfm")
    assert disparity.shape == (48, 100)
    assert np.nanmedian(disparity) == pytest.approx(8.0, abs=0.5)
    assert (tmp_path / "out" / "disparity.png").stat().st_size > 0
    # SGBM is one flag away, and says so
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert ran["model"] == "sgbm" and ran["backend"] == "opencv" and ran["model_sha256"] is None
    assert ran["per_pair_ms"] > 0


def test_predict_says_where_the_right_rows_lie_and_what_it_took_out(tmp_path, capsys):
    from test_border import plane_pair
    from test_row_alignment import rows_moved

    left, right = plane_pair(24)
    write_image_rgb(tmp_path / "l.png", left)
    write_image_rgb(tmp_path / "r.png", rows_moved(right, 1.5))
    arguments = ["predict", "--model", "sgbm", "--max-disparity", "64", str(tmp_path / "l.png"),
                 str(tmp_path / "r.png"), "--out", str(tmp_path / "out")]
    assert main([*arguments, "--json", str(tmp_path / "ran.json")]) == 0
    rows = json.loads((tmp_path / "ran.json").read_text())["rows"]
    assert rows["measured"]["offset_px"] == pytest.approx(1.5, abs=0.05) and rows["swapped"] is False
    assert rows["taken_out"] == {"offset_px": rows["measured"]["offset_px"], "tilt_px": 0.0, "scale_px": 0.0}
    assert "rows lie +1.5" in capsys.readouterr().out
    assert main([*arguments, "--no-align-rows", "--json", str(tmp_path / "given.json")]) == 0
    assert "rows" not in json.loads((tmp_path / "given.json").read_text())


def test_info_and_bench_on_a_checkpoint(tmp_path, capsys):
    config = default_config("dsnet-fast", max_disparity=64)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "fast.pt", build_model(config), config)
    assert main(["info", str(path), "--height", "64", "--width", "96", "--json", str(tmp_path / "i.json")]) == 0
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in build_model(config).parameters())
    assert info["gflops"] > 0
    assert main(["bench", str(path), "--device", "cpu", "--height", "64", "--width", "96", "--runs", "3",
                 "--warmup", "1", "--max-disparity", "64", "--json", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["runs"] == 3 and bench["median_ms"] > 0 and bench["height"] == 64


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", "--model", "no-such-model", "--dataset", "motorcycle"]) == 2
    assert "Known models" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--dataset", "motorcycle"]) == 2
    assert "missing.pt" in capsys.readouterr().err


# --- one default everywhere ----------------------------------------------------------------
def write_stereo_bag(path, left: np.ndarray, right: np.ndarray) -> None:
    """One rectified rgb8 pair with its camera_infos on the default topics (what `stereo-kd bag` reads)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    msg = store.types
    height, width = left.shape[:2]
    header = msg["std_msgs/msg/Header"](stamp=msg["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="cam")
    roi = msg["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        for side, image, baseline_px in (("left", left, 0.0), ("right", right, 10.0)):
            projection = np.array([[100.0, 0, width / 2, -baseline_px], [0, 100.0, height / 2, 0], [0, 0, 1, 0]])
            info = msg["sensor_msgs/msg/CameraInfo"](
                header=header, height=height, width=width, distortion_model="plumb_bob", d=np.zeros(5),
                k=projection[:, :3].ravel(), r=np.eye(3).ravel(), p=projection.ravel(), binning_x=0, binning_y=0,
                roi=roi)
            rgb = msg["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="rgb8",
                                               is_bigendian=0, step=width * 3, data=image.reshape(-1).copy())
            for topic, message in ((f"/{side}/camera_info", info), (f"/{side}/image_rect", rgb)):
                connection = writer.add_connection(topic, message.__msgtype__, typestore=store)
                writer.write(connection, 1, bytes(store.serialize_cdr(message, message.__msgtype__)))


def test_estimator_commands_default_to_the_shipped_student_at_auto_precision(tmp_path, monkeypatch, capsys):
    """predict, eval, bench and bag without --model, --device or --precision run the registry's default
    student at precision auto; their JSON and console lines say what ran."""
    from stereo_kd_core import estimator as estimator_module
    from stereo_kd_core import registry

    # auto = bf16 on the CPU (fp16 on CUDA): never the fp32 a forgotten default would give
    monkeypatch.setattr(estimator_module, "cpu_has_native_bf16", lambda: True)
    default = registry.default_model()
    entry = registry.shipped_models()[default]
    device = estimator_module.resolve_device("auto")
    expected = {"model": default, "model_sha256": entry["sha256"], "backend": "pytorch", "device": device,
                "precision": estimator_module.resolve_precision("auto", device, default)}
    assert expected["precision"] != "fp32"
    line = registry.describe_line({**expected, "model_file": entry["file"], "channels_last": device == "cuda"
                                   or entry["cpu_default"]["backend"] == "pytorch-channels-last"})

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(64, 136, 3), dtype=np.uint8)
    left, right = base[:, 8:], base[:, :128]  # disparity 8
    write_image_rgb(tmp_path / "l.png", left)
    write_image_rgb(tmp_path / "r.png", right)
    write_stereo_bag(tmp_path / "in", left, right)
    commands = {
        "predict": ["predict", str(tmp_path / "l.png"), str(tmp_path / "r.png"), "--out", str(tmp_path / "p")],
        "eval": ["eval", "--dataset", "synthetic", "--n", "1", "--height", "64", "--width", "128"],
        "bench": ["bench", "--height", "64", "--width", "128", "--runs", "1", "--warmup", "0"],
        "bag": ["bag", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
    }
    for name, command in commands.items():
        report = tmp_path / f"{name}.json"
        assert main([*command, "--json", str(report)]) == 0, name
        result = json.loads(report.read_text())
        assert {key: result[key] for key in expected} == expected, name
        assert result["model_file"] == str(registry.WEIGHTS_DIR / entry["file"]), name
        assert line in capsys.readouterr().out, name
        timing = {"predict": "per_pair_ms", "eval": "per_pair_ms", "bench": "median_ms", "bag": "per_pair_ms"}[name]
        assert result[timing] > 0, name
    # the student's disparity, NaN exactly where its confidence is under the default threshold (on this
    # 64x128 noise pair the student is far off and says so: few or no pixels are kept)
    disparity = read_pfm(tmp_path / "p" / "disparity.pfm")
    predicted = json.loads((tmp_path / "predict.json").read_text())
    assert predicted["min_confidence"] == DEFAULT_MIN_CONFIDENCE
    assert np.isfinite(disparity).mean() * 100 == pytest.approx(predicted["density"], abs=1e-6)


def test_adapt_starts_from_the_default_student_and_says_so(tmp_path, capsys):
    from stereo_kd_core import registry
    from stereo_kd_core.data.synthetic import write_middlebury_dataset

    cases = write_middlebury_dataset(tmp_path / "frames", 2, seed=3, height=64, width=128, max_disparity=32,
                                     kind="planes")
    (tmp_path / "labels").mkdir()
    for case in cases:  # the ground truth as the teacher's labels: no teacher network to run
        name = case.rsplit("/", 1)[-1]
        (tmp_path / "labels" / f"{name}.pfm").write_bytes((tmp_path / "frames" / name / "disp0GT.pfm").read_bytes())
    fast = {"data.crop": [64, 128], "train.batch_size": 1, "train.log_every": 1,
            "data.train": {"name": "synthetic", "n": 2, "seed": 21, "height": 64, "width": 128, "max_disparity": 32},
            "adapt.replay_synthetic": 0.0,
            "adapt.evaluation": {"synthetic_n": 1, "synthetic_height": 64, "synthetic_width": 128}}
    command = ["adapt", "--data", str(tmp_path / "frames"), "--out", str(tmp_path / "run"), "--teacher",
               f"labels:{tmp_path / 'labels'}", "--device", "cpu", "--steps", "1", "--holdout", "0"]
    for key, value in fast.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    assert main(command) == 0
    report = json.loads((tmp_path / "run" / "before_after.json").read_text())
    default = registry.default_model()
    assert report["init"] == default
    assert report["student"]["model_sha256"] == registry.shipped_models()[default]["sha256"]
    assert f"student {registry.describe_line(report['student'])}: labels" in capsys.readouterr().out
