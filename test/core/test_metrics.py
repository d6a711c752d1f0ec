"""Metrics against values computed by hand on tiny arrays."""

import math

import numpy as np
import pytest
import torch

from stereo_kd_core.metrics import aggregate_metrics, stereo_metrics

NAN = np.nan
# valid ground truth: 1, 2, 10, 100, 50 (NaN, 0 and 200 >= max_disparity are not scored)
GT = np.array([[1.0, 2.0, 10.0, 100.0], [NAN, 0.0, 200.0, 50.0]])
# errors on valid pixels: 0.5, 2.5, 3.2, 4.0 and a NaN prediction
PRED = np.array([[1.5, 4.5, 13.2, 104.0], [5.0, 5.0, 5.0, NAN]])


def test_hand_computed_case():
    m = stereo_metrics(PRED, GT, max_disparity=192)
    assert m["valid_pixels"] == 5
    assert m["epe"] == pytest.approx((0.5 + 2.5 + 3.2 + 4.0) / 4)  # the NaN prediction is not averaged
    assert m["bad1"] == pytest.approx(80.0)  # 2.5, 3.2, 4.0, NaN
    assert m["bad2"] == pytest.approx(80.0)
    assert m["bad3"] == pytest.approx(60.0)  # 3.2, 4.0, NaN
    # D1 needs both: 3.2 > 3 and > 0.5 (5 % of 10) -> outlier; 4.0 > 3 but < 5 (5 % of 100) -> not; NaN -> outlier
    assert m["d1"] == pytest.approx(40.0)
    assert m["density"] == pytest.approx(80.0)


def test_mask_and_max_disparity_restrict_valid_pixels():
    mask = np.ones_like(GT, dtype=bool)
    mask[0, 2] = False  # drop the gt=10 pixel (error 3.2)
    m = stereo_metrics(PRED, GT, max_disparity=192, mask=mask)
    assert m["valid_pixels"] == 4
    assert m["epe"] == pytest.approx(7.0 / 3)
    assert m["bad3"] == pytest.approx(50.0)
    assert m["d1"] == pytest.approx(25.0)
    # max_disparity 60 also removes gt=100 (error 4.0): left 1, 2, 50 with errors 0.5, 2.5, NaN
    m = stereo_metrics(PRED, GT, max_disparity=60, mask=mask)
    assert m["valid_pixels"] == 3
    assert m["epe"] == pytest.approx(1.5)
    assert m["bad2"] == pytest.approx(200 / 3)


def test_torch_inputs_match_numpy():
    expected = stereo_metrics(PRED, GT)
    got = stereo_metrics(torch.tensor(PRED, dtype=torch.float32), torch.tensor(GT, dtype=torch.float32),
                         mask=torch.ones(GT.shape, dtype=torch.bool))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6)


def test_no_valid_pixels_and_shape_mismatch():
    m = stereo_metrics(np.zeros((2, 2)), np.full((2, 2), NAN))
    assert m["valid_pixels"] == 0 and math.isnan(m["epe"]) and math.isnan(m["d1"])
    with pytest.raises(ValueError, match="shape"):
        stereo_metrics(np.zeros((2, 2)), np.zeros((2, 3)))


def test_aggregate_case_mean_and_pixel_weighted():
    case_a = stereo_metrics(PRED, GT)  # epe 2.55 over 4 finite, bad3 60 % of 5, density 80
    case_b = stereo_metrics(np.array([[10.0, 20.0]]), np.array([[10.0, 10.0]]))  # epe 5, bad3 50 % of 2
    empty = stereo_metrics(np.zeros((1, 1)), np.zeros((1, 1)))
    agg = aggregate_metrics([case_a, case_b, empty])
    assert agg["cases"] == 3 and agg["valid_pixels"] == 7
    assert agg["epe"] == pytest.approx((2.55 + 5.0) / 2)
    assert agg["bad3"] == pytest.approx((60.0 + 50.0) / 2)
    # pooled: (10.2 + 10) px of error over 4 + 2 finite predictions; 3 + 1 bad-3 pixels of 7
    assert agg["epe_pixel_weighted"] == pytest.approx(20.2 / 6)
    assert agg["bad3_pixel_weighted"] == pytest.approx(400 / 7)
    assert agg["density_pixel_weighted"] == pytest.approx(600 / 7)
