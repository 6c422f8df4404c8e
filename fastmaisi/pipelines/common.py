"""Stage helpers shared by the three workflows: noise, conditioning tensors, decode to HU, label resampling."""

from __future__ import annotations

import numpy as np
import torch

from fastmaisi.pipelines.models import Models

# body-region one-hot order of the reference: [head, chest, abdomen, pelvis/lower]
REGIONS = ("head", "chest", "abdomen", "pelvis")
REGION_ALIASES = {"thorax": "chest", "lower": "pelvis", "neck": "head"}


def latent_noise(seed: int, shape, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `seed` (the same volume on any device), then moved."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def spacing_tensor(spacing, device, dtype, fp16_first: bool = False) -> torch.Tensor:
    """Spacing in mm x 100, (1, 3): the reference's conditioning convention. fp16_first: round as the reference's
    from-mask and paired paths do, fp16(fp16(s) * 100) (0.781 mm -> 78.0625, where fp16(s * 100) is 78.125), then
    cast to `dtype`."""
    if fp16_first:
        half = torch.tensor([[float(s) for s in spacing]], dtype=torch.float16)
        return (half * 100).to(device=device, dtype=dtype)
    return torch.tensor([[float(s) * 100.0 for s in spacing]], device=device, dtype=dtype)


def region_tensor(name: str, device, dtype) -> torch.Tensor:
    """One-hot body region x 100, (1, 4)."""
    name = REGION_ALIASES.get(name, name)
    if name not in REGIONS:
        raise ValueError(f"unknown body region {name!r}; choose from {', '.join(REGIONS)}")
    t = torch.zeros(1, 4, device=device, dtype=dtype)
    t[0, REGIONS.index(name)] = 100.0
    return t


def regions_from_label(label: np.ndarray) -> tuple[str, str]:
    """Top and bottom body region from landmark organs (reference rule); chest..abdomen when none is found."""
    landmarks = [{22, 120}, {28, 29, 30, 31, 32}, {1, 2, 3, 4, 5, 14}, {93, 94}]
    present = set(np.unique(label).tolist())
    found = [k for k, ids in enumerate(landmarks) if ids & present]
    if not found:
        return "chest", "abdomen"
    return REGIONS[min(found)], REGIONS[max(found)]


@torch.no_grad()
def decode_to_unit(models: Models, latent: torch.Tensor, memory_budget_bytes: int | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Exact whole-volume decode of z / scale_factor -> (B, 1, *S) fp32, clipped as the reference does: CT to the
    autoencoder's [0, 1], MR at 0 only (MR intensities above the nominal 1.0 are kept)."""
    from fastmaisi.decode import decode_latent
    from fastmaisi.nets.derived import reuse_derived_weights

    z = latent / models.scale_factor
    with reuse_derived_weights(models.autoencoder):
        image = decode_latent(models.autoencoder, z.to(models.dtype), memory_budget_bytes=memory_budget_bytes,
                              progress=progress, devices=models.decode_devices)
    return image.float().clamp_(0.0, 1.0 if models.variant.modality == "ct" else None)


def resample_label(label, spacing, size, new_spacing, device=None) -> np.ndarray:
    """A label map (X, Y, Z) at `spacing` mm -> `size` at `new_spacing` mm, int16, by the reference's rule (MONAI
    `Spacing(pixdim=new_spacing, mode="nearest")` then `ResizeWithPadOrCrop(size)`), for every label map we resample.

    Per axis: the resampled length is round((n - 1) * s / ns) + 1 and output voxel i takes source voxel
    round(i * ns / s) (voxel 0 stays at voxel 0, ties to even); then centre crop (start m // 2 - size // 2) or centre
    pad with 0 (before (size - m) // 2). `device`: where to gather (a GPU takes a 512^3 map in milliseconds, the
    host in seconds); the same voxels either way, returned as numpy. `label` may be a tensor (gathered where it is).
    """
    if isinstance(label, torch.Tensor):
        label, device = (label, label.device) if label.device.type != "cpu" else (label.numpy(), None)
    on_device = device is not None and torch.device(device).type != "cpu"
    out = np.asarray(label) if not on_device else torch.as_tensor(
        label if isinstance(label, torch.Tensor) else np.ascontiguousarray(label)).to(device=device, dtype=torch.int16)
    if tuple(float(s) for s in spacing) != tuple(float(s) for s in new_spacing):
        for axis, (n, s, ns) in enumerate(zip(label.shape, spacing, new_spacing)):
            m = int(np.rint((n - 1) * float(s) / float(ns) + 1))
            index = np.clip(np.rint(np.arange(m) * (float(ns) / float(s))).astype(np.intp), 0, n - 1)
            if on_device:
                out = out.index_select(axis, torch.from_numpy(index).to(out.device))
            else:
                out = np.take(out, index, axis=axis)
    result = torch.zeros(tuple(int(v) for v in size), dtype=torch.int16, device=out.device) if on_device \
        else np.zeros(tuple(int(v) for v in size), dtype=np.int16)
    src, dst = [], []
    for m, k in zip(out.shape, result.shape):
        if m >= k:  # centre crop
            a = m // 2 - k // 2
            src.append(slice(a, a + k)), dst.append(slice(0, k))
        else:  # centre pad
            a = (k - m) // 2
            src.append(slice(0, m)), dst.append(slice(a, a + m))
    result[tuple(dst)] = out[tuple(src)]
    return result.cpu().numpy() if on_device else result
