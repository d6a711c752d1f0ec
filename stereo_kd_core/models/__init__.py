"""Stereo networks: the `acv-teacher`, the lean `dsnet` student, `dsnet-fast`, and `psmnet`
(which loads the official KITTI 2015 weights, as a teacher trained on real data)."""

from __future__ import annotations

import inspect

from torch import nn

from .acv_teacher import AcvTeacher
from .dsnet import DSNet
from .dsnet_fast import DSNetFast
from .psmnet import PSMNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    AcvTeacher.arch: AcvTeacher,
    DSNet.arch: DSNet,
    DSNetFast.arch: DSNetFast,
    PSMNet.arch: PSMNet,
}


def _architecture(arch: str) -> type[nn.Module]:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def default_config(arch: str, max_disparity: int = 192) -> dict:
    """JSON-serialisable config of `arch` with its default constructor arguments."""
    parameters = inspect.signature(_architecture(arch).__init__).parameters
    config: dict = {"arch": arch}
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        config[name] = list(default) if isinstance(default, tuple) else default
    config["max_disparity"] = max_disparity
    return config


def build_model(config: dict) -> nn.Module:
    """The model a config describes: ARCHITECTURES[config["arch"]](**rest)."""
    arguments = {key: value for key, value in config.items() if key != "arch"}
    return _architecture(config["arch"])(**arguments)


__all__ = ["ARCHITECTURES", "AcvTeacher", "DSNet", "DSNetFast", "PSMNet", "build_model", "default_config"]
