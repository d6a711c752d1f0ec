"""A narrower network started from a wider one of the same architecture: every tensor keeps the
first channels of each width (structured pruning by channel slicing), so the narrow student
begins where the wide network's first channels lead rather than from random weights.

Slicing the first `n` channels of every dimension keeps a chain of layers consistent (a residual
block's input and output are cut alike). Four inputs are concatenations and need their own index
lists: the correlation feature (layer2 + layer3 + layer4) entering the concatenation head and the
upsampling mask, its correlation groups entering the attention, the concatenation volume's left and
right halves entering the aggregation, and the refinement's [left stem, stem difference,
disparity]. The correlation groups must keep their channel count (wide and narrow networks split
the correlation feature into groups of the same size), so that each narrow group is a whole wide
group.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

WIDTH_KEYS = ("stem_channels", "layer_channels", "groups", "concat_channels", "attention_channels",
              "aggregation_channels", "mask_channels", "refine_channels")


def _correlation_channels(wide: Mapping, narrow: Mapping) -> Tensor:
    """Indices into the wide correlation feature (layer2 + layer3 + layer4 concatenated)."""
    parts, offset = [], 0
    for wide_width, narrow_width in zip(wide["layer_channels"][1:], narrow["layer_channels"][1:], strict=True):
        parts.append(offset + torch.arange(narrow_width))
        offset += wide_width
    return torch.cat(parts)


def _correlation_groups(wide: Mapping, narrow: Mapping) -> Tensor:
    """Indices of the wide correlation groups each narrow group is."""
    group_size = sum(wide["layer_channels"][1:]) // wide["groups"]
    narrow_size = sum(narrow["layer_channels"][1:]) // narrow["groups"]
    if group_size != narrow_size:
        raise ValueError(f"narrowing needs correlation groups of the same size: the wide network's have "
                         f"{group_size} channels, the narrow one's {narrow_size}")
    kept = _correlation_channels(wide, narrow).view(-1, group_size)
    whole = (kept[:, 0] % group_size == 0) & (kept == kept[:, :1] + torch.arange(group_size)).all(1)
    if not bool(whole.all()):
        raise ValueError(f"narrowing needs layer2-4 widths that are multiples of the group size {group_size}: "
                         f"{list(narrow['layer_channels'][1:])}")
    return kept[:, 0] // group_size


def input_channel_maps(wide: Mapping, narrow: Mapping) -> dict[str, Tensor]:
    """Parameter name -> indices of its input channels (dim 1) in the wide network, for the
    parameters whose input is a concatenation; every other dimension keeps its first channels."""
    correlation = _correlation_channels(wide, narrow)
    concat_wide, concat_narrow = wide["concat_channels"], narrow["concat_channels"]
    stem_wide, stem_narrow = wide["stem_channels"], narrow["stem_channels"]
    return {
        "features.concat_head.0.0.weight": correlation,
        "upsampler.mask.0.0.weight": correlation,
        "volume.attention.0.0.weight": _correlation_groups(wide, narrow),
        "aggregation.entry.0.weight": torch.cat([torch.arange(concat_narrow),
                                                 concat_wide + torch.arange(concat_narrow)]),
        "refinement.head.0.weight": torch.cat([torch.arange(stem_narrow), stem_wide + torch.arange(stem_narrow),
                                               torch.tensor([2 * stem_wide])]),
    }


def narrow_state_dict(wide_state: Mapping[str, Tensor], wide_config: Mapping, narrow_config: Mapping,
                      narrow_shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """The wide network's weights cut to the narrow network's shapes (`narrow_shapes`: name ->
    shape of every tensor of the narrow model's state dict). Both configs must describe the same
    architecture with the same depth; every narrow width must be at most the wide one."""
    for key in ("arch", "max_disparity", "layer_blocks"):
        if wide_config.get(key) != narrow_config.get(key):
            raise ValueError(f"narrowing keeps {key}: the wide network has {wide_config.get(key)!r}, "
                             f"the narrow one {narrow_config.get(key)!r}")
    extra = sorted(set(wide_state) - set(narrow_shapes))
    if any(not name.startswith("refinement.") for name in extra) or (
            extra and any(name.startswith("refinement.") for name in narrow_shapes)):
        raise ValueError(f"narrowing: the networks differ in structure, not only in width (the wide one also "
                         f"has {', '.join(extra[:4])}: a projection shortcut where the narrow block has none?)")
    maps = input_channel_maps(wide_config, narrow_config)
    narrowed: dict[str, Tensor] = {}
    for name, shape in narrow_shapes.items():
        if name not in wide_state:
            raise ValueError(f"narrowing: the networks differ in structure, not only in width (the wide one has "
                             f"no {name})")
        tensor = wide_state[name]
        if tensor.dim() != len(shape):
            raise ValueError(f"narrowing: {name} is {tuple(tensor.shape)} in the wide network, {tuple(shape)} "
                             "in the narrow one")
        for dim, size in enumerate(shape):
            if tensor.shape[dim] == size:
                continue
            if tensor.shape[dim] < size:
                raise ValueError(f"narrowing: {name} would widen dimension {dim} from {tensor.shape[dim]} to {size}")
            index = maps[name] if dim == 1 and name in maps else torch.arange(size)
            if len(index) != size:
                raise ValueError(f"narrowing: {name} dimension {dim} maps {len(index)} channels, expected {size}")
            tensor = tensor.index_select(dim, index.to(tensor.device))
        narrowed[name] = tensor.clone()
    return narrowed


def widths(config: Mapping) -> dict:
    """The width part of a network config (what narrowing changes)."""
    return {key: config.get(key) for key in WIDTH_KEYS}
