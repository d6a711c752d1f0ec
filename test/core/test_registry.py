"""Registry names resolve to shipped weights, verified against their SHA-256 at load."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.checkpoint import CheckpointError, save_checkpoint, sha256_of_file
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.scaled_estimator import ScaledEstimator, SmallPairs


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A weights folder laid out like the package's: manifest.json + checkpoint files."""
    config = default_config("dsnet-fast", max_disparity=64)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "tiny-fast.pt", build_model(config), config)
    manifest = {"models": {"tiny-fast": {"file": path.name, "sha256": sha256_of_file(path)}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(registry, "MANIFEST_PATH", tmp_path / "manifest.json")
    return path


def test_registry_name_loads_the_shipped_file(shipped):
    assert "tiny-fast" in registry.known_model_names() and "sgbm" in registry.known_model_names()
    estimator = StereoEstimator.load("tiny-fast", device="cpu", max_disparity=64)
    assert estimator.name == "tiny-fast"
    left = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    assert estimator.predict(left, left).disparity.shape == (40, 70)


def test_a_shipped_file_that_changed_is_refused(shipped):
    data = bytearray(shipped.read_bytes())
    data[-10] ^= 0xFF
    shipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        StereoEstimator.load("tiny-fast", device="cpu")


def test_an_architecture_without_weights_says_so(shipped):
    with pytest.raises(ValueError, match="no weights shipped"):
        StereoEstimator.load("acv-teacher")


def test_auto_precision_follows_the_manifests_measured_cpu_default(shipped, monkeypatch):
    from stereo_kd_core import estimator as estimator_module

    manifest = json.loads(registry.MANIFEST_PATH.read_text())
    manifest["models"]["tiny-fast"]["cpu_default"] = {"backend": "pytorch", "precision": "bf16"}
    registry.MANIFEST_PATH.write_text(json.dumps(manifest))
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(estimator_module, "cpu_has_native_bf16", lambda native=native: native)
        loaded = StereoEstimator.load("tiny-fast", device="cpu", precision="auto", max_disparity=64)
        assert loaded.precision == expected
    assert not loaded.channels_last
    # the measured layout comes with it (and any precision: the layout does not change results)
    manifest["models"]["tiny-fast"]["cpu_default"] = {"backend": "pytorch-channels-last", "precision": "bf16"}
    registry.MANIFEST_PATH.write_text(json.dumps(manifest))
    monkeypatch.setattr(estimator_module, "cpu_has_native_bf16", lambda: True)
    for precision in ("auto", "fp32"):
        loaded = StereoEstimator.load("tiny-fast", device="cpu", precision=precision, max_disparity=64)
        assert loaded.channels_last and loaded.precision == ("bf16" if precision == "auto" else "fp32")
    assert not StereoEstimator.load("tiny-fast", device="cpu", channels_last=False).channels_last
    # a checkpoint path (e.g. what `adapt` wrote) runs as the shipped model of its architecture
    # was measured to run; without an architecture in the manifest it runs fp32
    from_path = StereoEstimator.load(str(shipped), device="cpu", precision="auto")
    assert from_path.precision == "fp32" and not from_path.channels_last  # the entry names no arch
    manifest["models"]["tiny-fast"]["arch"] = "dsnet-fast"
    registry.MANIFEST_PATH.write_text(json.dumps(manifest))
    from_path = StereoEstimator.load(str(shipped), device="cpu", precision="auto")
    assert from_path.precision == "bf16" and from_path.channels_last and from_path.name == "tiny-fast"
    other = default_config("dsnet", max_disparity=64)
    other_path = save_checkpoint(shipped.parent / "other.pt", build_model(other), other)
    from_other = StereoEstimator.load(str(other_path), device="cpu", precision="auto")
    assert from_other.precision == "fp32" and not from_other.channels_last  # dsnet: never measured
    # CUDA would take fp16
    assert estimator_module.resolve_precision("auto", "cuda:0", "tiny-fast") == "fp16"
    assert estimator_module.resolve_precision("fp32", "cpu", "tiny-fast") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto"):
        StereoEstimator.load("tiny-fast", device="cpu", precision="int4")


def test_every_shipped_model_verifies_and_names_its_cpu_default():
    models = registry.shipped_models()
    assert "dsnet-fast" in models
    for name, entry in models.items():
        assert entry["cpu_default"]["precision"] in ("fp32", "bf16"), name
        assert entry["cpu_default"]["backend"] in ("pytorch", "pytorch-channels-last"), name
        path = registry.WEIGHTS_DIR / entry["file"]
        assert sha256_of_file(path) == entry["sha256"] and path.stat().st_size < 10_000_000, name
        assert entry["sha256"] in (registry.WEIGHTS_DIR / entry["card"]).read_text(), name


def test_the_manifests_default_is_what_load_and_the_cli_run_when_no_model_is_named(shipped, tmp_path, capsys):
    """One place: the manifest's "default" key decides StereoEstimator.load() and every command."""
    manifest = json.loads(registry.MANIFEST_PATH.read_text())
    with pytest.raises(ValueError, match="no trained default student ships"):
        registry.default_model()  # a manifest without a default
    registry.MANIFEST_PATH.write_text(json.dumps({**manifest, "default": "no-such-model"}))
    with pytest.raises(ValueError, match="no trained default student ships"):
        StereoEstimator.load()
    registry.MANIFEST_PATH.write_text(json.dumps({**manifest, "default": "tiny-fast"}))
    assert registry.default_model() == "tiny-fast"
    loaded = StereoEstimator.load()
    assert loaded.name == "tiny-fast" and loaded.max_disparity == 64
    from stereo_kd_core.cli import main
    from stereo_kd_core.data.io import write_image_rgb

    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    write_image_rgb(tmp_path / "l.png", image)
    assert main(["predict", str(tmp_path / "l.png"), str(tmp_path / "l.png"), "--out", str(tmp_path / "out"),
                 "--json", str(tmp_path / "ran.json")]) == 0
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert ran["model"] == "tiny-fast" and ran["model_sha256"] == sha256_of_file(shipped)
    assert f"tiny-fast (tiny-fast.pt, sha256 {ran['model_sha256'][:12]})" in capsys.readouterr().out


def test_load_without_arguments_runs_the_shipped_default_student_at_auto_precision():
    from stereo_kd_core import estimator as estimator_module

    default = registry.default_model()
    assert default in registry.shipped_models()
    estimator = StereoEstimator.load()
    assert estimator.name == default and estimator.backend == "pytorch"
    assert estimator.device == estimator_module.resolve_device("auto")
    assert estimator.precision == estimator_module.resolve_precision("auto", estimator.device, default)
    # the node's shipped parameter file names the same default (the node's own defaults are checked
    # against this file in test/ros/test_config_and_cli.py)
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "stereo.yaml").read_text())
    parameters = next(iter(config.values()))["ros__parameters"]
    assert (parameters["model"], parameters["device"], parameters["precision"]) == (default, "auto", "auto")


def test_describe_names_the_source_file_and_hash(tmp_path):
    sgbm = StereoEstimator.load("sgbm", max_disparity=32)
    assert registry.describe_estimator(sgbm, "sgbm") == {
        "model": "sgbm", "model_file": None, "model_sha256": None, "backend": "opencv", "channels_last": False,
        "device": "cpu", "precision": "fp32"}
    assert registry.describe_line(registry.describe_estimator(sgbm, "sgbm")) == "sgbm opencv fp32 on cpu"
    config = default_config("dsnet-fast", max_disparity=64)
    path = save_checkpoint(tmp_path / "mine.pt", build_model(config), config)
    network = StereoEstimator.load(str(path), device="cpu", precision="fp32", channels_last=True)
    described = registry.describe_estimator(network, str(path))
    assert described["model"] == "mine" and described["model_file"] == str(path)
    assert described["model_sha256"] == sha256_of_file(path)
    assert registry.describe_line(described) == (f"mine (mine.pt, sha256 {sha256_of_file(path)[:12]}) pytorch "
                                                 "channels_last fp32 on cpu")


def test_the_faster_student_loads_by_name_at_half_the_default_widths():
    """`dsnet-faster` (opt-in): the default's architecture at half of every width, loaded like any
    shipped model and answering a pair."""
    faster = StereoEstimator.load("dsnet-faster", device="cpu", precision="fp32")
    default = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32")
    small, large = faster.network.config, default.network.config
    assert small["arch"] == large["arch"] and small["max_disparity"] == large["max_disparity"]
    assert 2 * small["stem_channels"] == large["stem_channels"]
    assert [2 * c for c in small["layer_channels"]] == large["layer_channels"]
    assert 2 * small["refine_channels"] == large["refine_channels"]
    image = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    prediction = faster.predict(image, np.roll(image, -4, axis=1))
    assert prediction.disparity.shape == (64, 128) and np.isfinite(prediction.disparity).all()
    assert ((prediction.confidence >= 0) & (prediction.confidence <= 1)).all()


def test_a_shipped_working_scale_runs_the_model_on_the_enlarged_pair_and_composes_with_input_scale(shipped):
    """A manifest entry's input_scale: the same weights run on each pair resized by it (exactly what
    ScaledEstimator does by hand), its range in the caller's pixels shrinks by it, and a caller's
    input_scale multiplies it (0.8 x 1.25 = the network on the pair as given)."""
    manifest = json.loads(registry.MANIFEST_PATH.read_text())
    manifest["models"]["tiny-fast-x1.25"] = {**manifest["models"]["tiny-fast"], "input_scale": 1.25}
    registry.MANIFEST_PATH.write_text(json.dumps(manifest))
    assert registry.working_scale("tiny-fast-x1.25") == 1.25 and registry.working_scale("tiny-fast") == 1.0
    assert registry.working_scale("sgbm") == 1.0 and registry.working_scale(None) == 1.0
    rng = np.random.default_rng(1)
    left = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
    right = np.roll(left, -5, axis=1)
    scaled = StereoEstimator.load("tiny-fast-x1.25", device="cpu", precision="fp32")
    assert scaled.name == "tiny-fast-x1.25" and scaled.max_disparity == int(64 / 1.25)
    by_hand = ScaledEstimator(StereoEstimator.load("tiny-fast", device="cpu", precision="fp32"), 1.25)
    got, expected = scaled.predict(left, right), by_hand.predict(left, right)
    assert got.disparity.shape == (48, 96)
    np.testing.assert_array_equal(got.disparity, expected.disparity)
    plain = StereoEstimator.load("tiny-fast", device="cpu", precision="fp32").predict(left, right).disparity
    assert not np.array_equal(got.disparity, plain)  # the scale is not a no-op
    composed = StereoEstimator.load("tiny-fast-x1.25", device="cpu", precision="fp32", input_scale=0.8)
    assert composed.name == "tiny-fast-x1.25@x0.8" and composed.max_disparity == 64
    np.testing.assert_array_equal(composed.predict(left, right).disparity, plain)
    enlarged = StereoEstimator.load("tiny-fast-x1.25", device="cpu", precision="fp32", input_scale=1.2)
    assert enlarged.name == "tiny-fast-x1.25@x1.2" and enlarged.scale == pytest.approx(1.5)


def test_a_checkpoint_carries_its_working_scale(tmp_path):
    """What adapt writes for a start that ran enlarged (extra input_scale) loads enlarged too."""
    config = default_config("dsnet-fast", max_disparity=64)
    network = build_model(config)
    plain = save_checkpoint(tmp_path / "plain.pt", network, config)
    marked = save_checkpoint(tmp_path / "marked.pt", network, config, extra={"input_scale": 1.5})
    assert not isinstance(StereoEstimator.load(str(plain), device="cpu", align_rows=False), ScaledEstimator)
    loaded = StereoEstimator.load(str(marked), device="cpu", align_rows=False)
    assert isinstance(loaded, ScaledEstimator) and loaded.scale == 1.5 and loaded.name == "marked"
    small = {"like": [96, 128], "max_scale": 2.0}
    both = save_checkpoint(tmp_path / "small.pt", network, config,
                           extra={"input_scale": 1.25, "fit_range": True, "small_pairs": small})
    loaded = StereoEstimator.load(str(both), device="cpu", input_scale=0.8)
    assert loaded.fit_range and loaded.small_pairs == SmallPairs(96 * 128, 1.6)  # x1.25 x0.8 = 1: 96x128 pixels
    unsafe = save_checkpoint(tmp_path / "unsafe.pt", network, config, extra={"small_pairs": small})
    with pytest.raises(ValueError, match="small_pairs needs fit_range"):
        StereoEstimator.load(str(unsafe), device="cpu")


def test_an_entry_with_a_table_of_its_own_gets_that_confidence_calibration(shipped):
    """Two entries of one weights file (1x, and run at a scale of its own) each get their own table:
    the file's beside it, the scaled entry's named in the manifest (`confidence`); adapt's start too."""
    from stereo_kd_core.train.adapt import load_student

    table = json.loads((Path(registry.__file__).parent / "weights" / "dsnet-faster.confidence.json").read_text())
    beside, own = dict(table, bias=1.0), dict(table, bias=-1.0)
    (shipped.parent / "tiny-fast.confidence.json").write_text(json.dumps(beside))
    (shipped.parent / "tiny-fast-x1.25.confidence.json").write_text(json.dumps(own))
    manifest = json.loads(registry.MANIFEST_PATH.read_text())
    manifest["models"]["tiny-fast-x1.25"] = {**manifest["models"]["tiny-fast"], "input_scale": 1.25,
                                             "confidence": "tiny-fast-x1.25.confidence.json"}
    registry.MANIFEST_PATH.write_text(json.dumps(manifest))

    def bias(estimator) -> float:
        return getattr(estimator, "inner", estimator).network.confidence_calibration.table["bias"]

    assert bias(StereoEstimator.load("tiny-fast", device="cpu")) == 1.0
    assert bias(StereoEstimator.load("tiny-fast-x1.25", device="cpu")) == -1.0
    assert load_student("tiny-fast-x1.25")[0].confidence_calibration.table["bias"] == -1.0


def test_an_entry_and_a_checkpoint_carry_how_their_network_sees_colour_and_exposure(shipped, tmp_path):
    """Manifest and checkpoint `saturation` / `match_exposure` reach the network the estimator runs
    (adapt's start, a teacher's label identity); absent means the pair as captured; malformed is
    refused, naming where."""
    from stereo_kd_core.models.photometric import photometric_settings
    from stereo_kd_core.train.adapt import load_student

    manifest = json.loads(registry.MANIFEST_PATH.read_text())
    manifest["models"]["tiny-fast-grey"] = {**manifest["models"]["tiny-fast"], "saturation": 0.25,
                                            "match_exposure": True}
    manifest["models"]["tiny-fast-bad"] = {**manifest["models"]["tiny-fast"], "saturation": 2}
    registry.MANIFEST_PATH.write_text(json.dumps(manifest))

    def seen(estimator) -> dict:
        return photometric_settings(estimator.inference_network)

    assert seen(StereoEstimator.load("tiny-fast", device="cpu")) == {}
    assert seen(StereoEstimator.load("tiny-fast-grey", device="cpu")) == {"saturation": 0.25, "match_exposure": True}
    assert photometric_settings(load_student("tiny-fast-grey")[0]) == {"saturation": 0.25, "match_exposure": True}
    # as a teacher its labels differ from the same weights seeing colour: a label cache tells them apart
    from stereo_kd_core.train.label_cache import load_teacher

    assert load_teacher("tiny-fast-grey", "cpu").identity()["saturation"] == 0.25
    assert "saturation" not in load_teacher("tiny-fast", "cpu").identity()
    with pytest.raises(ValueError, match="manifest entry 'tiny-fast-bad': saturation must be a number in"):
        StereoEstimator.load("tiny-fast-bad", device="cpu")
    config = default_config("dsnet-fast", max_disparity=64)
    network = build_model(config)
    grey = save_checkpoint(tmp_path / "grey.pt", network, config, extra={"saturation": 0.0})
    assert seen(StereoEstimator.load(str(grey), device="cpu")) == {"saturation": 0.0}
    bad = save_checkpoint(tmp_path / "bad.pt", network, config, extra={"match_exposure": "yes"})
    with pytest.raises(CheckpointError, match="match_exposure must be true or false"):
        StereoEstimator.load(str(bad), device="cpu")
