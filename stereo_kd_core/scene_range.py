"""The share of a network's search range that its training scenes span, one number for the data
that makes the scenes and the inference that relies on it.

The generated training pairs (data.photo_stereo, data.synthetic) keep every scene disparity below
TRAINED_RANGE_FRACTION of max_disparity; the shipped networks learned nothing beyond it, so a
scaled model's range probe (scaled_estimator's fit_range) keeps an enlarged pair inside it."""

TRAINED_RANGE_FRACTION = 0.8
