"""Shared tensor primitives for the MAISI networks: GroupNorm(+SiLU) with fp32 statistics, timestep embedding.

These are the hot-path building blocks. They never change parameters or state_dict keys; they only decide how the
math is executed (dtype, fusion, memory format).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _group_norm(x: torch.Tensor, weight, bias, groups: int, eps: float, silu: bool) -> torch.Tensor:
    """GroupNorm (+SiLU) with fp32 statistics, output in x's dtype (outside autocast)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.dtype == torch.float32 or x.device.type == "cuda":
            # CUDA's group_norm accumulates in fp32 for half inputs.
            w = weight.to(x.dtype) if weight is not None else None
            b = bias.to(x.dtype) if bias is not None else None
            y = F.group_norm(x, groups, w, b, eps)
        else:
            # CPU half/bfloat16: compute in fp32, store in the input dtype.
            w = weight.float() if weight is not None else None
            b = bias.float() if bias is not None else None
            y = F.group_norm(x.float(), groups, w, b, eps).to(x.dtype)
        if silu:
            y = F.silu(y, inplace=not torch.is_grad_enabled())
    return y


class _GroupNormKeepInput(torch.autograd.Function):
    """GroupNorm(+SiLU) for training that keeps only its input and the (N, G) statistics for backward, and rebuilds
    the normalised tensor there with one elementwise pass (x * scale + shift): autograd would keep the input, the
    normalised tensor and the SiLU input, so each norm site stores one activation fewer. Backward is ATen's own
    group-norm backward; gradients equal plain autograd's within rounding of the rebuilt SiLU input."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu):
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            half_cpu = x.dtype != torch.float32 and x.device.type != "cuda"
            xc = x.float() if half_cpu else x  # CPU half/bfloat16: compute in fp32 (as `_group_norm`)
            w = weight.to(xc.dtype) if weight is not None else None
            b = bias.to(xc.dtype) if bias is not None else None
            N, C = x.shape[:2]
            y, mean, rstd = torch.ops.aten.native_group_norm(xc, w, b, N, C, x[0, 0].numel(), groups, eps)
            y = y.to(x.dtype)
            if silu:
                y = F.silu(y, inplace=True)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        N, C = x.shape[:2]
        G = ctx.groups
        with torch.autocast(device_type=x.device.type, enabled=False):
            half_cpu = x.dtype != torch.float32 and x.device.type != "cuda"
            # ATen's group-norm backward wants dense tensors in one layout (autograd's own formula makes them so):
            # channels-last stays on CPU, CUDA takes NCDHW; the grad may arrive permuted (attention blocks)
            fmt = torch.contiguous_format
            if x.device.type == "cpu" and x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
                fmt = torch.channels_last_3d
            xc = (x.float() if half_cpu else x).contiguous(memory_format=fmt)
            gc = grad.to(xc.dtype).contiguous(memory_format=fmt)
            w = weight.to(xc.dtype) if weight is not None else None
            if ctx.silu:
                from fastmaisi.nets.blocks import scale_shift

                rstd_c = rstd.float().repeat_interleave(C // G, dim=1)  # (N, C)
                scale = rstd_c * (weight.float() if weight is not None else 1.0)
                shift = -mean.float().repeat_interleave(C // G, dim=1) * scale
                if bias is not None:
                    shift = shift + bias.float()
                h = scale_shift(xc, scale.expand(N, C), shift.expand(N, C))  # GroupNorm output, xc's dtype
                gc = torch.ops.aten.silu_backward(gc, h)
            mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                    bias is not None and ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_group_norm_backward(
                gc, xc, mean, rstd, w, N, C, x[0, 0].numel(), G, mask)
        return (gx.to(x.dtype) if gx is not None else None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None, None)


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """GroupNorm with fp32 statistics, returned in x's dtype (not fp32 as under autocast), optionally + SiLU.

    One vectorised kernel instead of MONAI's per-group Python loop; outside autocast so half inputs stay half
    (halves the memory traffic of the next conv's input). x: (B, C, *spatial). With gradients, only x is kept for
    backward (`_GroupNormKeepInput`).
    """
    args = (norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, norm.weight, norm.bias))
    return _GroupNormKeepInput.apply(x, *args) if grads else _group_norm(x, *args)


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
