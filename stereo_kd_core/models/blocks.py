"""Shared vocabulary of the stereo networks: convolutions, backbone, cost volumes,
3D aggregation, regression and upsampling (the common forward frame is in frames.py).

Shape letters: B batch, C channels, G correlation groups, D disparity levels at cost
resolution, H x W image size, h x w cost-volume size (padded H / cost_stride).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The 3D hourglass halves D, h and w twice, so they must be multiples of this.
HOURGLASS_DIVISOR = 4


def conv2d_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding for odd kernels) + BatchNorm2d [+ ReLU]."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv_layout(volume: Tensor) -> Tensor:
    """Swap the disparity and width axes: (B, C, D, h, w) <-> (B, C, w, h, D), a view.

    The 3D convolutions of every network run on the (w, h, D)-ordered volume, on every device
    (the weights are trained that way). Their kernels, strides and paddings are the same along
    all three axes, so this is only a memory order; it matters on the CPU, where PyTorch picks
    its oneDNN kernel (5x faster here) only when B x C x the first two spatial sizes exceeds
    20480, which (C, D, h)-sized volumes of the students miss and (C, w, h) ones meet.
    """
    return volume.transpose(2, 4)


def is_channels_last(x: Tensor) -> bool:
    """A (B, C, H, W) tensor laid out channels_last and not also contiguous (C > 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def cat_channels(tensors: list[Tensor], like: Tensor) -> Tensor:
    """torch.cat along channels (B, C, H, W), in `like`'s memory layout: where `like` is channels_last
    (the CPU and CUDA inference layout), so is the result, and the next convolution reads it without a
    reorder (the refinement head: 3.8 -> 1.9 ms at 192x320 in bf16); torch.cat itself returns the
    default layout when its inputs' layouts differ."""
    if is_channels_last(like):
        return torch.cat([t.permute(0, 2, 3, 1) for t in tensors], dim=3).permute(0, 3, 1, 2)
    return torch.cat(tensors, dim=1)


def conv3d_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv3d (no bias, 'same' padding) + BatchNorm3d [+ ReLU]."""
    layers: list[nn.Module] = [
        nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
        nn.BatchNorm3d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """An inference copy of `network` (eval mode) with every BatchNorm that directly follows a
    convolution in an nn.Sequential folded into that convolution's weights and bias, and replaced
    by nn.Identity: the same function up to floating-point rounding, without the normalisation
    pass over each activation (3-4 % of the default's CPU time in eager bf16). `network` itself
    is left as it is (it may be trained later: folded BatchNorms no longer learn)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(network).eval()
    for sequence in folded.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        for index in range(len(sequence) - 1):
            conv, norm = sequence[index], sequence[index + 1]
            if isinstance(conv, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and \
                    isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm3d)) and norm.track_running_stats:
                transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
                sequence[index] = fuse_conv_bn_eval(conv, norm, transpose=transposed)
                sequence[index + 1] = nn.Identity()
    return folded


class PointwiseConv3d(nn.Module):
    """A 1x1x1 Conv3d (stride 1, one group) as one matrix product over the channels, read in the
    input's memory order (channels outermost or innermost, the spatial axes in any order): oneDNN
    took 2.7 ms for the students' attention entry (20 -> 4 channels on a 24 x 48 x 80 volume in
    bf16, conv_layout's view) where the product takes 0.35. Same weights, same function; the output
    is laid out as the input."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)  # (O, C)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    @staticmethod
    def replaceable(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv3d) and module.kernel_size == (1, 1, 1) and module.stride == (1, 1, 1) \
            and module.groups == 1 and module.padding in ((0, 0, 0), "valid", "same")

    def forward(self, x: Tensor) -> Tensor:
        spatial = sorted(range(2, x.dim()), key=lambda dim: -x.stride(dim))  # outermost first
        channels_inner = x.stride(1) < min(x.stride(dim) for dim in spatial)  # channels_last_3d
        order = [0, *spatial, 1] if channels_inner else [0, 1, *spatial]
        source = x.permute(order).contiguous()  # a view where x is a permuted contiguous tensor
        if channels_inner:
            y = F.linear(source, self.weight, self.bias)  # (B, *spatial, O)
        else:
            y = torch.matmul(self.weight, source.flatten(2))  # (B, O, N)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype).view(1, -1, 1)
            y = y.view(x.shape[0], -1, *source.shape[2:])
        return y.permute(sorted(range(x.dim()), key=order.__getitem__))


def pointwise_as_matmul(network: nn.Module) -> nn.Module:
    """Replace, in place, every 1x1x1 Conv3d of an inference network by a PointwiseConv3d (the CPU's
    inference copy: NetworkEstimator). Returns `network`."""
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if PointwiseConv3d.replaceable(child):
                setattr(parent, name, PointwiseConv3d(child))
    return network


def onednn_convolution_available() -> bool:
    """Whether this PyTorch build has oneDNN's eager convolution ops (`torch.ops.mkldnn`)."""
    try:
        return torch.backends.mkldnn.is_available() and \
            hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
            hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise")
    except (AttributeError, RuntimeError):
        return False


class OneDnnConv3d(nn.Module):
    """A Conv3d or ConvTranspose3d of the CPU's inference copy, and the ReLU after it, run by oneDNN
    in float32. PyTorch sends a float32 3D convolution whose input has batch 1 and C x D x h at most
    20480 elements to its reference kernels (slow_conv3d, slow_conv_transpose3d), which is every
    volume of the students' hourglasses below full cost resolution: dsnet-faster's weighted core at
    480x800 took 375 ms against 354 with this (an AVX2 EPYC, fp32; bf16 goes to oneDNN already).
    Anything but a plain float32 CPU tensor outside autocast and tracing (bf16, CUDA, torch.compile,
    torch.export) runs the wrapped modules, so the function is the same on every path."""

    def __init__(self, conv: nn.Conv3d | nn.ConvTranspose3d, relu: bool = False):
        super().__init__()
        self.conv, self.relu = conv, relu
        self.transposed = isinstance(conv, nn.ConvTranspose3d)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, D, h, w) -> (B, O, D', h', w')
        conv = self.conv
        if type(x) is not Tensor or x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad \
                or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
            y = conv(x)
            return F.relu(y) if self.relu else y
        attr = "relu" if self.relu else "none"
        if self.transposed:
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, conv.weight, conv.bias, conv.padding, conv.output_padding, conv.stride, conv.dilation,
                conv.groups, attr, [], None)
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, attr, [], None)


def onednn_3d_convolutions(network: nn.Module) -> nn.Module:
    """Replace, in place, every Conv3d and ConvTranspose3d of an inference network by a
    OneDnnConv3d, folding a ReLU that follows it in an nn.Sequential (after a folded BatchNorm's
    nn.Identity) into it (the CPU's inference copy: NetworkEstimator). Returns `network`."""
    kinds = (nn.Conv3d, nn.ConvTranspose3d)
    for parent in list(network.modules()):
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            if not isinstance(child, kinds) or isinstance(child.padding, str) or child.padding_mode != "zeros":
                continue  # oneDNN pads with zeros, and 'same' / 'valid' are resolved in the module
            following = [module for _, module in children[index + 1:]] if isinstance(parent, nn.Sequential) else []
            while following and isinstance(following[0], nn.Identity):
                following.pop(0)
            relu = bool(following) and isinstance(following[0], nn.ReLU)
            if relu:
                position = len(children) - len(following)
                parent[position] = nn.Identity()
            setattr(parent, name, OneDnnConv3d(child, relu))
    return network


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (fan_out, ReLU), BatchNorm to weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    """ResNet basic block (two 3x3 convs); a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv2d_bn_relu(in_channels, out_channels, stride=stride, dilation=dilation)
        self.conv2 = conv2d_bn_relu(out_channels, out_channels, dilation=dilation, relu=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv2d_bn_relu(in_channels, out_channels, 1, stride=stride, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class FeatureExtractor(nn.Module):
    """GwcNet/ACVNet-style backbone: a stem of three 3x3 convs (stride 2), then four residual
    stages. The correlation feature is layer2 + layer3 + layer4 concatenated; a small head
    projects it to the few channels of the concatenation volume.

    The stage strides are per network: (1, 2, 1, 1) gives features at 1/4, (2, 2, 1, 1) at 1/8.
    Layer4 is dilated (2) to widen the receptive field without further downsampling.
    """

    def __init__(
        self,
        stem_channels: int,
        layer_channels: tuple[int, int, int, int],
        layer_blocks: tuple[int, int, int, int],
        layer_strides: tuple[int, int, int, int],
        concat_channels: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            conv2d_bn_relu(3, stem_channels, stride=2),
            conv2d_bn_relu(stem_channels, stem_channels),
            conv2d_bn_relu(stem_channels, stem_channels),
        )
        dilations = (1, 1, 1, 2)
        layers = []
        in_channels = stem_channels
        for channels, blocks, stride, dilation in zip(
            layer_channels, layer_blocks, layer_strides, dilations, strict=True
        ):
            stage = [ResidualBlock(in_channels, channels, stride, dilation)]
            stage += [ResidualBlock(channels, channels, 1, dilation) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.correlation_channels = sum(layer_channels[1:])
        self.concat_head = nn.Sequential(
            conv2d_bn_relu(self.correlation_channels, 4 * concat_channels),
            nn.Conv2d(4 * concat_channels, concat_channels, 1, bias=False),
        )

    def forward(self, image: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(B, 3, H, W) normalised image -> (stage features, correlation feature
        (B, Cg, h, w), concat feature (B, Cc, h, w))."""
        stages = {"stem": self.stem(image)}
        x = stages["stem"]
        for name in FEATURE_STAGES[1:]:
            x = getattr(self, name)(x)
            stages[name] = x
        correlation = torch.cat([stages["layer2"], stages["layer3"], stages["layer4"]], dim=1)
        return stages, correlation, self.concat_head(correlation)


def shifted_right_features(right: Tensor, num_disparities: int) -> Tensor:
    """All disparity shifts of the right features: out[:, :, d, :, x] = right[:, :, :, x - d],
    zero where x - d < 0. (B, C, h, w) -> (B, C, D, h, w)."""
    width = right.shape[-1]
    padded = F.pad(right, (num_disparities - 1, 0))  # (B, C, h, w + D - 1)
    windows = padded.unfold(3, width, 1).permute(0, 1, 3, 2, 4)  # window k starts at shift D - 1 - k
    return windows.flip(2)


# Columns per tile of the correlation matmul; each tile meets TILE + D - 1 right columns.
CORRELATION_TILE = 16


def group_correlation_volume(left: Tensor, right: Tensor, num_disparities: int, groups: int) -> Tensor:
    """Group-wise correlation (GwcNet): mean over each group's channels of
    left(x) * right(x - d); zero where x - d falls outside the image.
    (B, C, h, w) x2 -> (B, G, D, h, w).

    One batched matmul instead of a (B, C, D, h, w) product: the row is cut into tiles of
    T columns, each tile's left features meet the T + D - 1 right columns it can match, and
    the band of D valid pairs is cut out of each T x (T + D - 1) score matrix by padding
    every row by one more element (a skew), so that row i's band starts at column 0.
    """
    batch, channels, height, width = left.shape
    if channels % groups:
        raise ValueError(f"{channels} feature channels do not split into {groups} groups")
    group_channels = channels // groups
    levels, tile = num_disparities, CORRELATION_TILE
    num_tiles = -(-width // tile)
    padded_width = num_tiles * tile
    left_tiles = F.pad(left, (0, padded_width - width))
    left_tiles = left_tiles.view(batch, groups, group_channels, height, num_tiles, tile)
    right_windows = F.pad(right, (levels - 1, padded_width - width)).unfold(3, tile + levels - 1, tile)
    right_windows = right_windows.view(batch, groups, group_channels, height, num_tiles, tile + levels - 1)
    scores = torch.matmul(
        left_tiles.permute(0, 1, 3, 4, 5, 2),  # (B, G, h, n, T, c)
        right_windows.permute(0, 1, 3, 4, 2, 5),  # (B, G, h, n, c, T + D - 1)
    )  # scores[..., i, j] = left(x) . right(x + j - i - (D - 1)) at x = tile start + i
    skewed = F.pad(scores.flatten(-2), (0, tile)).view(batch, groups, height, num_tiles, tile, tile + levels)
    band = skewed[..., :levels]  # band[..., i, k] = scores[..., i, i + k]: disparity D - 1 - k
    volume = band.flip(-1).permute(0, 1, 5, 2, 3, 4).reshape(batch, groups, levels, height, padded_width)
    return volume[..., :width] / group_channels


def concat_volume(left: Tensor, right: Tensor, num_disparities: int) -> Tensor:
    """Concatenation volume: [left(x), right(x - d)], both zero where x - d < 0.
    (B, C, h, w) x2 -> (B, 2C, D, h, w)."""
    width = left.shape[-1]
    levels = torch.arange(num_disparities, device=left.device).view(-1, 1)
    columns = torch.arange(width, device=left.device).view(1, -1)
    in_range = (columns >= levels).to(left.dtype).view(1, 1, num_disparities, 1, width)
    return torch.cat([left.unsqueeze(2) * in_range, shifted_right_features(right, num_disparities)], dim=1)


class Hourglass3d(nn.Module):
    """3D encoder-decoder (GwcNet): two stride-2 stages down, two transposed convs up,
    with 1x1x1 skip connections. (B, C, D, h, w) -> same; D, h, w multiples of 4."""

    def __init__(self, channels: int):
        super().__init__()
        self.down1 = nn.Sequential(
            conv3d_bn_relu(channels, 2 * channels, stride=2),
            conv3d_bn_relu(2 * channels, 2 * channels),
        )
        self.down2 = nn.Sequential(
            conv3d_bn_relu(2 * channels, 4 * channels, stride=2),
            conv3d_bn_relu(4 * channels, 4 * channels),
        )
        self.up2 = self._upsample(4 * channels, 2 * channels)
        self.up1 = self._upsample(2 * channels, channels)
        self.skip2 = conv3d_bn_relu(2 * channels, 2 * channels, kernel_size=1, relu=False)
        self.skip1 = conv3d_bn_relu(channels, channels, kernel_size=1, relu=False)

    @staticmethod
    def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        half = self.down1(x)  # (B, 2C, D/2, h/2, w/2)
        quarter = self.down2(half)  # (B, 4C, D/4, h/4, w/4)
        half = F.relu(self.up2(quarter) + self.skip2(half))
        return F.relu(self.up1(half) + self.skip1(x))


def cost_head(channels: int) -> nn.Conv3d:
    """3D features -> one logit per disparity level: (B, C, D, h, w) -> (B, 1, D, h, w).
    A single linear conv: the head is run at cost resolution for every output."""
    return nn.Conv3d(channels, 1, 3, padding=1, bias=False)


class AttentionFilteredVolume(nn.Module):
    """ACVNet's attention concatenation volume: a small hourglass turns the group-wise
    correlation volume into attention weights (softmax over disparity) that filter the
    concatenation volume."""

    def __init__(self, groups: int, attention_channels: int, num_disparities: int):
        super().__init__()
        self.groups = groups
        self.num_disparities = num_disparities
        self.attention = nn.Sequential(
            # Pointwise entry: the hourglass gives the spatial context, and a 3x3x3 conv over
            # all groups at full cost resolution would cost more than the hourglass itself.
            conv3d_bn_relu(groups, attention_channels, kernel_size=1),
            Hourglass3d(attention_channels),
            cost_head(attention_channels),
        )

    def forward(
        self, correlation: tuple[Tensor, Tensor], concat: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (filtered concat volume (B, 2Cc, D, h, w), group-wise volume (B, G, D, h, w),
        attention weights (B, 1, D, h, w))."""
        gwc = group_correlation_volume(*correlation, self.num_disparities, self.groups)
        weights = torch.softmax(conv_layout(self.attention(conv_layout(gwc))), dim=2)
        return weights * concat_volume(*concat, self.num_disparities), gwc, weights


class CostAggregation(nn.Module):
    """Stacked-hourglass 3D aggregation (GwcNet/ACVNet): an entry conv, a residual conv pair, then
    `num_hourglasses` hourglasses; one cost head after the conv pair and one per hourglass.
    (B, Cin, D, h, w) -> list of (B, D, h, w) logits, coarse to fine."""

    def __init__(self, in_channels: int, channels: int, num_hourglasses: int):
        super().__init__()
        self.entry = conv3d_bn_relu(in_channels, channels)
        self.refine = nn.Sequential(conv3d_bn_relu(channels, channels), conv3d_bn_relu(channels, channels, relu=False))
        self.hourglasses = nn.ModuleList(Hourglass3d(channels) for _ in range(num_hourglasses))
        self.heads = nn.ModuleList(cost_head(channels) for _ in range(num_hourglasses + 1))

    def forward(self, volume: Tensor, all_outputs: bool) -> list[Tensor]:
        """All heads when `all_outputs`, else only the final one (a 1-element list)."""
        x = self.entry(conv_layout(volume))  # (B, C, w, h, D)
        x = self.refine(x) + x
        stages = [x]
        for hourglass in self.hourglasses:
            x = hourglass(x)
            stages.append(x)
        if not all_outputs:
            return [conv_layout(self.heads[-1](stages[-1])).squeeze(1)]
        return [conv_layout(head(stage)).squeeze(1) for head, stage in zip(self.heads, stages, strict=True)]


def soft_argmin(logits: Tensor) -> Tensor:
    """Expected disparity level under softmax(logits) over dim 1 (GC-Net's soft argmin,
    written for logits where higher means more likely). (B, D, h, w) -> (B, h, w) in levels.
    Computed in float32 whatever the input: half precision has 1-pixel steps above 128."""
    probability = torch.softmax(logits.float(), dim=1)
    levels = torch.arange(logits.shape[1], device=logits.device, dtype=probability.dtype)
    return (probability * levels.view(1, -1, 1, 1)).sum(1)


def full_resolution_regression(logits: Tensor, max_disparity: int, size: tuple[int, int]) -> Tensor:
    """ACVNet/GwcNet regression: upsample the cost to (max_disparity, H, W), softmax over
    disparity, soft argmin. (B, D, h, w) -> (B, H, W) in pixels.

    Spatial axes are bilinear (align_corners=False). The disparity axis is linear with its origin
    aligned: full-resolution level j reads cost level j * D / max_disparity, so cost level i means
    i * max_disparity / D pixels, the same convention as the students' regression at cost
    resolution (a plain trilinear upsampling would put level i at 4 i + 1.5 px and make the
    teacher's and students' cost volumes disagree by 3/8 of a level under distillation)."""
    levels = logits.shape[1]
    cost = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)  # (B, D, H, W)
    position = torch.arange(max_disparity, device=logits.device, dtype=torch.float32) * (levels / max_disparity)
    lower = position.floor().long().clamp(max=levels - 1)
    upper = (lower + 1).clamp(max=levels - 1)
    weight = (position - lower.float()).view(1, -1, 1, 1)
    fine = cost[:, lower] * (1.0 - weight) + cost[:, upper] * weight  # (B, max_disparity, H, W)
    return soft_argmin(fine)


def convex_weights(mask_logits: Tensor, factor: int) -> Tensor:
    """RAFT's convex weights: softmax of the mask logits over the 3x3 coarse neighbours, one set
    per fine pixel. (B, 9 * factor**2, h, w) -> (B, h, w, 9, factor**2), float32. Computed once
    per forward and shared by every field upsampled with it (`convex_combine`).

    The logits' channels are read pixel by pixel (a free view of the channels_last layout the
    convolution leaves on the CPU): a softmax over the channel axis of the (B, C, h, w) view
    copied the whole mask twice and took 3-4x as long (48x80 cells x8: 4.1 -> 1.1 ms)."""
    batch, _, height, width = mask_logits.shape
    cells = mask_logits.permute(0, 2, 3, 1).float().reshape(batch, height, width, 9, factor * factor)
    return cells.softmax(dim=3)


def convex_combine(field: Tensor, weights: Tensor, factor: int) -> Tensor:
    """Each fine pixel a convex combination of the 3x3 coarse neighbourhood of its coarse pixel
    with `convex_weights`'s weights. Values are multiplied by `factor`, so a disparity in coarse
    pixels becomes one in fine pixels. Borders replicate.
    (B, C, h, w), (B, h, w, 9, factor**2) -> (B, C, h * factor, w * factor), float32."""
    batch, channels, height, width = field.shape
    neighbourhoods = F.unfold(F.pad(factor * field.float(), (1, 1, 1, 1), mode="replicate"), 3)
    neighbourhoods = neighbourhoods.view(batch, channels, 9, height, width).permute(0, 1, 3, 4, 2)  # (B, C, h, w, 9)
    if torch.is_grad_enabled():
        # A sum of 9 products: its backward is 1.9x faster than the batched 1x9 matrix products'
        fine = weights[:, None, :, :, 0] * neighbourhoods[..., 0, None]  # (B, C, h, w, f^2)
        for k in range(1, 9):
            fine = fine + weights[:, None, :, :, k] * neighbourhoods[..., k, None]
    else:
        # One (C x 9) @ (9 x f^2) product per coarse pixel: 2.6x faster than the sum (torch.bmm on the
        # same (B h w, C, 9) operands took 30x as long on this CPU as matmul's batched path). In
        # float32 under autocast too, as the sum is: bf16 has 1-pixel steps above 128.
        with torch.autocast(neighbourhoods.device.type, enabled=False):
            fine = torch.matmul(neighbourhoods.permute(0, 2, 3, 1, 4).contiguous(), weights)  # (B, h, w, C, f^2)
        fine = fine.permute(0, 3, 1, 2, 4)
    fine = fine.reshape(batch, channels, height, width, factor, factor).permute(0, 1, 2, 4, 3, 5)
    return fine.reshape(batch, channels, factor * height, factor * width)


def convex_upsample(field: Tensor, mask_logits: Tensor, factor: int) -> Tensor:
    """RAFT's convex upsampling of `field` (B, C, h, w) with mask logits (B, 9 * factor**2, h, w)
    -> (B, C, h * factor, w * factor), float32: `convex_combine` with `convex_weights`."""
    return convex_combine(field, convex_weights(mask_logits, factor), factor)


class ConvexUpsampler(nn.Module):
    """Learned convex upsampling of a coarse disparity, the mask predicted from the left
    correlation features. (B, h, w) levels -> (B, h*f, w*f) pixels."""

    # RAFT scales the mask logits down; it keeps the initial weights near uniform.
    MASK_SCALE = 0.25

    def __init__(self, feature_channels: int, hidden_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.mask = nn.Sequential(
            conv2d_bn_relu(feature_channels, hidden_channels),
            nn.Conv2d(hidden_channels, 9 * factor * factor, 1),
        )

    def mask_logits(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, 9 f^2, h, w)."""
        return self.MASK_SCALE * self.mask(features)

    def weights(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> the convex weights (B, h, w, 9, f^2) (`convex_weights`)."""
        return convex_weights(self.mask_logits(features), self.factor)

    def forward(self, coarse_disparity: Tensor, weights: Tensor) -> Tensor:
        """(B, h, w) levels and `weights`'s result -> (B, h*f, w*f) pixels."""
        return convex_combine(coarse_disparity.unsqueeze(1), weights, self.factor).squeeze(1)


def shift_rows(features: Tensor, disparity: Tensor) -> Tensor:
    """The right view's features seen from the left: `features` (B, C, H, W) sampled at column
    x - disparity (B, H, W) px of the same row, linear between the two nearest columns, the border
    column beyond the edges: grid_sample's bilinear sampling with border padding (align_corners) for
    a horizontal shift, float32, laid out as `features`. Channels_last features (the inference
    layout) of 8 channels or more gather whole pixels, each C values in a row of memory: 1.6 -> 0.6
    ms for 16 channels at 192x320 on the CPU, and no reorder of grid_sample's output for what
    follows. The rest go through grid_sample (an RGB image gathered so took 4.4 ms against 1.7)."""
    batch, channels, height, width = features.shape
    x = torch.arange(width, device=disparity.device, dtype=torch.float32) - disparity.float()
    if not is_channels_last(features) or channels < 8:
        y = torch.arange(height, device=x.device, dtype=torch.float32).view(1, height, 1).expand_as(x)
        grid = torch.stack([x * (2.0 / max(width - 1, 1)) - 1.0, y * (2.0 / max(height - 1, 1)) - 1.0], dim=-1)
        return F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    x = torch.nan_to_num(x, nan=0.0).clamp(0.0, width - 1)  # no index outside the row, whatever the disparity
    start = x.floor()
    fraction = (x - start).unsqueeze(-1)  # (B, H, W, 1)
    index = start.long() + (torch.arange(batch * height, device=x.device) * width).view(batch, height, 1)
    pixels = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view: channels_last
    before = pixels.index_select(0, index.flatten()).float()
    after = pixels.index_select(0, (index + (start < width - 1)).flatten()).float()
    shifted = torch.lerp(before.view(batch, height, width, channels), after.view(batch, height, width, channels),
                         fraction)
    return shifted.permute(0, 3, 1, 2)


def pad_to_multiple(image: Tensor, multiple: int) -> Tensor:
    """Replicate-pad bottom and right so H and W become multiples of `multiple`."""
    height, width = image.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image
    return F.pad(image, (0, pad_right, 0, pad_bottom), mode="replicate")
