"""Shared tensor primitives for the MAISI networks: GroupNorm(+SiLU) with fp32 statistics, timestep embedding.

These are the hot-path building blocks. They never change parameters or state_dict keys; they only decide how the
math is executed (dtype, fusion, memory format).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from fastmaisi.nets.fused_ops import scale_shift


def no_autocast(x: torch.Tensor):
    """A context with autocast off for x's device (none on the meta device, which `--dry-run` plans run on)."""
    return contextlib.nullcontext() if x.device.type == "meta" else torch.autocast(x.device.type, enabled=False)


def _compute_input(x: torch.Tensor, keep_channels_last: bool = True) -> torch.Tensor:
    """What ATen's group-norm kernels read, as `torch.group_norm` and autograd's formula prepare it: CPU
    half/bfloat16 in fp32 (CUDA accumulates half in fp32), dense, channels-last 3-D kept if asked (else NCDHW)."""
    xc = x.float() if x.dtype != torch.float32 and x.device.type != "cuda" else x
    cl = keep_channels_last and x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    return xc.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)


def _native_group_norm(x: torch.Tensor, weight, bias, groups: int, eps: float):
    """(GroupNorm(x) in x's dtype, mean, rstd): ATen's kernel on `_compute_input(x)`, outside autocast."""
    xc = _compute_input(x)
    w = weight.to(xc.dtype) if weight is not None else None
    b = bias.to(xc.dtype) if bias is not None else None
    with no_autocast(x):
        y, mean, rstd = torch.ops.aten.native_group_norm(xc, w, b, x.shape[0], x.shape[1], x[0, 0].numel(), groups,
                                                         eps)
    return y.to(x.dtype), mean, rstd


def _group_norm(x: torch.Tensor, weight, bias, groups: int, eps: float, silu: bool) -> torch.Tensor:
    """GroupNorm (+SiLU) with fp32 statistics, output in x's dtype, without autograd (`group_norm` routes here only
    when nothing needs a gradient)."""
    y = _native_group_norm(x, weight, bias, groups, eps)[0]
    return F.silu(y, inplace=True) if silu else y


class _GroupNormKeepInput(torch.autograd.Function):
    """GroupNorm(+SiLU) for training that keeps only its input and the (N, G) statistics for backward, and rebuilds
    the normalised tensor there with one elementwise pass (x * scale + shift): autograd would keep the input, the
    normalised tensor and the SiLU input, so each norm site stores one activation fewer. Backward is ATen's own
    group-norm backward; gradients equal plain autograd's within rounding of the rebuilt SiLU input."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu):
        with torch.no_grad():
            y, mean, rstd = _native_group_norm(x, weight, bias, groups, eps)
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
        with no_autocast(x):
            # ATen's group-norm backward wants the grad in x's layout (it may arrive permuted from attention blocks);
            # as autograd's own formula, channels-last stays on CPU and CUDA takes NCDHW
            xc = _compute_input(x, keep_channels_last=x.device.type == "cpu")
            layout = torch.contiguous_format if xc.is_contiguous() else torch.channels_last_3d  # xc is dense
            gc = grad.to(xc.dtype).contiguous(memory_format=layout)
            w = weight.to(xc.dtype) if weight is not None else None
            if ctx.silu:
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
