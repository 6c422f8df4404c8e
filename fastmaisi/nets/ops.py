"""Shared tensor primitives for the MAISI networks: GroupNorm(+SiLU) with fp32 statistics, timestep embedding.

These are the hot-path building blocks. They never change parameters or state_dict keys; they only decide how the
math is executed (dtype, fusion, memory format).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """GroupNorm with fp32 statistics, returned in x's dtype (not fp32 as under autocast), optionally + SiLU.

    One vectorised kernel instead of MONAI's per-group Python loop; outside autocast so half inputs stay half
    (halves the memory traffic of the next conv's input). x: (B, C, *spatial).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        w = norm.weight.to(x.dtype) if norm.weight is not None else None
        b = norm.bias.to(x.dtype) if norm.bias is not None else None
        if x.dtype == torch.float32 or x.device.type == "cuda":
            # CUDA's group_norm accumulates in fp32 for half inputs.
            y = F.group_norm(x, norm.num_groups, w, b, norm.eps)
        else:
            # CPU half/bfloat16: compute in fp32, store in the input dtype.
            w32 = norm.weight.float() if norm.weight is not None else None
            b32 = norm.bias.float() if norm.bias is not None else None
            y = F.group_norm(x.float(), norm.num_groups, w32, b32, norm.eps).to(x.dtype)
        if silu:
            y = F.silu(y, inplace=True)
    return y


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] (cos first, as MONAI), computed in fp32. timesteps: (B,) -> (B, dim)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
