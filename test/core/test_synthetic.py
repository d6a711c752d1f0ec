"""The synthetic generator: determinism, exact ground truth, occlusion mask, Middlebury export."""

import cv2
import numpy as np
import pytest
import torch

from stereo_kd_core.data.datasets import MiddleburyDataset
from stereo_kd_core.data.synthetic import SyntheticStereoDataset, SyntheticStereoGenerator, write_middlebury_dataset

HEIGHT, WIDTH, MAX_DISPARITY = 64, 128, 48


@pytest.fixture(scope="module")
def generator():
    return SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=3)


def warp_right_to_left(right: np.ndarray, disparity: np.ndarray) -> np.ndarray:
    """left_hat(x, y) = right(x - d(x, y), y), bilinear."""
    height, width = disparity.shape
    map_x = (np.arange(width, dtype=np.float32)[None, :] - disparity).astype(np.float32)
    map_y = np.repeat(np.arange(height, dtype=np.float32)[:, None], width, axis=1)
    return cv2.remap(right.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)


def test_deterministic_per_seed_and_index(generator):
    a, b = generator.sample(5), generator.sample(5)
    for key in ("left", "right", "disparity", "nocc"):
        np.testing.assert_array_equal(a[key], b[key])
    other_index = generator.sample(6)
    other_seed = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=4).sample(5)
    assert not np.array_equal(a["left"], other_index["left"])
    assert not np.array_equal(a["disparity"], other_seed["disparity"])


def test_sample_format_and_disparity_range(generator):
    samples = [generator.sample(i) for i in range(4)]
    for s in samples:
        assert s["left"].shape == s["right"].shape == (HEIGHT, WIDTH, 3) and s["left"].dtype == np.uint8
        assert s["disparity"].shape == (HEIGHT, WIDTH) and s["disparity"].dtype == np.float32
        assert s["nocc"].dtype == bool
        assert np.isfinite(s["disparity"]).all()
        assert s["disparity"].min() >= 1.0 - 1e-4 and s["disparity"].max() <= 0.8 * MAX_DISPARITY + 1e-3
        assert s["calib"]["ndisp"] == MAX_DISPARITY and s["calib"]["cam0"].shape == (3, 3)
    # the scenes use the range: small background disparities and near objects
    all_disparities = np.concatenate([s["disparity"].ravel() for s in samples])
    assert all_disparities.min() < 0.15 * MAX_DISPARITY
    assert all_disparities.max() > 0.5 * MAX_DISPARITY


def test_right_view_warped_by_ground_truth_reproduces_left(generator):
    kernel = np.ones((5, 5), np.uint8)
    for index in range(4):
        s = generator.sample(index)
        disparity, nocc = s["disparity"], s["nocc"]
        error = np.abs(warp_right_to_left(s["right"], disparity) - s["left"]).mean(axis=2)
        # away from depth edges and occlusion borders both bilinear neighbours lie on the same surface;
        # what remains is the interpolation error of the (blurred) texture plus 8-bit rounding
        grad_y, grad_x = np.gradient(disparity)
        depth_edges = cv2.dilate(((np.abs(grad_x) > 0.5) | (np.abs(grad_y) > 0.5)).astype(np.uint8), kernel) > 0
        interior = (cv2.erode(nocc.astype(np.uint8), kernel) > 0) & ~depth_edges
        assert interior.mean() > 0.3
        assert error[interior].mean() < 2.0
        assert np.percentile(error[interior], 90) < 4.0
        # the comparison is not vacuous: with the disparity off by 3 px the views disagree
        assert np.abs(warp_right_to_left(s["right"], disparity + 3) - s["left"]).mean(axis=2)[interior].mean() > 2.0


def test_nocc_marks_occlusions_and_out_of_view(generator):
    for index in range(4):
        s = generator.sample(index)
        disparity, nocc = s["disparity"].astype(np.float64), s["nocc"]
        x_right = np.arange(WIDTH)[None, :] - disparity
        out_of_view = x_right < 0
        assert not nocc[out_of_view].any()
        # independent check: forward-splat every left pixel to the right columns beside x - d and keep
        # the nearest disparity; a pixel is hidden when a clearly nearer surface lands on its column
        splat = np.full((HEIGHT, WIDTH + 2), -np.inf)
        rows = np.repeat(np.arange(HEIGHT)[:, None], WIDTH, axis=1)
        for columns in (np.floor(x_right), np.ceil(x_right)):
            columns = np.clip(columns, -1, WIDTH).astype(int) + 1
            np.maximum.at(splat, (rows, columns), disparity)
        nearest = splat[rows, np.clip(np.round(x_right), -1, WIDTH).astype(int) + 1]
        hidden = (nearest > disparity + 1.0) & ~out_of_view
        assert hidden.sum() > 0.01 * hidden.size  # the scenes do occlude
        # the splat is accurate to a pixel or two at object borders
        hidden_u8 = hidden.astype(np.uint8)
        band = np.ones((1, 5), np.uint8)
        border = cv2.dilate(hidden_u8, band) != cv2.erode(hidden_u8, band)
        assert not nocc[hidden & ~border].any()
        # the splat misses occluders that are hidden in the left view or lie outside it (possible only
        # for right columns >= WIDTH - largest disparity), so the converse holds only mostly
        comparable = ~out_of_view & ~border & (x_right < WIDTH - 0.8 * MAX_DISPARITY)
        assert (~nocc & ~hidden & comparable).mean() < 0.01


def test_dataset_wraps_generator():
    dataset = SyntheticStereoDataset(3, seed=1, height=32, width=64, max_disparity=32)
    assert len(dataset) == 3
    np.testing.assert_array_equal(dataset[2]["left"], dataset.generator.sample(2)["left"])
    with pytest.raises(IndexError):
        dataset[3]


@pytest.mark.parametrize("kind", ["photo", "planes"])
def test_write_middlebury_dataset_round_trip(tmp_path, kind):
    cases = write_middlebury_dataset(tmp_path, 2, seed=7, height=32, width=48, max_disparity=32, kind=kind)
    assert len(cases) == 2
    generator = SyntheticStereoDataset(2, seed=7, height=32, width=48, max_disparity=32, kind=kind).generator
    read = MiddleburyDataset(tmp_path)
    assert len(read) == 2
    for index in range(2):
        expected, got = generator.sample(index), read[index]
        np.testing.assert_array_equal(got["left"], expected["left"])
        np.testing.assert_array_equal(got["right"], expected["right"])
        np.testing.assert_array_equal(got["disparity"], expected["disparity"])
        np.testing.assert_array_equal(got["nocc"], expected["nocc"])
        np.testing.assert_allclose(got["calib"]["cam0"], expected["calib"]["cam0"])
        assert got["calib"]["ndisp"] == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_renders_the_same_scene():
    cpu = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=3).sample(1)
    gpu = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=3, device="cuda").sample(1)
    np.testing.assert_allclose(gpu["disparity"], cpu["disparity"], atol=1e-3)
    assert (np.abs(gpu["left"].astype(int) - cpu["left"]) > 1).mean() < 1e-3
    assert (np.abs(gpu["right"].astype(int) - cpu["right"]) > 1).mean() < 1e-3
    assert (gpu["nocc"] != cpu["nocc"]).mean() < 1e-3
