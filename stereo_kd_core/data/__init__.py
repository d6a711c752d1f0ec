"""Stereo data: file formats, data sets, the synthetic generators, augmentation, recordings and
the training view of samples (`TrainingDataset`, `MixedDataset`)."""

from .augment import AugmentConfig, augment_sample
from .datasets import (
    DATASETS,
    ETH3DDataset,
    KittiDataset,
    MiddleburyDataset,
    SceneFlowDataset,
    StereoFolderDataset,
    TrainingDataset,
    open_dataset,
)
from .io import (
    read_image_rgb,
    read_kitti_disparity,
    read_middlebury_calib,
    read_pfm,
    write_image_rgb,
    write_kitti_disparity,
    write_middlebury_calib,
    write_pfm,
)
from .mixed import MixedDataset
from .synthetic import SyntheticStereoDataset, SyntheticStereoGenerator, write_middlebury_dataset

__all__ = [
    "DATASETS",
    "AugmentConfig",
    "ETH3DDataset",
    "KittiDataset",
    "MiddleburyDataset",
    "MixedDataset",
    "SceneFlowDataset",
    "StereoFolderDataset",
    "SyntheticStereoDataset",
    "SyntheticStereoGenerator",
    "TrainingDataset",
    "augment_sample",
    "open_dataset",
    "read_image_rgb",
    "read_kitti_disparity",
    "read_middlebury_calib",
    "read_pfm",
    "write_image_rgb",
    "write_kitti_disparity",
    "write_middlebury_calib",
    "write_middlebury_dataset",
    "write_pfm",
]
