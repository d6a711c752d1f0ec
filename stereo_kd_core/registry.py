"""Model names -> shipped weights (inside the package) or classical backends; the one default
model every caller runs when it names none; what ran, for consoles and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"
CLASSICAL_BACKENDS = ("sgbm",)


def default_cache_dir() -> Path:
    """Where stereo-kd keeps what it downloads or builds (teacher weights, compiled kernels,
    TensorRT engines): ``$STEREO_KD_CACHE``, else ``~/.cache/stereo-kd``."""
    return Path(os.environ.get("STEREO_KD_CACHE") or Path.home() / ".cache" / "stereo-kd")
SHA256_SHOWN = 12  # hex digits of a SHA-256 shown in console lines and pictures (JSON has all 64)


def _manifest() -> dict:
    if not MANIFEST_PATH.is_file():
        return {}
    with open(MANIFEST_PATH) as f:
        return json.load(f)


def shipped_models() -> dict[str, dict]:
    """{registry name: {"file": ..., "sha256": ..., ...}} for the weights inside this install."""
    return _manifest().get("models", {})


def default_model() -> str:
    """The registry name run wherever none is given (the node, the launch file, config/stereo.yaml,
    every `stereo-kd` command, StereoEstimator.load()): the manifest's "default", a shipped
    model. Shipping a new default = changing that one key. ValueError when none ships."""
    name = _manifest().get("default")
    if name is None or name not in shipped_models():
        raise ValueError(f"no trained default student ships with this install ({MANIFEST_PATH} names "
                         f"{name!r} as its default, shipped: {', '.join(shipped_models()) or 'none'}); "
                         "name a model explicitly: a registry name or a checkpoint path")
    return name


def known_model_names() -> list[str]:
    return sorted(set(shipped_models()) | set(CLASSICAL_BACKENDS))


def resolve_shipped(name: str) -> tuple[Path, str]:
    """(weights path, expected SHA-256) of a registry name; ValueError listing the known names."""
    models = shipped_models()
    if name not in models:
        from stereo_kd_core.models import ARCHITECTURES

        hint = ""
        if name in ARCHITECTURES:
            hint = (f" '{name}' is an architecture with no weights shipped in this install: train it "
                    f"(stereo-kd train / distill) and pass the checkpoint path.")
        raise ValueError(f"unknown model '{name}'.{hint} Known models: {', '.join(known_model_names())}; "
                         "or give a path to a checkpoint file")
    entry = models[name]
    return WEIGHTS_DIR / entry["file"], entry["sha256"]


def shipped_calibration(name: str | None) -> Path | None:
    """A shipped entry's own confidence table (manifest `confidence`, a file in the weights folder),
    for an entry that runs its weights differently from the file's other entries (a working scale):
    None when it has none (the table beside the weights file applies)."""
    table = shipped_models().get(name or "", {}).get("confidence")
    return None if table is None else WEIGHTS_DIR / table


def working_scale(name: str | None) -> float:
    """The input scale a shipped model runs at unless told otherwise (its manifest's
    `input_scale`, 1 when it has none; 1 for checkpoint paths and classical backends). A network
    whose error is about constant in its own pixels is more exact on an enlarged pair
    (README, "Input scale"); a model shipped with a scale was measured and chosen at it, and a
    caller's input_scale multiplies it."""
    return float(shipped_models().get(name or "", {}).get("input_scale", 1.0))


def fits_range(name: str | None) -> bool:
    """Whether a shipped model fits near scenes into its range (manifest `fit_range`: a probe
    chooses a smaller scale for pairs whose enlarged disparities would pass what it learned;
    scaled_estimator.ScaledEstimator)."""
    return bool(shipped_models().get(name or "", {}).get("fit_range", False))


def load_shipped(name: str):
    """A shipped entry's network, its file verified by SHA-256, with the entry's confidence table
    (`shipped_calibration`, else the one beside the file) and how the entry runs it as
    `network.working_scale`, `network.fit_range` and `network.small_pairs` (the manifest's
    `small_pairs` or None; a checkpoint file carries its own, see checkpoint.load_model), and the
    entry's `saturation` and `match_exposure` (models.photometric: how it sees colour and exposure)."""
    from stereo_kd_core.checkpoint import load_model
    from stereo_kd_core.models.photometric import set_photometric

    path, sha = resolve_shipped(name)
    network = load_model(path, expected_sha256=sha, calibration=shipped_calibration(name))
    network.working_scale, network.fit_range = working_scale(name), fits_range(name)
    entry = shipped_models().get(name, {})
    network.small_pairs = entry.get("small_pairs")
    return set_photometric(network, entry, f"manifest entry '{name}'")


def model_source(model: str | None) -> dict[str, str | None]:
    """{"model_file", "model_sha256"} of what `model` (as given to StereoEstimator.load) names: a
    registry name's shipped file and manifest hash (verified at load), a file's path and hash;
    None for both for classical backends and for None (source not known)."""
    if model is None or model in CLASSICAL_BACKENDS:
        return {"model_file": None, "model_sha256": None}
    if model in shipped_models():
        path, sha = resolve_shipped(model)
        return {"model_file": str(path), "model_sha256": sha}
    from stereo_kd_core.checkpoint import sha256_of_file

    path = Path(model).expanduser()
    return {"model_file": str(path), "model_sha256": sha256_of_file(path) if path.is_file() else None}


def describe_estimator(estimator: Any, model: str | None) -> dict[str, Any]:
    """What ran, as every command's JSON carries it (`describe` of a loaded estimator; `model`
    is the spec it was loaded from)."""
    return describe(model, estimator.name, estimator.backend, estimator.device, estimator.precision,
                    channels_last=bool(getattr(estimator, "channels_last", False)))


def describe(model: str | None, name: str, backend: str, device: str, precision: str,
             channels_last: bool = False) -> dict[str, Any]:
    """What ran: the name, the file and SHA-256 `model` came from (`model_source`), backend,
    layout, device and precision."""
    return {"model": name, **model_source(model), "backend": backend, "channels_last": channels_last,
            "device": device, "precision": precision}


def describe_line(description: dict[str, Any]) -> str:
    """A `describe_estimator` dict as console text, e.g. 'dsnet-fast (dsnet-fast.pt, sha256
    d473f2311e4b) pytorch channels_last bf16 on cpu'."""
    source = ""
    if description.get("model_file"):
        sha = description.get("model_sha256")
        source = f" ({Path(description['model_file']).name}" + (f", sha256 {sha[:SHA256_SHOWN]})" if sha else ")")
    layout = " channels_last" if description.get("channels_last") else ""
    return (f"{description['model']}{source} {description['backend']}{layout} {description['precision']} "
            f"on {description['device']}")
