"""The mask clean-up on a torch tensor, where it lives: on the GPU right after the mask decode.

The rules are `mask_postprocess.clean_label_map`'s, written once; this module gives them `DeviceOps`: the
largest-piece rule on `label_pieces` (26-connected pieces numbered as scipy numbers them, all organs of a step
labelled in one pass), boxes and the ring mode on the tensor. The 3^3-cube morphology is shared (shifted boolean
OR/AND works on tensors as on arrays). Same voxels as the numpy path (tested on noisy maps for every tumour request,
and in `bench/bench_mask_v2.py` on full-size decoded maps). At 256^3 on an H200 it takes 0.09-0.15 s where the host
took 1-2 s; numpy stays the CPU path (scipy's labelling is faster there)."""

from __future__ import annotations

import numpy as np
import torch

from fastmaisi.pipelines.label_pieces import label_pieces, largest_rule, piece_table
from fastmaisi.pipelines.mask_postprocess import box_from_profiles, clean_label_map, occupancy, postprocess_mask


def bounding_box(mask: torch.Tensor, pad: int = 0) -> tuple[slice, ...]:
    """The smallest box holding `mask`'s voxels, grown by `pad` (clipped to the volume); empty slices if none.
    One transfer from the device: the per-axis occupancy profiles, together."""
    profiles = torch.cat([occupancy(mask, axis) for axis in range(mask.ndim)]).cpu().numpy()
    return box_from_profiles(np.split(profiles, np.cumsum(mask.shape)[:-1]), mask.shape, pad)


def _drops(key: torch.Tensor, values, volume_size: int) -> tuple[torch.Tensor, list[int]]:
    """The largest-piece rule for each of `values` on one labelling of `key` (< 0 = not taking part): (voxels of the
    dropped pieces, the values whose background goes too)."""
    root = label_pieces(key)
    losing, kept, background_too = largest_rule(*piece_table(root, key), values, volume_size)
    if not losing:
        return torch.zeros(key.shape, dtype=torch.bool, device=key.device), background_too
    dropped = torch.isin(key, torch.as_tensor(losing, device=key.device, dtype=key.dtype))
    if kept:
        dropped &= ~torch.isin(root, torch.as_tensor(kept, device=key.device, dtype=root.dtype))
    return dropped, background_too


def _keep_largest(label: torch.Tensor, ids, fill: int) -> torch.Tensor:
    """The reference's `supress_non_largest_components` (see `mask_postprocess._keep_largest`), all ids labelled in
    one pass: every dropped voxel of every id becomes `fill`. Returns a new tensor."""
    ids = list(dict.fromkeys(ids))
    key = torch.where(_isin(label, ids), label.to(torch.int32), -1)
    dropped, background_too = _drops(key, ids, label.numel())
    for value in background_too:  # (a piece outnumbered the rest of the volume: every other voxel is dropped)
        dropped |= label != value
    out = label.clone()
    out.masked_fill_(dropped, fill)
    return out


def _isin(label: torch.Tensor, ids) -> torch.Tensor:
    return torch.isin(label, torch.as_tensor(ids, device=label.device, dtype=label.dtype))


class DeviceOps:
    """What the rules of `mask_postprocess.clean_label_map` need, for tensors on their device (`HostOps`'s twin)."""

    bounding_box = staticmethod(bounding_box)
    keep_largest = staticmethod(_keep_largest)
    isin = staticmethod(_isin)

    @staticmethod
    def where_else_zero(mask: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, label, torch.zeros((), dtype=label.dtype, device=label.device))

    @staticmethod
    def dropped(mask: torch.Tensor) -> torch.Tensor:
        """The voxels of `mask` that the largest-piece rule drops (the rule applied to the mask as one id)."""
        return _drops(torch.where(mask, 0, -1), [0], mask.numel())[0]

    @staticmethod
    def boxes(label: torch.Tensor, ids) -> dict[int, tuple[slice, ...]]:
        """{id: its bounding box} for the ids present in `label`."""
        found = {i: bounding_box(label == i) for i in dict.fromkeys(ids)}
        return {i: box for i, box in found.items() if all(s.stop > s.start for s in box)}

    @staticmethod
    def most_frequent(values: torch.Tensor) -> int:
        """The most frequent of non-negative integers (the smallest on ties)."""
        return int(torch.bincount(values.long()).argmax())


@torch.no_grad()
def postprocess_mask_tensor(label: torch.Tensor, anatomy_sizes) -> torch.Tensor:
    """A generated label map (X, Y, Z) tensor, 132-label vocabulary -> the cleaned map (same shape, dtype, device)."""
    return clean_label_map(label, anatomy_sizes, DeviceOps)


def postprocess_any(label, anatomy_sizes):
    """The clean-up where the map is: a numpy array on the host (scipy), a tensor on its device (this module)."""
    if isinstance(label, torch.Tensor):
        return postprocess_mask_tensor(label, anatomy_sizes)
    return postprocess_mask(label, anatomy_sizes)
