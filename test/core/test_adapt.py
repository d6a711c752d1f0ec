"""`stereo-kd adapt`: frames from folders and bags, pseudo-labels with a left-right check, the
resumable label cache, hold-out frames, the adapt objective, and small real runs (CPU, tiny
models, 64x128 images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from stereo_kd_core import StereoEstimator
from stereo_kd_core.checkpoint import save_checkpoint
from stereo_kd_core.cli import main as cli_main
from stereo_kd_core.data.io import write_image_rgb, write_kitti_disparity, write_pfm
from stereo_kd_core.data.recordings import open_recordings, split_holdout
from stereo_kd_core.data.synthetic import SyntheticStereoGenerator, write_middlebury_dataset
from stereo_kd_core.distill.label_confidence import left_right_consistent
from stereo_kd_core.distill.losses import photometric_loss
from stereo_kd_core.estimator import StereoPrediction
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.train import adapt, label_cache
from stereo_kd_core.train.adapt import run_adapt
from stereo_kd_core.train.label_cache import AdaptFrames, EstimatorTeacher, FileTeacher, LabelCache

HEIGHT, WIDTH, MAX_DISPARITY = 64, 128, 32
TINY_ARGS = dict(stem_channels=8, layer_channels=[8, 8, 8, 8], layer_blocks=[1, 1, 1, 1], groups=2,
                 concat_channels=4, attention_channels=4, aggregation_channels=4, mask_channels=8)
# small runs: crop = frame size, batch 2, no replay unless a test asks, a small synthetic test split
FAST = {"data.crop": [HEIGHT, WIDTH], "train.batch_size": 2, "train.checkpoint_every": 5, "train.log_every": 1,
        "data.train": {"name": "synthetic", "n": 4, "seed": 21, "height": HEIGHT, "width": WIDTH,
                       "max_disparity": MAX_DISPARITY},
        "adapt.replay_synthetic": 0.0, "adapt.evaluation": {"synthetic_n": 2, "synthetic_height": HEIGHT,
                                                            "synthetic_width": WIDTH}}


def tiny_checkpoint(path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = build_model(dict(default_config("dsnet", MAX_DISPARITY), **TINY_ARGS))
    save_checkpoint(path, model, model.config)
    return str(path)


def synthetic_folder(root, n: int, seed: int = 3) -> list[str]:
    """n generator pairs in Middlebury layout (with ground truth) and labels/ = the exact
    disparity as .pfm named after each case."""
    cases = write_middlebury_dataset(root / "frames", n, seed=seed, height=HEIGHT, width=WIDTH,
                                     max_disparity=MAX_DISPARITY, kind="planes")
    generator = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=seed)
    (root / "labels").mkdir()
    for index, case in enumerate(cases):
        name = case.rsplit("/", 1)[-1]
        write_pfm(root / "labels" / f"{name}.pfm", generator.sample(index)["disparity"])
    return [case.rsplit("/", 1)[-1] for case in cases]


# --- pseudo-label confidence ---------------------------------------------------------------
def test_left_right_check_drops_inconsistent_pixels():
    left = np.full((4, 12), 3.0, dtype=np.float32)
    right = np.full((4, 12), 3.0, dtype=np.float32)
    right[1, 5] = 9.0  # the right view disagrees at x_r = 5, seen from x = 8
    left[2, 10] = np.nan
    consistent = left_right_consistent(left, right, threshold_px=1.0)
    expected = np.ones((4, 12), dtype=bool)
    expected[:, :3] = False  # x - 3 < 0: the match leaves the right image
    expected[1, 8] = False  # reads the right view at exactly 5; x = 7 and 9 read 4 and 6
    expected[2, 10] = False  # no left disparity
    np.testing.assert_array_equal(consistent, expected)
    # a sub-pixel disagreement within the threshold passes, beyond it fails
    plane = np.full((4, 12), 3.0, dtype=np.float32)
    assert left_right_consistent(plane, plane + 0.9, 1.0)[:, 3:].all()
    assert not left_right_consistent(plane, plane + 1.1, 1.0)[:, 3:].any()


class ConstantEstimator(StereoEstimator):
    """Disparity `value` everywhere, confidence 0.8; records its inputs."""

    def __init__(self, value: float):
        self.name, self.device, self.precision, self.max_disparity = "constant", "cpu", "fp32", MAX_DISPARITY
        self.value, self.calls = value, []

    def predict(self, left, right, geometry=None):
        self.calls.append((left.copy(), right.copy()))
        shape = left.shape[:2]
        return StereoPrediction(np.full(shape, self.value, np.float32), np.full(shape, 0.8, np.float32))


def test_estimator_teacher_runs_the_mirrored_swapped_pair():
    rng = np.random.default_rng(0)
    left = rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)
    right = rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)
    estimator = ConstantEstimator(4.0)
    disparity, confidence = EstimatorTeacher(estimator, {"teacher": "c"}, 1.0).label(None, left, right)
    assert len(estimator.calls) == 2
    np.testing.assert_array_equal(estimator.calls[1][0], right[:, ::-1])
    np.testing.assert_array_equal(estimator.calls[1][1], left[:, ::-1])
    np.testing.assert_allclose(disparity, 4.0)
    np.testing.assert_allclose(confidence[:, 4:], 0.8, rtol=1e-6)  # own confidence where consistent
    assert (confidence[:, :4] == 0).all()  # matches outside the right view


def test_estimator_teacher_drops_labels_the_images_contradict_when_asked():
    # rows 0-5 shift by 4 px, rows 6-11 by 9: a teacher answering 4 everywhere is left-right
    # consistent, right on the top rows and wrong on the bottom ones
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 255, (12, 40), dtype=np.uint8)
    left = np.repeat(wide[:, :28, None], 3, axis=2)
    right = left.copy()
    right[:6, :24] = left[:6, 4:28]
    right[6:, :19] = left[6:, 9:28]
    teacher = EstimatorTeacher(ConstantEstimator(4.0), {"teacher": "c"}, 1.0)
    _, trusting = teacher.label(None, left, right)
    assert (trusting[:, 4:] > 0).all()  # the left-right check alone keeps the wrong rows
    teacher.use_agreement("none", photometric_max_error=6.0)
    assert teacher.identity()["photometric_max_error"] == 6.0  # another rule, another label cache
    _, checked = teacher.label(None, left, right)
    np.testing.assert_allclose(checked[:3, 8:], 0.8, rtol=1e-6)  # the right rows, away from the left border
    assert (checked[9:] == 0).all()  # the wrong rows do not supervise


# --- frames, names, labels -------------------------------------------------------------------
def test_label_files_are_named_after_the_frame_in_every_layout(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    truth = rng.uniform(1, 20, (HEIGHT, WIDTH)).astype(np.float32)
    middlebury, kitti, pairs, labels = (tmp_path / n for n in ("mb", "kitti", "pairs", "labels"))
    for case in ("sceneA", "sceneB"):
        (middlebury / case).mkdir(parents=True)
        write_image_rgb(middlebury / case / "im0.png", image)
        write_image_rgb(middlebury / case / "im1.png", image)
    for folder in ("training/image_2", "training/image_3"):
        (kitti / folder).mkdir(parents=True)
        write_image_rgb(kitti / folder / "000007_10.png", image)
    for folder in ("left", "right"):
        (pairs / folder).mkdir(parents=True)
        for stem in ("t0001", "t0002"):
            write_image_rgb(pairs / folder / f"{stem}.png", image)
    labels.mkdir()
    write_pfm(labels / "sceneA.pfm", truth)
    write_pfm(labels / "sceneB.pfm", truth)
    write_kitti_disparity(labels / "000007_10.png", truth)
    np.save(labels / "t0001.npy", truth)
    np.save(labels / "t0002.npy", truth)

    recordings = open_recordings([middlebury, kitti, pairs], tmp_path / "out")
    assert [[f.name for f in frames] for frames in recordings] == [
        ["sceneA", "sceneB"], ["000007_10"], ["t0001", "t0002"]]
    teacher = FileTeacher(labels)
    for frames in recordings:
        for frame in frames:
            disparity, confidence = teacher.label(frame, image, image)
            tolerance = 1 / 256 if frame.name.endswith("_10") else 1e-6  # KITTI stores 1/256 px steps
            np.testing.assert_allclose(disparity, truth, atol=tolerance)
            assert (confidence == 1).all()
    with pytest.raises(FileNotFoundError, match=r"t0003\.pfm / t0003\.png / t0003\.npy"):
        label_cache.label_file(labels, "t0003")
    # --every keeps every Nth frame by time, --holdout the last fraction of each recording
    every = open_recordings([pairs], tmp_path / "out", every=2)
    assert [f.name for f in every[0]] == ["t0001"]
    train, held = split_holdout(recordings, 0.5)
    assert [f.name for f in held] == ["sceneB", "t0002"]  # the one-frame recording keeps it for training
    assert [f.name for f in train] == ["sceneA", "000007_10", "t0001"]


# --- the label cache ---------------------------------------------------------------------------
class CountingTeacher(FileTeacher):
    """labels:DIR that counts its runs and can be made to die after some frames (a kill)."""

    def __init__(self, directory, die_after: int | None = None):
        super().__init__(directory)
        self.runs, self.die_after = 0, die_after

    def label(self, frame, left, right):
        if self.die_after is not None and self.runs >= self.die_after:
            raise KeyboardInterrupt
        self.runs += 1
        return super().label(frame, left, right)


def test_label_cache_resumes_after_a_kill_without_recomputing(tmp_path):
    names = synthetic_folder(tmp_path, 4)
    frames = open_recordings([tmp_path / "frames"], tmp_path / "out")[0]
    killed = CountingTeacher(tmp_path / "labels", die_after=3)
    with pytest.raises(KeyboardInterrupt):
        LabelCache(tmp_path / "out", killed).fill(frames)
    assert killed.runs == 3
    assert sorted(p.stem for p in (tmp_path / "out" / "labels" / "0").glob("*.npz")) == names[:3]
    resumed = CountingTeacher(tmp_path / "labels")
    cache = LabelCache(tmp_path / "out", resumed)
    cache.fill(frames)
    assert resumed.runs == 1 and cache.computed == 1  # only the frame the kill lost
    disparity, confidence = cache.read(frames[3])
    assert disparity.dtype == np.float32 and (confidence == 1).all()
    truth = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=3).sample(3)["disparity"]
    np.testing.assert_allclose(disparity, truth, atol=0.02, equal_nan=True)  # float16 on disk
    # labels of another teacher are refused, not mixed
    with pytest.raises(ValueError, match="another teacher"):
        LabelCache(tmp_path / "out", FileTeacher(tmp_path / "frames"))


def test_confidence_below_the_threshold_does_not_supervise(tmp_path):
    synthetic_folder(tmp_path, 1)
    frames = open_recordings([tmp_path / "frames"], tmp_path / "out")[0]
    teacher = EstimatorTeacher(ConstantEstimator(5.0), {"teacher": "c"}, 1.0)
    cache = LabelCache(tmp_path / "out", teacher)
    cache.fill(frames)
    sample = AdaptFrames(frames, cache, min_confidence=0.9)[0]
    assert np.isnan(sample["disparity"]).all()  # confidence 0.8 < 0.9
    sample = AdaptFrames(frames, cache, min_confidence=0.5)[0]
    assert np.isnan(sample["disparity"][:, :5]).all() and (sample["disparity"][:, 5:] == 5).all()


# --- self-supervision ----------------------------------------------------------------------
def test_photometric_loss_prefers_the_true_disparity():
    sample = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=4).sample(0)

    def tensor(image):
        return torch.from_numpy(image.transpose(2, 0, 1).copy()).float().unsqueeze(0) / 255

    left, right = tensor(sample["left"]), tensor(sample["right"])
    truth = torch.from_numpy(np.nan_to_num(sample["disparity"])).unsqueeze(0)
    right_answer = photometric_loss(left, right, truth)
    assert right_answer < 0.6 * photometric_loss(left, right, truth + 3)
    assert right_answer < 0.6 * photometric_loss(left, right, torch.zeros_like(truth))


# --- whole runs --------------------------------------------------------------------------------
def test_adapt_on_exact_labels_improves_holdout_and_never_trains_on_it(tmp_path, monkeypatch):
    names = synthetic_folder(tmp_path, 6)
    init = tiny_checkpoint(tmp_path / "init.pt")  # a deliberately weak start: random weights
    read = []
    original = AdaptFrames.__getitem__

    def recording(self, index):
        read.append(self.frames[index].name)
        return original(self, index)

    monkeypatch.setattr(AdaptFrames, "__getitem__", recording)
    report = run_adapt([tmp_path / "frames"], tmp_path / "run", teacher=f"labels:{tmp_path / 'labels'}",
                       init=init, device="cpu",
                       overrides={**FAST, "train.steps": 15, "train.optimizer.lr": 3e-3, "adapt.holdout": 0.3,
                                  "adapt.drop_worst": 0.0, "adapt.judge.criterion": "photometric"})
    holdout = set(names[-2:])
    assert report["frames"] == {"train": 4, "holdout": 2, "holdout_names": [f"0/{n}" for n in names[-2:]]}
    assert read and not holdout & set(read), "a hold-out frame was read for training"
    assert set(read) == set(names[:-2])
    for key in ("holdout_vs_teacher", "holdout_vs_ground_truth"):
        before, after = report[key]["before"]["mean"], report[key]["after"]["mean"]
        assert after["epe"] < 0.7 * before["epe"], (key, before["epe"], after["epe"])
    assert report["holdout_vs_ground_truth"]["teacher"]["mean"]["epe"] < 0.05  # exact labels (float16)
    assert report["synthetic_test"]["before"]["mean"]["epe"] > 0
    assert json.loads((tmp_path / "run" / "before_after.json").read_text())["final"] == report["final"]
    assert (tmp_path / "run" / "before_after.png").stat().st_size > 0
    # the result is an ordinary checkpoint
    estimator = StereoEstimator.load(report["final"], device="cpu")
    assert estimator.predict(np.zeros((HEIGHT, WIDTH, 3), np.uint8),
                             np.zeros((HEIGHT, WIDTH, 3), np.uint8)).disparity.shape == (HEIGHT, WIDTH)


def test_adapt_resumes_a_finished_run_without_relabelling_and_refuses_other_settings(tmp_path):
    synthetic_folder(tmp_path, 3)
    init = tiny_checkpoint(tmp_path / "init.pt")
    arguments = dict(teacher=f"labels:{tmp_path / 'labels'}", init=init, device="cpu")
    overrides = {**FAST, "train.steps": 2, "adapt.holdout": 0.0}
    first = run_adapt([tmp_path / "frames"], tmp_path / "run", overrides=overrides, **arguments)
    assert first["labels_computed"] == 3 and first["frames"]["holdout"] == 0
    assert first["holdout_vs_teacher"] is None
    # the same run again through the command line: labels and training are already done
    command = ["adapt", "--data", str(tmp_path / "frames"), "--out", str(tmp_path / "run"), "--teacher",
               arguments["teacher"], "--init", init, "--device", "cpu", "--steps", "2", "--holdout", "0"]
    for key, value in FAST.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    assert cli_main(command) == 0
    second = json.loads((tmp_path / "run" / "before_after.json").read_text())
    assert second["labels_computed"] == 0
    with pytest.raises(ValueError, match="new --out"):
        run_adapt([tmp_path / "frames"], tmp_path / "run", overrides={**overrides, "train.steps": 3}, **arguments)


def test_a_start_that_runs_enlarged_is_adapted_judged_and_written_at_its_scale(tmp_path, monkeypatch):
    """A start with a working scale (the shipped default runs on pairs enlarged by 1.25) learns from
    and is judged on the frames resized by it, labels:DIR files follow the resize, and final.pt
    carries the scale, so the adapted network runs as the start did."""
    synthetic_folder(tmp_path, 3)
    config = dict(default_config("dsnet", MAX_DISPARITY), **TINY_ARGS)
    init = save_checkpoint(tmp_path / "init.pt", build_model(config), config, extra={"input_scale": 1.5})
    shapes = []
    original = AdaptFrames.__getitem__

    def recording(self, index):
        item = original(self, index)
        shapes.append((item["left"].shape[:2], item["disparity"].shape))
        return item

    monkeypatch.setattr(AdaptFrames, "__getitem__", recording)
    report = run_adapt([tmp_path / "frames"], tmp_path / "run", teacher=f"labels:{tmp_path / 'labels'}",
                       init=str(init), device="cpu", overrides={**FAST, "train.steps": 2, "adapt.holdout": 0.0})
    enlarged = (round(HEIGHT * 1.5), round(WIDTH * 1.5))
    assert shapes and set(shapes) == {(enlarged, enlarged)}
    assert report["labels_computed"] == 3
    final = StereoEstimator.load(report["final"], device="cpu")
    assert final.scale == 1.5
    assert final.predict(np.zeros((HEIGHT, WIDTH, 3), np.uint8),
                         np.zeros((HEIGHT, WIDTH, 3), np.uint8)).disparity.shape == (HEIGHT, WIDTH)
    # the exact labels, resized with their frame: values in the enlarged pixels
    frame = open_recordings([tmp_path / "frames"], tmp_path / "run", scale=1.5)[0][0]
    label, _ = FileTeacher(tmp_path / "labels").label(frame, frame.sample()["left"], frame.sample()["right"])
    truth = frame.sample()["disparity"]
    assert frame.key.endswith("@x1.5") and label.shape == enlarged and np.nanmax(np.abs(label - truth)) < 1e-3
    native = open_recordings([tmp_path / "frames"], tmp_path / "run")[0][0]
    native_label, _ = FileTeacher(tmp_path / "labels").label(native, native.sample()["left"], native.sample()["right"])
    assert np.nanmax(label) == pytest.approx(1.5 * np.nanmax(native_label), rel=0.02)  # values in enlarged pixels


def test_default_init_fails_clearly_while_no_student_ships(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt.registry, "shipped_models", lambda: {})
    with pytest.raises(ValueError, match="no trained default student ships"):
        run_adapt([tmp_path], tmp_path / "run", teacher="none")
    assert cli_main(["adapt", "--data", str(tmp_path), "--teacher", "none", "--out", str(tmp_path / "r")]) == 2


# --- bags ------------------------------------------------------------------------------------
TYPESTORE = get_typestore(Stores.ROS2_KILTED)
MSG = TYPESTORE.types


def _header(stamp_ns: int, frame_id: str = "cam"):
    return MSG["std_msgs/msg/Header"](stamp=MSG["builtin_interfaces/msg/Time"](
        sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)


def _image(rgb: np.ndarray, stamp_ns: int):
    height, width = rgb.shape[:2]
    return MSG["sensor_msgs/msg/Image"](header=_header(stamp_ns), height=height, width=width, encoding="rgb8",
                                        is_bigendian=0, step=width * 3, data=rgb.reshape(-1).copy())


def _info(stamp_ns: int, baseline_px: float, height: int = HEIGHT, width: int = WIDTH):
    projection = np.array([[100.0, 0, width / 2, -baseline_px], [0, 100.0, height / 2, 0], [0, 0, 1, 0]])
    roi = MSG["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return MSG["sensor_msgs/msg/CameraInfo"](
        header=_header(stamp_ns), height=height, width=width, distortion_model="plumb_bob", d=np.zeros(5),
        k=projection[:, :3].ravel(), r=np.eye(3).ravel(), p=projection.ravel(), binning_x=0, binning_y=0, roi=roi)


def write_bag(path, n: int, prefix: str = "/stereo", infos: bool = True, info_size: tuple[int, int] | None = None,
              storage=StoragePlugin.MCAP) -> list[np.ndarray]:
    """n generator pairs on PREFIX/{left,right}/image_rect (+ camera_info); returns the left images."""
    generator = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=7)
    lefts = []
    with Writer(path, version=9, storage_plugin=storage) as writer:
        topics = {"chatter": ("/chatter", "std_msgs/msg/String")}
        if n:
            for side in ("left", "right"):
                topics[f"{side}_image"] = (f"{prefix}/{side}/image_rect", "sensor_msgs/msg/Image")
                if infos:
                    topics[f"{side}_info"] = (f"{prefix}/{side}/camera_info", "sensor_msgs/msg/CameraInfo")
        conns = {key: writer.add_connection(topic, kind, typestore=TYPESTORE) for key, (topic, kind) in topics.items()}

        def write(key, msg, log_ns):
            writer.write(conns[key], log_ns, bytes(TYPESTORE.serialize_cdr(msg, msg.__msgtype__)))

        write("chatter", MSG["std_msgs/msg/String"](data="hi"), 1)
        for index in range(n):
            sample, stamp = generator.sample(index), 10**9 + index * 10**8
            if infos:
                size = info_size or (HEIGHT, WIDTH)
                write("left_info", _info(stamp, 0.0, *size), stamp + 1)
                write("right_info", _info(stamp, 10.0, *size), stamp + 2)
            write("left_image", _image(sample["left"], stamp), stamp + 3)
            write("right_image", _image(sample["right"], stamp), stamp + 4)
            lefts.append(sample["left"])
    return lefts


def test_adapt_from_a_bag_with_a_project_teacher_internal_points_photometric_and_replay(tmp_path):
    lefts = write_bag(tmp_path / "run.mcap", 4)
    teacher = tiny_checkpoint(tmp_path / "teacher.pt", seed=1)
    report = run_adapt([tmp_path / "run.mcap"], tmp_path / "out", teacher=teacher,
                       init=tiny_checkpoint(tmp_path / "init.pt"), device="cpu",
                       overrides={**FAST, "train.steps": 3, "adapt.holdout": 0.25, "adapt.photometric": 0.5,
                                  "adapt.replay_synthetic": 0.5, "adapt.min_confidence": 0.0,
                                  "adapt.internal_source": "live",
                                  "adapt.internal": {"features": {"loss": "cosine", "weight": {"initial": 0.1}},
                                                     "cost": {"temperature": 1.0, "weight": {"initial": 0.1}}}})
    # frames found on /stereo/... by name, named by their six-digit index, stored once as PNG
    assert report["frames"]["holdout_names"] == ["0/000003"]
    assert report["labels_computed"] == 4 and report["internal_distillation"] == "live"
    from stereo_kd_core.data.io import read_image_rgb

    np.testing.assert_array_equal(read_image_rgb(tmp_path / "out/frames/0/000002/im0.png"), lefts[2])
    with open(tmp_path / "out" / "log.csv") as f:
        columns = f.readline().strip().split(",")
    assert {"loss.labels", "loss.photometric", "loss.features", "loss.cost"} <= set(columns)
    assert report["holdout_vs_teacher"]["after"]["mean"]["epe"] >= 0
    assert report["synthetic_test"]["after"]["mean"]["epe"] >= 0


def test_bag_problems_give_clear_errors_naming_the_topic(tmp_path):
    init = tiny_checkpoint(tmp_path / "init.pt")

    def adapt_bag(name: str) -> None:
        run_adapt([tmp_path / name], tmp_path / f"out-{name}", teacher="sgbm", init=init, device="cpu",
                  overrides={**FAST, "train.steps": 1, "adapt.holdout": 0.0})

    write_bag(tmp_path / "chatter.mcap", 0)
    with pytest.raises(ValueError, match="cannot tell the left image topic.*no Image topics at all"):
        adapt_bag("chatter.mcap")
    write_bag(tmp_path / "noinfo.db3", 2, infos=False, storage=StoragePlugin.SQLITE3)
    with pytest.raises(ValueError, match="no topic '/stereo/left/camera_info'"):
        adapt_bag("noinfo.db3")
    write_bag(tmp_path / "sizes.mcap", 2, info_size=(32, 48))
    with pytest.raises(ValueError, match=r"size_mismatch 2.*/stereo/left/image_rect is 128x64 but "
                                         r"/stereo/left/camera_info says 48x32"):
        adapt_bag("sizes.mcap")


def test_onnx_teacher_goes_through_stereo_estimator(tmp_path):
    """An ONNX teacher is whatever StereoEstimator.load makes of the file: output-level only;
    where this install's estimator has no ONNX backend, a clear error says so."""
    from stereo_kd_core.checkpoint import CheckpointError, load_model
    from stereo_kd_core.export import export_model

    onnx = export_model(load_model(tiny_checkpoint(tmp_path / "t.pt")), tmp_path / "teacher.onnx", "onnx",
                        HEIGHT, WIDTH)
    try:
        StereoEstimator.load(str(onnx), device="cpu")
    except CheckpointError:
        with pytest.raises(ValueError, match="cannot run ONNX models"):
            label_cache.load_teacher(str(onnx), "cpu")
        return
    teacher = label_cache.load_teacher(str(onnx), "cpu")
    assert teacher.network is None  # no internal points from a third-party graph
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    disparity, confidence = teacher.label(None, image, image)
    assert disparity.shape == confidence.shape == (HEIGHT, WIDTH)
