"""Checkpoints: round trip, strict key matching, safe loading, corrupt files, SHA-256 checks."""

import pickle

import pytest
import torch

from stereo_kd_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sha256_of_file,
)
from stereo_kd_core.models import build_model, default_config


@pytest.fixture(scope="module")
def tiny_config():
    return default_config("dsnet-fast", max_disparity=64)


def test_round_trip_rebuilds_the_same_network(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, tiny_config, step=7, extra={"note": "x"})
    loaded = load_model(path)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["extra"] == {"note": "x"} and ckpt["config"] == tiny_config
    left = torch.rand(1, 3, 40, 72)
    right = torch.rand(1, 3, 40, 72)
    with torch.no_grad():
        assert torch.equal(model(left, right)[0], loaded(left, right)[0])


def test_weights_that_do_not_match_the_config_name_missing_and_unexpected_keys(tmp_path, tiny_config):
    model = build_model(tiny_config)
    path = save_checkpoint(tmp_path / "m.pt", model, tiny_config)
    payload = torch.load(path, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"]["bogus.weight"] = payload["state_dict"].pop(first)
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert first in str(info.value) and "bogus.weight" in str(info.value)


def test_pickled_code_is_never_executed(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "stereo-kd-checkpoint", "payload": Exploit()}, f)
    with pytest.raises(CheckpointError, match="not plain weights|corrupt"):
        load_checkpoint(path)


def test_truncated_file_and_wrong_hash_give_clear_errors(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "m.pt", build_model(tiny_config), tiny_config)
    digest = sha256_of_file(path)
    load_checkpoint(path, expected_sha256=digest)  # the right hash loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path, expected_sha256=digest)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a stereo-kd checkpoint"):
        load_checkpoint(other)


def test_damaged_header_or_config_is_a_checkpoint_error(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "m.pt", build_model(tiny_config), tiny_config)
    payload = torch.load(path, weights_only=True)
    broken = dict(payload, config_json="{not json")
    torch.save(broken, tmp_path / "bad_json.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "bad_json.pt")
    unknown = dict(payload, config_json='{"arch": "no-such-net"}')
    torch.save(unknown, tmp_path / "bad_arch.pt")
    with pytest.raises(CheckpointError, match="builds no model.*no-such-net"):
        load_model(tmp_path / "bad_arch.pt")
