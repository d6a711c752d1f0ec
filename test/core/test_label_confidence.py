"""The label-confidence rule: a teacher that is wrong in a region, consistently in both views (so
its own left-right check passes), gets confidence 0 there from the independent evidence (real
OpenCV SGBM on the pair, the student, photometric consistency), and keeps its right labels."""

import numpy as np
import pytest
from test_corpus import DISPARITY_PX, rectified_pair

from stereo_kd_core.distill.label_confidence import (
    DEFAULT_RULE,
    ConfidenceEvidence,
    ConfidenceRule,
    label_confidence,
    left_right_consistent,
    photometric_error,
)

WRONG = (slice(80, 160), slice(120, 220))  # rows, columns of the deliberately wrong label
WRONG_BY_PX = 6.0


@pytest.fixture(scope="module")
def scene():
    from stereo_kd_core.estimator import StereoEstimator

    left, right = rectified_pair(seed=5)
    truth = np.full(left.shape[:2], DISPARITY_PX, np.float32)
    label = truth.copy()
    label[WRONG] += WRONG_BY_PX
    sgbm = StereoEstimator.load("sgbm", max_disparity=64).predict(left, right).disparity
    # the teacher is consistently wrong: its right-view disparity agrees with its wrong label
    label_right = truth.copy()
    shift = int(DISPARITY_PX + WRONG_BY_PX)
    label_right[WRONG[0], WRONG[1].start - shift:WRONG[1].stop - shift] = DISPARITY_PX + WRONG_BY_PX
    return left, right, truth, label, label_right, sgbm


def test_wrong_region_gets_zero_confidence_under_the_default_rule(scene):
    left, right, truth, label, label_right, sgbm = scene
    evidence = ConfidenceEvidence(disparity=label, disparity_right=label_right,
                                  teacher_confidence=np.full_like(label, 0.9), sgbm=sgbm, student=truth.copy())
    assert left_right_consistent(label, label_right, 1.0)[WRONG].all()  # its own check does not see it
    confidence = label_confidence(evidence, left, right, DEFAULT_RULE)
    assert confidence.dtype == np.float32 and confidence.shape == label.shape
    assert np.all(confidence[WRONG] == 0)
    right_region = np.ones(label.shape, bool)
    right_region[WRONG] = False
    right_region[:, :DISPARITY_PX + 4] = False  # matches leave the right image at the left border
    assert np.isclose(confidence[right_region], 0.9).mean() > 0.8


# photometric consistency alone is a per-pixel test on texture: by chance about 1 % of wrong pixels
# look alike (and pixels whose window straddles the region's edge), so it rejects most, not all
@pytest.mark.parametrize(("rule", "kept_in_wrong_region"), [
    (ConfidenceRule(agreement="sgbm"), 0.0),
    (ConfidenceRule(agreement="none", photometric_max_error=6.0), 0.02),
])
def test_each_independent_test_alone_catches_the_wrong_region(scene, rule, kept_in_wrong_region):
    left, right, truth, label, label_right, sgbm = scene
    evidence = ConfidenceEvidence(disparity=label, disparity_right=label_right, sgbm=sgbm)
    confidence = label_confidence(evidence, left, right, rule)
    assert (confidence[WRONG] > 0).mean() <= kept_in_wrong_region
    assert confidence[:, 240:].mean() > 0.8  # a region the label gets right (SGBM's invalid border excluded)


def test_left_right_check_and_missing_evidence():
    label = np.full((32, 64), 4.0, np.float32)
    right_view = label.copy()
    right_view[:, 20:30] = 9.0  # the right view disagrees where left pixels x=24..33 land
    consistent = left_right_consistent(label, right_view, 1.0)
    assert not consistent[:, 24:34].any() and consistent[:, 40:].all() and not consistent[:, :4].any()
    evidence = ConfidenceEvidence(disparity=label)
    with pytest.raises(ValueError, match="right-view disparity"):
        label_confidence(evidence)
    with pytest.raises(ValueError, match="needs the sgbm disparity"):
        label_confidence(ConfidenceEvidence(disparity=label, disparity_right=label),
                         rule=ConfidenceRule(agreement="sgbm"))


def test_photometric_error_is_small_at_the_true_disparity_only(scene):
    left, right, truth, *_ = scene
    at_truth = photometric_error(left, right, truth)[:, DISPARITY_PX:]
    off_by_3 = photometric_error(left, right, truth + 3)[:, DISPARITY_PX + 3:]
    assert np.median(at_truth) < 1.0 and np.median(off_by_3) > 5 * np.median(at_truth) + 3
