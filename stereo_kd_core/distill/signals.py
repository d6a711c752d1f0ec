"""Where a training sample's teaching signals come from (DESIGN.md, "Where teaching signals come from").

Every training item (`stereo_kd_core.data.TrainingDataset`) carries, besides the images:

    disparity       float32 (h, w)  the target disparity, pixels (0 where there is none)
    weight          float32 (h, w)  how much each pixel's target counts, >= 0 (0 = no supervision)
    valid           bool    (h, w)  weight > 0
    source          int64   ()      where the target came from: SOURCE_GROUND_TRUTH or SOURCE_PSEUDO_LABEL
    teacher_points  bool    ()      whether the teacher's internal points (live, or cached in
                                    "teacher_prob" / "teacher_disparity") teach this sample

One objective (`stereo_kd_core.distill.objective.TrainingObjective`) consumes any mix of them.
"""

SOURCE_GROUND_TRUTH = 0  # a data set's ground truth (generated pairs, labelled benchmarks)
SOURCE_PSEUDO_LABEL = 1  # a teacher's pseudo-label on a real pair without ground truth
