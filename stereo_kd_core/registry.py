"""Model names -> shipped weights (inside the package) or classical backends."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"
CLASSICAL_BACKENDS = ("sgbm",)


def shipped_models() -> dict[str, dict]:
    """{registry name: {"file": ..., "sha256": ..., ...}} for the weights inside this install."""
    if not MANIFEST_PATH.is_file():
        return {}
    with open(MANIFEST_PATH) as f:
        return json.load(f)["models"]


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
