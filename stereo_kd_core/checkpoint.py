"""Checkpoints: one file with the weights and a JSON config that rebuilds the model.

Saved with ``torch.save`` and always read back with ``torch.load(weights_only=True)``, so
loading never unpickles code. Training state (optimizer, step, RNG, ...) rides along in the
same file; the shipped weights carry only the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_NAME = "stereo-kd-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not match its model."""


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: dict, *,
                    optimizer: torch.optim.Optimizer | None = None, step: int | None = None,
                    extra: dict | None = None) -> Path:
    """Write model weights + config (+ optional training state) atomically."""
    path = Path(path)
    json.dumps(config)  # fail here, not at load time, if the config cannot rebuild the model
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config_json": json.dumps(config, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if step is not None:
        payload["step"] = int(step)
    if extra:
        payload["extra"] = extra
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> dict:
    """Read a checkpoint safely. Returns a dict with config, state_dict, optimizer, step, extra."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} has SHA-256 {actual}, expected {expected_sha256}: "
                "the file is corrupt or was replaced"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt, or holds objects "
            f"that are not plain weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a stereo-kd checkpoint (no '{FORMAT_NAME}' header)")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload['version']}; this stereo-kd reads "
                              f"up to {FORMAT_VERSION}: upgrade stereo-kd")
    try:
        config = json.loads(payload["config_json"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is damaged: no readable config or weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} is damaged: config or weights have the wrong type")
    return {
        "config": config,
        "state_dict": state_dict,
        "optimizer": payload.get("optimizer"),
        "step": payload.get("step"),
        "extra": payload.get("extra", {}),
    }


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with an error that names every missing and unexpected key."""
    expected = set(model.state_dict().keys())
    given = set(state_dict.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        def listing(keys: list[str]) -> str:
            shown = ", ".join(keys[:12])
            return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
        raise CheckpointError(
            f"{source} does not match its model config: missing keys [{listing(missing)}]; "
            f"unexpected keys [{listing(unexpected)}]"
        )
    own = model.state_dict()
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise CheckpointError(f"{source} has tensors of the wrong shape: " + "; ".join(bad_shapes[:8]))
    model.load_state_dict(state_dict, strict=True)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               expected_sha256: str | None = None, calibration: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the model from a checkpoint's config and load its weights strictly (eval mode), with
    the confidence calibration `calibration` (a JSON table) or else `<stem>.confidence.json` beside
    the checkpoint when there is one, and
    as `model.working_scale` the input scale it is meant to run at, as `model.fit_range` whether
    it fits near scenes into its range and as `model.small_pairs` how it enlarges small pairs (its
    `extra["input_scale"]`, `extra["fit_range"]` and `extra["small_pairs"]`, written by `stereo-kd
    adapt` for a start that ran so; 1, False and None when absent), and how its eval forward sees
    colour and exposure (`extra["saturation"]`, `extra["match_exposure"]`: models.photometric)."""
    from stereo_kd_core.models import build_model
    from stereo_kd_core.models.confidence import ConfidenceCalibration, calibration_path
    from stereo_kd_core.models.photometric import set_photometric

    ckpt = load_checkpoint(path, expected_sha256=expected_sha256)
    try:
        model = build_model(ckpt["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has a config that builds no model: {exc}") from None
    load_state_dict_strict(model, ckpt["state_dict"], source=f"checkpoint {path}")
    # its confidence calibration: the table given (a shipped entry's own), else the JSON table beside it
    calibration = Path(calibration) if calibration is not None else calibration_path(path)
    if calibration.is_file() and hasattr(model, "confidence_calibration"):
        model.confidence_calibration = ConfidenceCalibration.read(calibration)
    model.working_scale = float((ckpt["extra"] or {}).get("input_scale", 1.0))
    model.fit_range = bool((ckpt["extra"] or {}).get("fit_range", False))
    model.small_pairs = (ckpt["extra"] or {}).get("small_pairs")
    try:
        set_photometric(model, ckpt["extra"] or {}, f"checkpoint {path}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return model.to(device).eval()
