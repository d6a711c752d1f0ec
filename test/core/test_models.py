"""The stereo networks and their building blocks (CPU, tiny inputs)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from stereo_kd_core.models import ARCHITECTURES, build_model, default_config
from stereo_kd_core.models.blocks import (
    FEATURE_STAGES,
    OneDnnConv3d,
    PointwiseConv3d,
    cat_channels,
    concat_volume,
    conv_layout,
    convex_combine,
    convex_upsample,
    convex_weights,
    group_correlation_volume,
    onednn_3d_convolutions,
    onednn_convolution_available,
    pad_to_multiple,
    pointwise_as_matmul,
    shift_rows,
    soft_argmin,
)
from stereo_kd_core.models.confidence import distribution_confidence
from stereo_kd_core.models.photometric import (
    as_seen,
    channel_statistics,
    desaturate,
    match_exposure,
    normalised_as_seen,
    photometric_settings,
    set_photometric,
)
from stereo_kd_core.models.profile import count_flops, count_parameters

HEIGHT, WIDTH = 37, 61  # odd on purpose: exercises padding and cropping
MAX_DISPARITY = 32  # the smallest every architecture accepts (dsnet-fast: multiple of 32)
OWN_ARCHITECTURES = ("acv-teacher", "dsnet", "dsnet-fast")  # psmnet has its own tests
REFINED = "dsnet-fast+refine"  # dsnet-fast with the image-guided refinement (one more output)


def refined_config(max_disparity: int = MAX_DISPARITY, channels: int = 8) -> dict:
    return default_config("dsnet-fast", max_disparity) | {"refine_channels": channels}


def perturb_refinement(network: nn.Module) -> nn.Module:
    """The refinement starts as the identity; give its last layer weights so that it acts."""
    nn.init.normal_(network.refinement.residual.weight, std=0.05)
    return network


@pytest.fixture(scope="module", params=(*OWN_ARCHITECTURES, REFINED))
def model(request) -> nn.Module:
    torch.manual_seed(0)
    if request.param == REFINED:
        return perturb_refinement(build_model(refined_config()))
    return build_model(default_config(request.param, MAX_DISPARITY))


def stereo_pair(batch: int = 2, height: int = HEIGHT, width: int = WIDTH, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    left = torch.rand(batch, 3, height, width, generator=generator)
    right = torch.rand(batch, 3, height, width, generator=generator)
    return left, right


def padded(size: int, stride: int) -> int:
    return -(-size // stride) * stride


# ---------------------------------------------------------------- whole networks


def test_training_outputs_every_contract_key_with_its_shape(model):
    model.train()
    left, right = stereo_pair()
    outputs = model(left, right)

    height, width = padded(HEIGHT, model.stride), padded(WIDTH, model.stride)
    h, w = height // model.cost_stride, width // model.cost_stride
    levels = MAX_DISPARITY // model.cost_stride
    groups = model.config["groups"]
    expected = {}
    for stage in model.feature_stages:
        expected[f"feat.{stage}.left"] = expected[f"feat.{stage}.right"] = None
    correlation_channels = sum(model.config["layer_channels"][1:])
    expected["feat.gwc.left"] = expected["feat.gwc.right"] = (2, correlation_channels, h, w)
    expected["volume.gwc"] = (2, groups, levels, h, w)
    expected["volume.attention"] = (2, 1, levels, h, w)
    for index in range(model.num_costs):
        expected[f"cost.{index}"] = (2, levels, h, w)
    for index in range(model.num_outputs):
        expected[f"disp.{index}"] = (2, HEIGHT, WIDTH)
    expected["disp"] = (2, HEIGHT, WIDTH)

    assert set(outputs) == set(expected)
    for key, shape in expected.items():
        if shape is not None:
            assert tuple(outputs[key].shape) == shape, key
    for stage in model.feature_stages:
        left_features = outputs[f"feat.{stage}.left"]
        assert left_features.shape == outputs[f"feat.{stage}.right"].shape
        assert left_features.shape[0] == 2 and left_features.shape[-1] * model.cost_stride >= width
    assert torch.equal(outputs["disp"], outputs[f"disp.{model.num_outputs - 1}"])
    # attention weights are a distribution over disparity
    torch.testing.assert_close(outputs["volume.attention"].sum(2), torch.ones(2, 1, h, w))


def test_eval_returns_disparity_and_confidence_in_range(model):
    model.eval()
    left, right = stereo_pair()
    with torch.no_grad():
        disparity, confidence = model(left, right)
    for tensor in (disparity, confidence):
        assert tensor.shape == (2, HEIGHT, WIDTH)
        assert tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
    assert disparity.min() >= 0 and disparity.max() <= MAX_DISPARITY
    assert confidence.min() >= 0 and confidence.max() <= 1


def test_eval_batch_equals_samples_run_one_by_one(model):
    # Both views go through the backbone as one batch: a mix-up of the split would show here.
    model.eval()
    left, right = stereo_pair()
    with torch.no_grad():
        batch_disparity, batch_confidence = model(left, right)
        for index in range(2):
            disparity, confidence = model(left[index : index + 1], right[index : index + 1])
            torch.testing.assert_close(disparity[0], batch_disparity[index], atol=0.02, rtol=1e-3)
            torch.testing.assert_close(confidence[0], batch_confidence[index], atol=1e-3, rtol=1e-3)


def test_eval_runs_only_the_final_cost_head(model):
    model.eval()
    calls = []
    hooks = [
        head.register_forward_hook(lambda module, inputs, output, index=index: calls.append(index))
        for index, head in enumerate(model.aggregation.heads)
    ]
    try:
        with torch.no_grad():
            model(*stereo_pair(batch=1))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [model.num_costs - 1]


def test_contract_attributes():
    expected = {  # arch: (cost_stride, num_costs, num_outputs)
        "acv-teacher": (4, 3, 3),
        "dsnet": (4, 3, 3),
        "dsnet-fast": (8, 2, 2),
        REFINED: (8, 2, 3),
    }
    for arch, (cost_stride, num_costs, num_outputs) in expected.items():
        network = build_model(refined_config(64) if arch == REFINED else default_config(arch, 64))
        assert network.max_disparity == 64
        assert network.cost_stride == cost_stride
        assert network.stride == 4 * cost_stride
        assert (network.num_costs, network.num_outputs) == (num_costs, num_outputs)
        assert network.feature_stages == FEATURE_STAGES


def test_config_round_trip_rebuilds_the_same_model():
    assert set(OWN_ARCHITECTURES) <= set(ARCHITECTURES)
    for arch in OWN_ARCHITECTURES:
        config = default_config(arch, 64)
        assert config["arch"] == arch and config["max_disparity"] == 64
        assert json.loads(json.dumps(config)) == config
        network = build_model(config)
        assert network.config == config
        rebuilt = build_model(json.loads(json.dumps(network.config)))
        original_state, rebuilt_state = network.state_dict(), rebuilt.state_dict()
        assert original_state.keys() == rebuilt_state.keys()
        assert all(original_state[k].shape == rebuilt_state[k].shape for k in original_state)
        rebuilt.load_state_dict(original_state, strict=True)


def test_config_changes_reach_the_model():
    config = default_config("dsnet", 64) | {"aggregation_channels": 8, "groups": 20}
    network = build_model(config)
    assert network.config == config
    outputs = network(*stereo_pair(batch=1))
    assert outputs["volume.gwc"].shape[1] == 20
    assert count_parameters(network) < count_parameters(build_model(default_config("dsnet", 64)))


def test_unknown_architecture_and_bad_disparity_are_refused():
    with pytest.raises(ValueError, match="acv-teacher.*dsnet.*dsnet-fast"):
        build_model({"arch": "no-such-net"})
    with pytest.raises(ValueError, match="known"):
        default_config("no-such-net")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model(default_config("dsnet", 40))
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model(default_config("dsnet-fast", 48))


def test_parameter_counts():
    students = count_parameters(build_model(default_config("dsnet")))
    assert 1_500_000 <= students <= 2_000_000
    teacher = count_parameters(build_model(default_config("acv-teacher")))
    assert teacher > 3 * students


@pytest.mark.parametrize("config", [default_config("dsnet", MAX_DISPARITY), refined_config()],
                         ids=["dsnet", REFINED])
def test_gradient_reaches_every_parameter(config):
    torch.manual_seed(0)
    network = build_model(config).train()
    if config.get("refine_channels"):
        perturb_refinement(network)
    outputs = network(*stereo_pair(batch=1, height=32, width=64))
    loss = sum(outputs[f"disp.{i}"].mean() for i in range(network.num_outputs))
    loss = loss + outputs["feat.stem.left"].mean() + outputs["volume.attention"].std()
    loss.backward()
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_a_new_refinement_is_the_identity_and_acts_at_full_resolution():
    torch.manual_seed(0)
    plain = build_model(default_config("dsnet-fast", MAX_DISPARITY)).eval()
    refined = build_model(refined_config()).eval()
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("refinement.") for key in missing)
    plain.extrapolate_border = refined.extrapolate_border = False  # the raw outputs (test_border.py: the band)
    left, right = stereo_pair(batch=1, height=64, width=96)
    with torch.no_grad():
        torch.testing.assert_close(refined(left, right), plain(left, right), rtol=0, atol=0)
        # The residual is predicted per 2 x 2 block of full-resolution pixels (pixel shuffle):
        # a bias of (1, 2, 3, 4) adds 1 at even rows/even columns, 2 at even/odd, 3 at odd/even, 4 at odd/odd.
        refined.refinement.residual.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        difference = refined(left, right)[0] - plain(left, right)[0]
    pattern = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat(32, 48)
    torch.testing.assert_close(difference[0], pattern, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- blocks


def test_group_correlation_volume_by_hand():
    # C = 4 channels in G = 2 groups, one row of width 3, D = 3 levels.
    left = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [2.0, 0.0, 1.0], [0.0, 4.0, 2.0]])
    right = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 1.0], [1.0, 1.0, 0.0], [2.0, 1.0, 3.0]])
    volume = group_correlation_volume(left.view(1, 4, 1, 3), right.view(1, 4, 1, 3), 3, 2)
    assert volume.shape == (1, 2, 3, 1, 3)
    # group 0 = channels 0, 1; volume[g, d, x] = mean_c left[c, x] * right[c, x - d]
    expected_group0 = [
        [(1 * 1 + 1 * 3) / 2, (2 * 0 + 1 * 1) / 2, (3 * 2 + 1 * 1) / 2],  # d = 0
        [0.0, (2 * 1 + 1 * 3) / 2, (3 * 0 + 1 * 1) / 2],  # d = 1: x = 0 has no match
        [0.0, 0.0, (3 * 1 + 1 * 3) / 2],  # d = 2
    ]
    expected_group1 = [
        [(2 * 1 + 0 * 2) / 2, (0 * 1 + 4 * 1) / 2, (1 * 0 + 2 * 3) / 2],
        [0.0, (0 * 1 + 4 * 2) / 2, (1 * 1 + 2 * 1) / 2],
        [0.0, 0.0, (1 * 1 + 2 * 2) / 2],
    ]
    torch.testing.assert_close(volume[0, 0, :, 0], torch.tensor(expected_group0))
    torch.testing.assert_close(volume[0, 1, :, 0], torch.tensor(expected_group1))


def test_group_correlation_peaks_at_the_true_shift():
    generator = torch.Generator().manual_seed(0)
    right = torch.randn(1, 2, 4, 5, 20, generator=generator)
    # unit vectors per group: by Cauchy-Schwarz only the true match reaches the maximum
    right = (right / right.norm(dim=2, keepdim=True)).view(1, 8, 5, 20)
    shift = 3
    left = torch.zeros_like(right)
    left[..., shift:] = right[..., :-shift]  # left(x) = right(x - shift)
    volume = group_correlation_volume(left, right, 6, 2)
    assert (volume[..., shift:].argmax(dim=2) == shift).all()
    assert (volume[:, :, 4, :, :4] == 0).all()  # x < d: out of the right image


def test_group_correlation_volume_matches_its_definition_across_tiles():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(2, 6, 3, 37, generator=generator)  # 37 columns: three 16-column tiles
    right = torch.randn(2, 6, 3, 37, generator=generator)
    levels, groups = 5, 3
    volume = group_correlation_volume(left, right, levels, groups)
    expected = torch.zeros(2, groups, levels, 3, 37)
    for d in range(levels):
        products = (left[..., d:] * right[..., : 37 - d]).view(2, groups, 2, 3, 37 - d)
        expected[:, :, d, :, d:] = products.mean(2)
    torch.testing.assert_close(volume, expected)


def test_concat_volume_by_hand():
    left = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    right = torch.tensor([4.0, 5.0, 6.0]).view(1, 1, 1, 3)
    volume = concat_volume(left, right, 2)
    assert volume.shape == (1, 2, 2, 1, 3)
    torch.testing.assert_close(volume[0, 0, :, 0], torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 3.0]]))
    torch.testing.assert_close(volume[0, 1, :, 0], torch.tensor([[4.0, 5.0, 6.0], [0.0, 4.0, 5.0]]))


def test_soft_argmin_of_a_one_hot_cost_is_its_level():
    logits = torch.zeros(1, 6, 2, 3)
    levels = torch.tensor([[0, 5, 2], [3, 1, 4]])
    logits.scatter_(1, levels.view(1, 1, 2, 3), 100.0)
    torch.testing.assert_close(soft_argmin(logits), levels.view(1, 2, 3).float())


def test_soft_argmin_of_a_flat_cost_is_the_middle():
    torch.testing.assert_close(soft_argmin(torch.zeros(1, 7, 1, 1)), torch.tensor([[[3.0]]]))


def test_distribution_confidence():
    sharp = torch.zeros(1, 5, 1, 1)
    sharp[0, 2] = 100.0
    flat = torch.zeros(1, 5, 1, 1)
    confidence = distribution_confidence(torch.cat([sharp, flat], dim=3), torch.tensor([[[2.0, 2.0]]]))
    # flat: levels 1, 2, 3 of 5 lie within +-1 of the expected level 2
    torch.testing.assert_close(confidence, torch.tensor([[[1.0, 3 / 5]]]))


def test_convex_upsampling_of_a_constant_is_the_constant_times_the_factor():
    generator = torch.Generator().manual_seed(0)
    for factor in (4, 8):
        field = torch.full((2, 1, 3, 5), 2.5)
        mask = 10 * torch.randn(2, 9 * factor * factor, 3, 5, generator=generator)
        fine = convex_upsample(field, mask, factor)
        assert fine.shape == (2, 1, 3 * factor, 5 * factor)
        torch.testing.assert_close(fine, torch.full_like(fine, 2.5 * factor))


def test_convex_upsampling_with_a_centre_mask_is_nearest_neighbour():
    factor = 2
    field = torch.arange(6.0).view(1, 1, 2, 3)
    mask = torch.zeros(1, 9, factor, factor, 2, 3)
    mask[:, 4] = 100.0  # all weight on the centre of the 3x3 neighbourhood
    fine = convex_upsample(field, mask.view(1, -1, 2, 3), factor)
    expected = factor * field.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    torch.testing.assert_close(fine, expected)


def _convex_reference(field: torch.Tensor, mask: torch.Tensor, factor: int) -> torch.Tensor:
    """RAFT's convex upsampling written out pixel by pixel (the definition, no tricks)."""
    batch, channels, height, width = field.shape
    weights = mask.view(batch, 9, factor, factor, height, width).softmax(dim=1)
    padded = torch.nn.functional.pad(field, (1, 1, 1, 1), mode="replicate")
    fine = torch.zeros(batch, channels, height * factor, width * factor)
    for y in range(height):
        for x in range(width):
            window = padded[:, :, y:y + 3, x:x + 3].reshape(batch, channels, 9, 1, 1)
            block = (weights[:, None, :, :, :, y, x] * window).sum(2)  # (B, C, f, f)
            fine[:, :, y * factor:(y + 1) * factor, x * factor:(x + 1) * factor] = factor * block
    return fine


def test_convex_upsampling_matches_its_definition_with_and_without_gradients_in_any_mask_layout():
    """The inference path (one small matrix product per coarse pixel) and the training path (a sum
    of nine products) give RAFT's definition; so does a channels_last mask (the CPU's layout, read
    pixel by pixel), and the weights are shared by every field upsampled with them."""
    generator = torch.Generator().manual_seed(4)
    factor = 4
    field = torch.randn(2, 3, 3, 5, generator=generator)
    mask = 3 * torch.randn(2, 9 * factor * factor, 3, 5, generator=generator)
    expected = _convex_reference(field, mask, factor)
    with torch.no_grad():
        torch.testing.assert_close(convex_upsample(field, mask, factor), expected)
        channels_last = mask.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(convex_upsample(field, channels_last, factor), expected)
    trained = field.clone().requires_grad_()
    out = convex_combine(trained, convex_weights(mask, factor), factor)
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()  # each coarse value feeds weights summing to 1 at 9 x f^2 fine pixels, x factor
    assert trained.grad is not None and torch.isfinite(trained.grad).all()
    assert convex_weights(mask, factor).shape == (2, 3, 5, 9, factor * factor)
    large = 20 * torch.rand(1, 1, 3, 5, generator=generator)  # up to 80 px once upsampled: bf16 steps of 0.5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the CPU inference runs it
        under_autocast = convex_upsample(large, mask[:1], factor)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, _convex_reference(large, mask[:1], factor))
    torch.testing.assert_close(convex_weights(mask, factor).sum(3), torch.ones(2, 3, 5, factor * factor))


def test_pointwise_conv_as_matmul_is_the_convolution_in_any_layout():
    """The CPU inference copy's 1x1x1 convolutions: the same output, laid out as the input, on a
    contiguous and a channels_last_3d volume and on conv_layout's transposed views of both; other
    convolutions stay."""
    generator = torch.Generator().manual_seed(5)
    network = nn.Sequential(nn.Conv3d(6, 4, 1), nn.ReLU(), nn.Conv3d(4, 3, 1, bias=False), nn.Conv3d(3, 2, 3))
    volume = torch.randn(2, 6, 4, 5, 7, generator=generator)
    replaced = pointwise_as_matmul(copy.deepcopy(network))
    assert [type(m) for m in replaced] == [PointwiseConv3d, nn.ReLU, PointwiseConv3d, nn.Conv3d]
    channels_last = volume.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for x in (volume, conv_layout(volume), channels_last, conv_layout(channels_last)):
            got = replaced[0](x)
            torch.testing.assert_close(got, network[0](x), atol=1e-5, rtol=1e-5)
            assert sorted(range(5), key=got.stride) == sorted(range(5), key=x.stride)  # laid out as the input
            torch.testing.assert_close(replaced(x), network(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_convolution_available(), reason="this PyTorch build has no oneDNN")
def test_onednn_3d_convolutions_are_the_convolutions_and_their_relu():
    """The CPU inference copy's 3D convolutions run by oneDNN: the same output as the modules they
    replace (a strided convolution, a transposed one with output padding, the ReLU after a folded
    BatchNorm's Identity taken into the convolution) on small volumes (those PyTorch sends to its
    reference kernels) in both layouts, and the same again where the wrapped modules run instead
    (bf16 autocast, autograd)."""
    torch.manual_seed(8)  # the modules' initial weights: the same network whatever ran before
    network = nn.Sequential(
        nn.Sequential(nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.Identity(), nn.ReLU(inplace=True)),
        nn.Sequential(nn.ConvTranspose3d(8, 6, 3, stride=2, padding=1, output_padding=1, bias=False),
                      nn.ReLU()),
        nn.Conv3d(6, 1, 3, padding=1, bias=False),
        nn.Conv3d(1, 1, 3, padding=1, padding_mode="replicate"),  # not oneDNN's zeros: stays
    ).eval()
    replaced = onednn_3d_convolutions(copy.deepcopy(network))
    assert [type(m) for m in replaced[0]] == [OneDnnConv3d, nn.Identity, nn.Identity]
    assert [type(m) for m in replaced[1]] == [OneDnnConv3d, nn.Identity]
    assert isinstance(replaced[2], OneDnnConv3d) and not replaced[2].relu
    assert type(replaced[3]) is nn.Conv3d
    assert replaced[0][0].relu and replaced[1][0].relu
    volume = torch.randn(1, 4, 8, 6, 10)
    with torch.inference_mode():
        expected = network(volume)
        unrectified = network[:3](volume)
        assert unrectified.min() < 0 < unrectified.max()  # the third convolution has no ReLU
        for x in (volume, volume.contiguous(memory_format=torch.channels_last_3d)):
            torch.testing.assert_close(replaced(x), expected, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(replaced(volume), network(volume))
    trained = volume.clone().requires_grad_()
    replaced(trained).sum().backward()  # the wrapped modules run: gradients flow
    assert trained.grad is not None and trained.grad.abs().sum() > 0


def test_shifting_rows_of_channels_last_features_is_grid_samples_bilinear_shift():
    """The refinement's warp: channels_last features (whole pixels gathered) give what grid_sample
    gives the same features in the default layout, inside the row, past either border (the border
    column) and at whole pixels; a NaN disparity samples inside the row instead of failing."""
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 9, 4, 9, generator=generator)  # 8 channels or more: gathered whole
    disparity = torch.rand(2, 4, 9, generator=generator) * 14 - 3  # some beyond the left border, some negative
    disparity[0, 0, :3] = torch.tensor([0.0, 1.0, 2.0])  # whole pixels
    expected = shift_rows(features, disparity)  # grid_sample
    got = shift_rows(features.contiguous(memory_format=torch.channels_last), disparity)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(expected[0, :, 0, 2], features[0, :, 0, 0])  # x = 2 - 2: column 0
    disparity[1, 2, 4] = float("nan")
    assert torch.isfinite(shift_rows(features.contiguous(memory_format=torch.channels_last), disparity)).all()
    rgb = features[:, :3].contiguous(memory_format=torch.channels_last)  # fewer channels: grid_sample
    disparity[1, 2, 4] = 3.5
    torch.testing.assert_close(shift_rows(rgb, disparity), shift_rows(features[:, :3], disparity))


def test_cat_channels_keeps_a_channels_last_layout():
    left = torch.randn(1, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    other = torch.randn(1, 2, 5, 6)  # the default layout, as grid_sample returns
    joined = cat_channels([left, other], left)
    assert torch.equal(joined, torch.cat([left, other], dim=1))
    assert joined.is_contiguous(memory_format=torch.channels_last) and not joined.is_contiguous()
    plain = cat_channels([left.contiguous(), other], left.contiguous())
    assert torch.equal(plain, joined) and plain.is_contiguous()


def test_conv_layout_swaps_disparity_and_width_and_back():
    volume = torch.rand(2, 3, 4, 5, 6)  # (B, C, D, h, w)
    swapped = conv_layout(volume)
    assert swapped.shape == (2, 3, 6, 5, 4)
    assert swapped[1, 2, 5, 3, 1] == volume[1, 2, 1, 3, 5]
    assert torch.equal(conv_layout(swapped), volume)


def test_pad_to_multiple():
    image = torch.rand(1, 3, 37, 61)
    padded_image = pad_to_multiple(image, 16)
    assert padded_image.shape == (1, 3, 48, 64)
    assert torch.equal(padded_image[..., :37, :61], image)
    assert torch.equal(padded_image[..., 40, 63], image[..., 36, 60])  # replicated corner
    assert pad_to_multiple(padded_image, 16) is padded_image


# ---------------------------------------------------------------- profile


class _PointwiseStereo(nn.Module):
    """One 1x1 conv on the left image: 3 -> 4 channels, no bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)

    def forward(self, left, right):
        return self.conv(left)


def test_count_flops_counts_a_multiply_add_as_two():
    network = _PointwiseStereo().train()
    assert count_flops(network, height=8, width=10) == 2 * 3 * 4 * 8 * 10
    assert network.training  # mode restored
    assert count_parameters(network) == 12


def test_count_flops_of_the_networks_orders_them():
    flops = {arch: count_flops(build_model(default_config(arch, MAX_DISPARITY)), 64, 96) for arch in OWN_ARCHITECTURES}
    assert flops["acv-teacher"] > flops["dsnet"] > flops["dsnet-fast"] > 0


def _with_trained_batch_norm(network: nn.Module, seed: int = 3) -> nn.Module:
    """Running statistics and affine parameters away from their initial 0/1, as after training:
    folding them then changes every convolution's weights and bias."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            size = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(size, generator=generator))
    return network


def test_folding_batch_norm_keeps_the_eval_output_and_leaves_the_network_alone(model):
    """The inference copy NetworkEstimator runs: no BatchNorm left, the same disparity and
    confidence (fp32 rounding), and the given network untouched (still normalising, still in its
    train/eval mode, its state dict unchanged) so that it can go on training."""
    from stereo_kd_core.models.blocks import fold_batch_norm

    network = _with_trained_batch_norm(copy.deepcopy(model)).train()
    before = {key: value.clone() for key, value in network.state_dict().items()}
    folded = fold_batch_norm(network)
    assert network.training and not folded.training
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in folded.modules())
    assert any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in network.modules())
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())
    left, right = stereo_pair()
    with torch.no_grad():
        expected = network.eval()(left, right)
        got = folded(left, right)
    for reference, value in zip(expected, got, strict=True):
        torch.testing.assert_close(value, reference, atol=1e-2, rtol=1e-3)  # fp32 rounding through the layers


# ---------------------------------------------------------------- how the eval forward sees colour and exposure


def test_desaturate_by_hand():
    """saturation 1 leaves the images alone, 0 gives BT.601 grey in all channels, 0.5 halfway."""
    images = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)  # grey = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    assert desaturate(images, 1.0) is images
    torch.testing.assert_close(desaturate(images, 0.0).flatten(), torch.full((3,), 0.363))
    torch.testing.assert_close(desaturate(images, 0.5).flatten(), torch.tensor([0.2815, 0.3815, 0.4815]))


def test_matching_exposure_gives_the_right_view_the_left_views_statistics():
    """A right view darker, with less contrast and another white balance, gets each left channel's
    mean and spread back: an affine change of a channel is undone exactly."""
    left = torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    gain, offset = torch.tensor([0.5, 0.7, 0.6]).view(1, 3, 1, 1), torch.tensor([0.02, 0.05, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(match_exposure(left * gain + offset, left), left, rtol=0, atol=1e-5)
    flat = torch.full_like(left, 0.3)  # no contrast to scale: only shifted to the left's means
    means = channel_statistics(left)[0][..., None, None].expand_as(left)
    torch.testing.assert_close(match_exposure(flat, left), means)


def test_the_fused_view_transform_is_its_definition():
    """normalised_as_seen (one 1 x 1 convolution per view) gives ((as_seen) - mean) / std, in any layout."""
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    left, right = stereo_pair(batch=2)
    network = set_photometric(build_model(default_config("dsnet-fast", MAX_DISPARITY)),
                              {"saturation": 0.3, "match_exposure": True}, "test")
    for layout in (torch.contiguous_format, torch.channels_last):
        views = [view.contiguous(memory_format=layout) for view in (left, right * 0.7 + 0.1)]
        expected = (torch.cat(as_seen(network, *views)) - mean) / std
        torch.testing.assert_close(normalised_as_seen(network, *views, mean, std), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("key", "value"), [("saturation", -0.1), ("saturation", 1.5), ("saturation", "0.5"),
                                            ("saturation", True), ("saturation", float("nan")),
                                            ("match_exposure", 1), ("match_exposure", "yes")])
def test_malformed_photometric_settings_are_refused_naming_where(key, value):
    network = build_model(default_config("dsnet-fast", MAX_DISPARITY))
    with pytest.raises(ValueError, match=f"^entry 'x': {key} must be"):
        set_photometric(network, {key: value}, "entry 'x'")
    assert photometric_settings(network) == {}  # nothing was set
    set_photometric(network, {"saturation": 0, "match_exposure": True, "other": 1}, "entry 'x'")
    assert photometric_settings(network) == {"saturation": 0.0, "match_exposure": True}


def test_the_eval_forward_sees_colour_and_exposure_as_set_and_training_sees_the_pair():
    """A network at saturation 0 with matched exposure answers a colour pair as it answers that pair
    made grey and matched by hand; in training it sees the pair as given."""
    torch.manual_seed(0)
    network = perturb_refinement(build_model(refined_config())).eval()
    left, right = stereo_pair(batch=1)
    right = right * 0.6  # a darker right camera
    grey_left, grey_right = desaturate(left, 0.0), desaturate(right, 0.0)
    with torch.no_grad():
        colour = network(left, right)
        by_hand = network(grey_left, match_exposure(grey_right, grey_left))
        set_photometric(network, {"saturation": 0.0, "match_exposure": True}, "test")
        seen = network(left, right)
        network.train()
        trained_on = network(left, right)["disp"]
        set_photometric(network, {"saturation": 1.0, "match_exposure": False}, "test")
        trained_on_as_given = network(left, right)["disp"]
    for got, expected in zip(seen, by_hand, strict=True):  # the same up to float rounding (fused transform)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-4)
    assert (seen[0] - colour[0]).abs().max() > 1e-3  # colour and exposure mattered to this network
    torch.testing.assert_close(trained_on, trained_on_as_given, rtol=0, atol=0)
