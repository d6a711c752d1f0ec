"""The stereo-kd command line end to end on small generated data (in-process, CPU)."""

import json

import numpy as np
import pytest
import torch

from stereo_kd_core.checkpoint import save_checkpoint
from stereo_kd_core.cli import main
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
                 str(tmp_path / "r.png"), "--out", str(tmp_path / "out")]) == 0
    disparity = read_pfm(tmp_path / "out" / "disparity.pfm")
    assert disparity.shape == (48, 100)
    assert np.nanmedian(disparity) == pytest.approx(8.0, abs=0.5)
    assert (tmp_path / "out" / "disparity.png").stat().st_size > 0


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
