"""The real-pair corpus builder on a tiny fixture repository: pairs read from git at a pinned
commit, raw pairs rectified from an EuRoC-style calibration file, swapped and unrectified pairs
caught by the SGBM checks, and the committed manifest well-formed."""

import json
import subprocess

import cv2
import numpy as np
import pytest

from stereo_kd_core.data.corpus import MANIFEST, CorpusError, build_corpus, check_pair, load_manifest
from stereo_kd_core.data.io import read_image_rgb

WIDTH, HEIGHT = 320, 256
DISPARITY_PX = 10
ROW_OFFSET_PX = 4  # the raw right camera's principal point is this many rows lower
FOCAL_PX = 300.0
BASELINE_M = 0.1


def texture(height: int, width: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, (height, width)).astype(np.float32)
    image = cv2.GaussianBlur(noise, (0, 0), 1.2)
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return np.repeat(image[..., None], 3, axis=2).astype(np.uint8)


def rectified_pair(seed: int = 3, width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """A textured fronto-parallel scene at DISPARITY_PX: right[x] = left[x + d]."""
    canvas = texture(height, width + DISPARITY_PX, seed)
    return canvas[:, :width].copy(), canvas[:, DISPARITY_PX:DISPARITY_PX + width].copy()


def sensor_yaml(cy: float, x_m: float) -> str:
    body_from_sensor = np.eye(4)
    body_from_sensor[0, 3] = x_m
    data = ", ".join(f"{v:.6f}" for v in body_from_sensor.ravel())
    return ("%YAML:1.0\nsensor_type: camera\nT_BS:\n  cols: 4\n  rows: 4\n"
            f"  data: [{data}]\nresolution: [{WIDTH}, {HEIGHT}]\ncamera_model: pinhole\n"
            f"intrinsics: [{FOCAL_PX}, {FOCAL_PX}, {WIDTH / 2}, {cy}]\n"
            "distortion_model: radial-tangential\ndistortion_coefficients: [0.0, 0.0, 0.0, 0.0]\n")


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fixture_source(tmp_path):
    """mirrors/fixture: a git repository with a raw pair (right camera ROW_OFFSET_PX lower), its
    calibration, a rectified pair, and a swapped pair; and a manifest naming them."""
    repo = tmp_path / "mirrors" / "fixture"
    repo.mkdir(parents=True)
    git(repo, "init", "-q")
    left, right = rectified_pair()
    raw_right = np.zeros_like(right)
    raw_right[ROW_OFFSET_PX:] = right[:-ROW_OFFSET_PX]  # a raw point at row y shows at y + offset
    files = {"raw/left.png": left, "raw/right.png": raw_right, "rect/left.png": left, "rect/right.png": right,
             "swapped/left.png": right, "swapped/right.png": left}
    for path, image in files.items():
        (repo / path).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(repo / path), image)
    (repo / "calib").mkdir()
    (repo / "calib/cam0.yaml").write_text(sensor_yaml(HEIGHT / 2, 0.0))
    (repo / "calib/cam1.yaml").write_text(sensor_yaml(HEIGHT / 2 + ROW_OFFSET_PX, BASELINE_M))
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "fixture")
    commit = git(repo, "rev-parse", "HEAD").strip()
    common = {"repository": "someone/fixture", "commit": commit, "licence": "test", "camera": "generated"}
    manifest = {"sources": [
        {**common, "name": "raw", "count": 1,
         "calibration": {"format": "euroc", "left": "calib/cam0.yaml", "right": "calib/cam1.yaml"},
         "pairs": [{"name": "a", "left": "raw/left.png", "right": "raw/right.png"}]},
        {**common, "name": "rect", "count": 2, "calibration": None,
         "pairs": [{"name": "a", "left": "rect/left.png", "right": "rect/right.png"},
                   {"name": "swapped", "left": "swapped/left.png", "right": "swapped/right.png"}]},
    ]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path, left, raw_right


def median_sgbm_disparity(left: np.ndarray, right: np.ndarray) -> float:
    from stereo_kd_core.estimator import StereoEstimator

    disparity = StereoEstimator.load("sgbm", max_disparity=64).predict(left, right).disparity
    return float(np.nanmedian(disparity))


def test_builder_rectifies_checks_and_writes_middlebury_folders(fixture_source):
    root, raw_left, raw_right = fixture_source
    out = root / "corpus"
    document = build_corpus(out, root / "mirrors", root / "manifest.json", log=lambda _: None)

    # the raw pair, rectified with its calibration: rows align and SGBM sees the scene's disparity
    raw_case = out / "raw-a"
    left, right = read_image_rgb(raw_case / "im0.png"), read_image_rgb(raw_case / "im1.png")
    assert left.shape[0] % 32 == 0 and left.shape[1] % 32 == 0
    check = document["pairs"]["raw-a"]
    assert check["ok"] and check["best_row_offset_px"] == 0
    meta = json.loads((raw_case / "meta.json").read_text())
    assert meta["rectified_here"] and meta["source"] == "raw"
    # stereoRectify may zoom (alpha=0 keeps only valid pixels): the disparity scales with the new focal length
    assert median_sgbm_disparity(left, right) == pytest.approx(DISPARITY_PX, rel=0.15)

    # the same raw pair unrectified fails the row check; the swapped pair fails the swap check
    unrectified = check_pair(raw_left, raw_right)
    assert not unrectified["ok"] and unrectified["best_row_offset_px"] < 0  # rolling the right image up undoes it
    assert any("not rectified" in reason for reason in unrectified["reasons"])
    assert document["pairs"]["rect-a"]["ok"] and (out / "rect-a" / "im0.png").is_file()
    swapped = document["pairs"]["rect-swapped"]
    assert not swapped["ok"] and any("swapped" in reason for reason in swapped["reasons"])
    assert not (out / "rect-swapped").exists()
    assert document["sources"] == {"raw": {"pairs": 1, "kept": 1}, "rect": {"pairs": 2, "kept": 1}}


def test_builder_names_what_is_missing(fixture_source, tmp_path):
    root, _, _ = fixture_source
    with pytest.raises(CorpusError, match="no copy of someone/fixture"):
        build_corpus(tmp_path / "out", tmp_path / "elsewhere", root / "manifest.json", log=lambda _: None)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sources"][1]["count"] = 5
    (root / "bad.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="count 5, lists 2"):
        load_manifest(root / "bad.json")


def test_committed_manifest_lists_no_evaluation_set():
    sources = load_manifest(MANIFEST)
    assert sum(len(source.pairs) for source in sources) >= 100
    forbidden = ("middlebury", "kitti", "eth3d", "sceneflow", "sintel", "booster", "spring", "realval")
    for source in sources:
        assert len(source.commit) == 40 and source.licence
        for _, left, right in source.pairs:
            assert not any(word in (left + right).lower() for word in forbidden), (left, right)


def test_labels_are_cached_once_and_exported_for_adapt(tmp_path):
    from stereo_kd_core.data.corpus_labels import confidence_cases, label_cases

    # SGBM (192 levels) as the teacher: wide enough that its left and right views overlap
    left, right = rectified_pair(width=576, height=64)
    for case in ("a-1", "b-1"):
        (tmp_path / "corpus" / case).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "corpus" / case / "im0.png"), left)
        cv2.imwrite(str(tmp_path / "corpus" / case / "im1.png"), right)
    corpus = tmp_path / "corpus"
    # a teacher that does not load names itself and leaves the folder free for the right one
    with pytest.raises(ValueError, match="unknown model 'psmnet'"):
        label_cases(corpus, "psmnet", precision="fp32", log=lambda _: None)
    assert label_cases(corpus, "sgbm", precision="fp32", limit=1, log=lambda _: None) == 1
    assert label_cases(corpus, "sgbm", precision="fp32", log=lambda _: None) == 1  # resumes: only the other case
    assert confidence_cases(corpus, student=None, export=tmp_path / "export", log=lambda _: None) == 2
    assert confidence_cases(corpus, student=None, log=lambda _: None) == 0  # only cases without one
    with np.load(corpus / "a-1" / "labels.npz") as stored:
        assert {"disparity", "disparity_right", "teacher_confidence", "confidence"} <= set(stored.files)
        disparity, confidence = stored["disparity"].astype(np.float32), stored["confidence"].astype(np.float32)
    exported = np.load(tmp_path / "export" / "labels" / "a-1.npy")
    assert np.array_equal(np.isfinite(exported), confidence >= 0.5)
    # SGBM labels agree with SGBM and with their own right view where both views have disparities (x 192..566)
    assert (confidence >= 0.5).mean() > 0.3
    assert np.nanmedian(exported) == pytest.approx(DISPARITY_PX, abs=0.5)
    assert np.allclose(exported[confidence >= 0.5], disparity[confidence >= 0.5])
    assert (tmp_path / "export" / "pairs" / "b-1" / "im1.png").resolve() == (corpus / "b-1" / "im1.png").resolve()
    # the ablation without independent evidence: the left-right check alone, to its own export only
    before = (corpus / "a-1" / "labels.npz").read_bytes()
    with pytest.raises(ValueError, match="export folder"):
        confidence_cases(corpus, student=None, agreement="none", log=lambda _: None)
    assert confidence_cases(corpus, student=None, export=tmp_path / "lr-only", agreement="none",
                            log=lambda _: None) == 2
    assert (corpus / "a-1" / "labels.npz").read_bytes() == before
    lr_only = np.load(tmp_path / "lr-only" / "labels" / "a-1.npy")
    assert np.isfinite(lr_only).sum() >= np.isfinite(exported).sum()  # fewer conditions: at least as many kept
    assert np.isfinite(exported)[np.isfinite(lr_only) == 0].sum() == 0


def test_a_teacher_can_label_on_enlarged_pairs(tmp_path):
    """--input-scale: the teacher runs on each pair resized by the factor (the default student at
    1.5 is a teacher of its own architecture); the label is in the pair's pixels and the folder
    records the factor, so labels of another scale are never mixed in."""
    from stereo_kd_core.data.corpus_labels import LABEL_FILE, TEACHER_RECORD, label_cases

    left, right = rectified_pair(width=576, height=64)
    (tmp_path / "a-1").mkdir()
    cv2.imwrite(str(tmp_path / "a-1" / "im0.png"), left)
    cv2.imwrite(str(tmp_path / "a-1" / "im1.png"), right)
    assert label_cases(tmp_path, "sgbm", precision="fp32", input_scale=1.5, log=lambda _: None) == 1
    assert json.loads((tmp_path / TEACHER_RECORD).read_text())["input_scale"] == 1.5
    with np.load(tmp_path / "a-1" / LABEL_FILE) as stored:
        disparity = stored["disparity"].astype(np.float32)
    assert disparity.shape == (64, 576)
    assert np.nanmedian(disparity) == pytest.approx(DISPARITY_PX, abs=0.5)
    with pytest.raises(ValueError, match="another teacher"):
        label_cases(tmp_path, "sgbm", precision="fp32", log=lambda _: None)


@pytest.mark.parametrize("layout", ["{owner}+{name}/repo", "{owner}+{name}/repo/.git", "{name}/.git"])
def test_mirrors_are_found_in_each_layout(tmp_path, layout):
    from stereo_kd_core.data.corpus import find_git_dir

    git_dir = tmp_path / layout.format(owner="someone", name="stereo")
    (git_dir / "objects").mkdir(parents=True)
    (git_dir / "HEAD").write_text("ref: refs/heads/main\n")
    assert find_git_dir(tmp_path, "someone/stereo") == git_dir
    with pytest.raises(CorpusError, match="no copy of someone/other"):
        find_git_dir(tmp_path, "someone/other")
