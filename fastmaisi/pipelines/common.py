"""Stage helpers shared by the three workflows: noise, conditioning tensors, decode to HU, label resampling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastmaisi.pipelines.models import Models

# body-region one-hot order of the reference: [head, chest, abdomen, pelvis/lower]
REGIONS = ("head", "chest", "abdomen", "pelvis")
REGION_ALIASES = {"thorax": "chest", "lower": "pelvis", "neck": "head"}


def latent_noise(seed: int, shape, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `seed` (the same volume on any device), then moved."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def spacing_tensor(spacing, device, dtype) -> torch.Tensor:
    """Spacing in mm x 100, (1, 3): the reference's conditioning convention."""
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
    """Exact whole-volume decode of z / scale_factor, clipped to the autoencoder's [0, 1] range. -> (B, 1, *S) fp32."""
    from fastmaisi.decode import decode_latent

    z = latent / models.scale_factor
    image = decode_latent(models.autoencoder, z.to(models.dtype), memory_budget_bytes=memory_budget_bytes,
                          progress=progress, devices=models.decode_devices)
    return image.float().clamp_(0.0, 1.0)


def resample_label(label: np.ndarray, spacing, size, new_spacing) -> np.ndarray:
    """Nearest-neighbour resample to `new_spacing`, then centre pad/crop to `size` (reference: Spacing + ResizeWithPadOrCrop)."""
    shape = [max(1, int(round(n * s / ns))) for n, s, ns in zip(label.shape, spacing, new_spacing)]
    t = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int16)[None, None].float()
    if list(t.shape[2:]) != shape:
        t = F.interpolate(t, size=shape, mode="nearest")
    out = t[0, 0].to(torch.int16).numpy()
    result = np.zeros(tuple(size), dtype=np.int16)
    src, dst = [], []
    for n, m in zip(out.shape, size):
        if n >= m:  # crop centre
            a = (n - m) // 2
            src.append(slice(a, a + m)), dst.append(slice(0, m))
        else:  # pad centre
            a = (m - n) // 2
            src.append(slice(0, n)), dst.append(slice(a, a + n))
    result[tuple(dst)] = out[tuple(src)]
    return result
