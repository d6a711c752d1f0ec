"""Narrowing: a wider network of the same architecture starts a narrower student by keeping the
first channels of every width, with the concatenated inputs mapped channel by channel."""

from __future__ import annotations

import pytest
import torch

from stereo_kd_core.checkpoint import save_checkpoint
from stereo_kd_core.data.synthetic import write_middlebury_dataset
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.models.narrow import input_channel_maps, narrow_state_dict
from stereo_kd_core.train import Trainer, load_recipe

NARROW = dict(default_config("dsnet-fast", 32), stem_channels=8, layer_channels=[8, 8, 16, 16], groups=5,
              concat_channels=2, attention_channels=2, aggregation_channels=4, mask_channels=8,
              refine_channels=4)
WIDE = dict(NARROW, stem_channels=12, layer_channels=[12, 16, 24, 24], groups=8, concat_channels=4,
            attention_channels=4, aggregation_channels=6, mask_channels=12, refine_channels=6)


def _embedded(narrow: torch.nn.Module) -> torch.nn.Module:
    """The wide network whose first channels are `narrow` and whose other channels add nothing:
    every weight into or out of an extra channel is zero, extra BatchNorm outputs are zero."""
    wide = build_model(WIDE).eval()
    maps = input_channel_maps(WIDE, NARROW)
    state = {}
    for name, wide_value in wide.state_dict().items():
        value = torch.zeros_like(wide_value)
        if name.endswith("running_var"):
            value.fill_(1.0)
        small = narrow.state_dict()[name]
        if value.dim() == 0:
            state[name] = small.clone()
            continue
        index = [torch.arange(size) for size in small.shape]
        if name in maps:
            index[1] = maps[name]
        value[torch.meshgrid(*index, indexing="ij")] = small
        state[name] = value
    wide.load_state_dict(state)
    return wide


def test_narrowing_recovers_the_embedded_network_and_its_outputs():
    torch.manual_seed(0)
    narrow = build_model(NARROW).eval()
    with torch.no_grad():  # random BatchNorm statistics and a refinement that does something
        for name, parameter in narrow.named_parameters():
            if "bn" in name or parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
        narrow.refinement.residual.weight.normal_(0.0, 0.1)
        for module in narrow.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    wide = _embedded(narrow)
    # float64: the wide network sums over more (zero) channels in another order
    left, right = torch.rand(1, 3, 32, 64, dtype=torch.float64), torch.rand(1, 3, 32, 64, dtype=torch.float64)
    with torch.no_grad():
        small_disparity, _ = narrow.double()(left, right)
        wide_disparity, _ = wide.double()(left, right)
        narrow.float(), wide.float()
    # the index maps say where each concatenated channel went: were one wrong, the wide network
    # would read a different channel there and its output would differ
    torch.testing.assert_close(wide_disparity, small_disparity, rtol=1e-9, atol=1e-9)
    shapes = {name: value.shape for name, value in narrow.state_dict().items()}
    recovered = narrow_state_dict(wide.state_dict(), WIDE, NARROW, shapes)
    for name, value in narrow.state_dict().items():
        torch.testing.assert_close(recovered[name], value, rtol=0, atol=0)


def test_narrowing_refuses_what_it_cannot_map():
    wide = build_model(WIDE)
    shapes = {name: value.shape for name, value in build_model(NARROW).state_dict().items()}
    with pytest.raises(ValueError, match="groups of the same size"):
        narrow_state_dict(wide.state_dict(), WIDE, dict(NARROW, groups=10), shapes)
    with pytest.raises(ValueError, match="keeps max_disparity"):
        narrow_state_dict(wide.state_dict(), WIDE, dict(NARROW, max_disparity=64), shapes)
    with pytest.raises(ValueError, match="differ in structure"):
        narrow_state_dict(wide.state_dict(), WIDE, dict(NARROW, layer_channels=[8, 8, 16, 24], groups=6),
                          {name: value.shape for name, value in
                           build_model(dict(NARROW, layer_channels=[8, 8, 16, 24], groups=6)).state_dict().items()})
    with pytest.raises(ValueError, match="would widen"):
        narrow_state_dict(build_model(NARROW).state_dict(), NARROW, WIDE,
                          {name: value.shape for name, value in wide.state_dict().items()})


def test_init_from_a_wider_checkpoint_narrows_it(tmp_path):
    torch.manual_seed(1)
    wide = build_model(WIDE)
    save_checkpoint(tmp_path / "wide.pt", wide, WIDE)
    write_middlebury_dataset(tmp_path / "data", 2, seed=3, height=32, width=64, max_disparity=16)
    recipe = load_recipe("tiny-dsnet")
    recipe["model"] = dict(NARROW)
    recipe["data"]["train"] = {"name": "middlebury", "root": str(tmp_path / "data")}
    recipe["data"]["crop"] = [32, 64]
    recipe["train"].update(init_from=str(tmp_path / "wide.pt"), steps=1, batch_size=1, amp="none")
    trainer = Trainer(recipe, tmp_path / "run")
    shapes = {name: value.shape for name, value in trainer.student.state_dict().items()}
    expected = narrow_state_dict(wide.state_dict(), WIDE, NARROW, shapes)
    for name, value in trainer.student.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert trainer.run() is not None
