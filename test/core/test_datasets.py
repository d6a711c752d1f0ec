"""Data sets read tiny fixture trees written in their standard layouts."""

import cv2
import numpy as np
import pytest
import torch

from stereo_kd_core.data.datasets import (
    ETH3DDataset,
    KittiDataset,
    MiddleburyDataset,
    SceneFlowDataset,
    TrainingDataset,
    open_dataset,
)
from stereo_kd_core.data.io import write_image_rgb, write_kitti_disparity, write_middlebury_calib, write_pfm
from stereo_kd_core.data.synthetic import SyntheticStereoDataset

H, W = 4, 6


def image(value: int) -> np.ndarray:
    out = np.full((H, W, 3), value, np.uint8)
    out[0, 0] = (1, 2, 3)  # a pixel that reveals a channel swap
    return out


def write_pair(directory, left_name, right_name, value):
    directory.mkdir(parents=True, exist_ok=True)
    write_image_rgb(directory / left_name, image(value))
    write_image_rgb(directory / right_name, image(value + 1))


def test_middlebury_folder_with_inf_and_zero_ground_truth(tmp_path):
    write_pair(tmp_path / "trainingQ" / "Adirondack", "im0.png", "im1.png", 10)
    disparity = np.full((H, W), 5.5, np.float32)
    disparity[0, 1], disparity[1, 2] = np.inf, 0.0
    write_pfm(tmp_path / "trainingQ" / "Adirondack" / "disp0GT.pfm", disparity)
    mask = np.full((H, W), 255, np.uint8)
    mask[2, :] = 128
    cv2.imwrite(str(tmp_path / "trainingQ" / "Adirondack" / "mask0nocc.png"), mask)
    write_middlebury_calib(tmp_path / "trainingQ" / "Adirondack" / "calib.txt", 100.0, 3.0, 4.0, 2.0, 50.0, W, H, 16)
    write_pair(tmp_path / "trainingQ" / "Bicycle", "im0.png", "im1.png", 20)
    write_pfm(tmp_path / "trainingQ" / "Bicycle" / "disp0.pfm", np.full((H, W), 2.0, np.float32))

    dataset = MiddleburyDataset(tmp_path)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["name"] == "trainingQ/Adirondack" and second["name"] == "trainingQ/Bicycle"
    np.testing.assert_array_equal(first["left"], image(10))
    np.testing.assert_array_equal(first["right"], image(11))
    expected = disparity.copy()
    expected[0, 1] = expected[1, 2] = np.nan
    np.testing.assert_array_equal(first["disparity"], expected)
    np.testing.assert_array_equal(first["nocc"], mask == 255)
    assert first["calib"]["doffs"] == 1.0
    np.testing.assert_array_equal(second["disparity"], np.full((H, W), 2.0))
    assert "nocc" not in second and "calib" not in second

    split = tmp_path / "val.txt"
    split.write_text("# validation\ntrainingQ/Bicycle\n\n")
    assert [s["name"] for s in MiddleburyDataset(tmp_path, split_file=split)] == ["trainingQ/Bicycle"]
    split.write_text("trainingQ/Nope\n")
    with pytest.raises(ValueError, match="Nope"):
        MiddleburyDataset(tmp_path, split_file=split)


def make_sceneflow_tree(root, render_pass="finalpass"):
    cases = {
        "flyingthings3d": ["TRAIN/A/0000", "TEST/A/0001"],
        "driving": ["35mm_focallength/scene_forwards/fast"],
        "monkaa": ["a_rain_of_stones_x2"],
    }
    for value, (subset, sequences) in enumerate(cases.items()):
        for sequence in sequences:
            frames = root / subset / f"frames_{render_pass}" / sequence
            for side in ("left", "right"):
                (frames / side).mkdir(parents=True)
                write_image_rgb(frames / side / "0006.png", image(value))
            gt = root / subset / "disparity" / sequence / "left"
            gt.mkdir(parents=True)
            write_pfm(gt / "0006.pfm", np.full((H, W), 3.0 + value, np.float32))


def test_sceneflow_layout_and_splits(tmp_path):
    make_sceneflow_tree(tmp_path)
    train = SceneFlowDataset(tmp_path, split="train")
    assert [s["name"] for s in train] == [
        "driving/frames_finalpass/35mm_focallength/scene_forwards/fast/left/0006",
        "flyingthings3d/frames_finalpass/TRAIN/A/0000/left/0006",
        "monkaa/frames_finalpass/a_rain_of_stones_x2/left/0006",
    ]
    np.testing.assert_array_equal(train[0]["disparity"], np.full((H, W), 4.0))  # driving was written with 3 + 1
    test = SceneFlowDataset(tmp_path, split="test")
    assert [s["name"] for s in test] == ["flyingthings3d/frames_finalpass/TEST/A/0001/left/0006"]
    assert len(SceneFlowDataset(tmp_path, split=None)) == 4
    assert len(open_dataset("flyingthings3d", tmp_path, split=None)) == 2
    assert len(open_dataset("monkaa", tmp_path)) == 1
    with pytest.raises(FileNotFoundError):
        SceneFlowDataset(tmp_path, render_pass="cleanpass")


@pytest.mark.parametrize("year, left_dir, right_dir, occ_dir, noc_dir", [
    (2015, "image_2", "image_3", "disp_occ_0", "disp_noc_0"),
    (2012, "colored_0", "colored_1", "disp_occ", "disp_noc"),
])
def test_kitti_layout(tmp_path, year, left_dir, right_dir, occ_dir, noc_dir):
    training = tmp_path / "training"
    for directory in (left_dir, right_dir):
        (training / directory).mkdir(parents=True)
        write_image_rgb(training / directory / "000000_10.png", image(5))
        write_image_rgb(training / directory / "000000_11.png", image(6))  # the next frame is not a pair
    occ = np.array([[0.0, 12.5, 30.0, 0, 0, 0]] * H, np.float32)
    noc = np.array([[0.0, 12.5, 0.0, 0, 0, 0]] * H, np.float32)
    (training / occ_dir).mkdir()
    (training / noc_dir).mkdir()
    write_kitti_disparity(training / occ_dir / "000000_10.png", occ)
    write_kitti_disparity(training / noc_dir / "000000_10.png", noc)
    (tmp_path / "testing" / left_dir).mkdir(parents=True)
    (tmp_path / "testing" / right_dir).mkdir(parents=True)
    write_image_rgb(tmp_path / "testing" / left_dir / "000007_10.png", image(5))
    write_image_rgb(tmp_path / "testing" / right_dir / "000007_10.png", image(5))

    dataset = open_dataset(f"kitti{year}", tmp_path)
    assert len(dataset) == 1
    sample = dataset[0]
    assert sample["name"] == "000000_10"
    np.testing.assert_array_equal(sample["disparity"][0], [np.nan, 12.5, 30.0, np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(sample["nocc"][0], [False, True, False, False, False, False])
    testing = KittiDataset(tmp_path, year=year, split="testing")
    assert [s["name"] for s in testing] == ["000007_10"] and "disparity" not in testing[0]


def test_eth3d_two_view_layout(tmp_path):
    write_pair(tmp_path / "two_view_training" / "delivery_area_1l", "im0.png", "im1.png", 40)
    write_middlebury_calib(tmp_path / "two_view_training" / "delivery_area_1l" / "calib.txt",
                           540.0, 370.0, 370.0, 220.0, 60.0, W, H, 64)
    gt = tmp_path / "two_view_training_gt" / "delivery_area_1l"
    gt.mkdir(parents=True)
    disparity = np.full((H, W), 7.25, np.float32)
    disparity[3, 5] = np.inf
    write_pfm(gt / "disp0GT.pfm", disparity)
    cv2.imwrite(str(gt / "mask0nocc.png"), np.where(np.eye(H, W, dtype=bool), 0, 255).astype(np.uint8))

    dataset = open_dataset("eth3d", tmp_path)
    sample = dataset[0]
    assert sample["name"] == "delivery_area_1l"
    assert np.isnan(sample["disparity"][3, 5]) and sample["disparity"][0, 0] == 7.25
    np.testing.assert_array_equal(sample["nocc"], ~np.eye(H, W, dtype=bool))
    assert sample["calib"]["cam0"][0, 0] == 540.0
    assert isinstance(dataset, ETH3DDataset)


def test_open_dataset_names_and_synthetic():
    synthetic = open_dataset("synthetic", None, n=2, seed=1, height=16, width=32, max_disparity=16)
    assert isinstance(synthetic, SyntheticStereoDataset) and len(synthetic) == 2
    assert synthetic[0]["left"].shape == (16, 32, 3)
    with pytest.raises(ValueError, match="unknown"):
        open_dataset("kitti2013", "/nowhere")


def test_training_dataset_tensors_and_validity(tmp_path):
    write_pair(tmp_path / "case", "im0.png", "im1.png", 51)
    disparity = np.full((H, W), 4.0, np.float32)
    disparity[0, 0], disparity[1, 1], disparity[2, 2] = np.inf, 0.0, 20.0  # no GT, no GT, beyond max_disparity
    write_pfm(tmp_path / "case" / "disp0GT.pfm", disparity)
    item = TrainingDataset(MiddleburyDataset(tmp_path), crop_size=None, augment=None, max_disparity=16)[0]
    assert item["left"].shape == (3, H, W) and item["left"].dtype == torch.float32
    torch.testing.assert_close(item["left"][:, 1, 1], torch.full((3,), 51 / 255))
    torch.testing.assert_close(item["right"][:, 0, 0], torch.tensor([1.0, 2.0, 3.0]) / 255)
    expected_valid = np.ones((H, W), bool)
    expected_valid[0, 0] = expected_valid[1, 1] = expected_valid[2, 2] = False
    np.testing.assert_array_equal(item["valid"].numpy(), expected_valid)
    np.testing.assert_array_equal(item["disparity"].numpy(), np.where(expected_valid, 4.0, 0.0))
