"""Building blocks shared by the MAISI diffusion UNets and the ControlNet (same state_dict keys as MONAI's).

Module names, nesting and registration order reproduce MONAI's `diffusion_model_unet.py` exactly, so a MONAI
state_dict loads strictly (keys, shapes and order). Only the execution differs:

- GroupNorm(+SiLU) with fp32 statistics and output in the input dtype: Triton kernels on CUDA for inference
  (statistics spread over the whole GPU, any of NCDHW / channels-last, SiLU fused), `ops.group_norm` otherwise;
- every `time_emb_proj(SiLU(emb))` of a forward pass is one GEMM over the concatenated weights (`time_projections`);
  the projection and conv1's bias are folded into the next GroupNorm (or, on CPU with batch 1, into conv1's bias);
- nearest x2 upsampling + conv k3 is one transposed conv (stride 2, kernel 4, summed taps) on the coarse grid;
- attention runs on (B, N, C) token views (free for channels-last inputs), with one fused QKV GEMM, SDPA (on CUDA
  inference our Triton flash kernel, `nets.attention`, 16 % faster than cuDNN's at head size 32), and the
  1x1x1 `proj_in`/`proj_out` convolutions of the spatial transformer done as GEMMs on the tokens;
- cross-attention to a context of sequence length 1 is `out_proj(to_v(context))` exactly (softmax over one key
  is 1), so `norm2`, `to_q` and `to_k` are skipped;
- residual adds happen in place on freshly computed tensors when autograd does not need the operands; on CUDA
  inference a ControlNet residual is added to its skip by the up path's concatenation (`cat_channels`), and a
  downsampling resnet pools x and SiLU(GroupNorm(x)) in one read (`norm_silu_pool_x2`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmaisi.nets import ops
from fastmaisi.nets.attention import attention
from fastmaisi.nets import thin_conv
from fastmaisi.nets.kernel_device import kernels_run_on

class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and keys). CPU fp32 inference calls oneDNN directly: for small 3D inputs PyTorch
    picks its im2col path instead (`slow_conv3d`: 50 vs 10 ms for 32 -> 32 channels at 16^3 on 2 threads), which made
    the demo's 100 mask-DM steps take 10 s. CUDA inference adds the bias with `add_bias_` (same sum, faster pass)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and not _needs_grad(x, weight, bias)):
            return torch.mkldnn_convolution(x.contiguous(), weight, bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        if bias is not None and kernels_run_on(x) and not _needs_grad(x, weight, bias):
            return add_bias_(super()._conv_forward(x, weight, None), bias)  # same sum, one faster pass
        return super()._conv_forward(x, weight, bias)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: Conv3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# ----------------------------------------------------------------------------------------------------------- helpers
def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def add_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a + b`, in place on `a` when that is safe: callers pass a fresh temporary `a` that `b` broadcasts to;
    autograd must not need them and the sum must keep a's dtype (else out of place, with type promotion)."""
    if _needs_grad(a, b) or (a.dtype != b.dtype and torch.result_type(a, b) != a.dtype):
        return a + b
    return a.add_(b)


def silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=not _needs_grad(x))


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm with fp32 statistics, returned in x's dtype (autocast would return fp32)."""
    with ops.no_autocast(x):
        w = norm.weight.to(x.dtype) if norm.weight is not None else None
        b = norm.bias.to(x.dtype) if norm.bias is not None else None
        if x.dtype == torch.float32 or x.device.type == "cuda":  # CUDA accumulates half inputs in fp32
            return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)
        w32 = norm.weight.float() if norm.weight is not None else None
        b32 = norm.bias.float() if norm.bias is not None else None
        return F.layer_norm(x.float(), norm.normalized_shape, w32, b32, norm.eps).to(x.dtype)


# ------------------------------------------------------------------------------------------- GroupNorm on the GPU
# PyTorch's CUDA GroupNorm computes statistics with one thread block per (sample, group): with batch 1 and 32 groups
# only 32 blocks run (~1 ms for a 64 x 128^3 fp16 tensor, a quarter of the GPU at ~0.25 TB/s), and channels-last
# inputs are first copied to NCDHW. These Triton kernels spread the statistics over space and channels:
# 1. per (spatial tile, channel): tile mean and sum of squared deviations in fp32 (NCDHW: two-pass within each tile,
#    merged across a program's tiles; channels-last: a Welford update per register slot, slots merged at the end);
# 2. per (sample, group): exact merge of the tiles (Chan et al.), rstd, per-channel scale/shift in fp32;
# 3. y = x * scale + shift [then SiLU], fp32 math, one rounding to x's dtype; any layout whose (B, C, S) view is
#    NCDHW- or channels-last-strided. Inference only (autograd falls back to `ops.group_norm`).
_TRITON: dict = {}


def _triton_kernels():
    if "stats" in _TRITON or "error" in _TRITON:
        return _TRITON if "stats" in _TRITON else None
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # CPU-only installs
        _TRITON["error"] = e
        return None

    @triton.jit
    def stats(x_ptr, mean_ptr, m2_ptr, S, C, sB, sC, sS, ITERS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # program (ps, pc, b): ITERS consecutive spatial tiles of BLOCK_C channels, merged (Chan et al.) in fp32
        ps, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        base = x_ptr + b.to(tl.int64) * sB + offs_c[None, :].to(tl.int64) * sC
        mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(ITERS):
            start = (ps * ITERS + i) * BLOCK_S
            offs_s = start + tl.arange(0, BLOCK_S)
            mask = (offs_s[:, None] < S) & cmask[None, :]
            x = tl.load(base + offs_s[:, None].to(tl.int64) * sS, mask=mask, other=0.0).to(tl.float32)
            n_a = tl.minimum(tl.maximum(S - ps * ITERS * BLOCK_S, 0), i * BLOCK_S).to(tl.float32)
            n_b = tl.minimum(tl.maximum(S - start, 0), BLOCK_S).to(tl.float32)
            mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
            d = tl.where(mask, x - mean_b[None, :], 0.0)
            m2_b = tl.sum(d * d, axis=0)
            w = n_b / tl.maximum(n_a + n_b, 1.0)
            delta = mean_b - mean_a
            mean_a += delta * w
            m2_a += m2_b + delta * delta * n_a * w
        out = (b.to(tl.int64) * tl.num_programs(0) + ps) * C + offs_c
        tl.store(mean_ptr + out, mean_a, mask=cmask)
        tl.store(m2_ptr + out, m2_a, mask=cmask)

    @triton.jit
    def stats_cl(x_ptr, mean_ptr, m2_ptr, S, C, sB, ITERS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # channels-last (sC == 1, sS == C): the same (ps, pc, b) outputs as `stats`, but each register slot keeps its
        # own Welford mean/M2 over the ITERS tiles (no cross-thread reduction inside the loop); rows merge at the end
        ps, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        base = x_ptr + b.to(tl.int64) * sB + offs_c[None, :]
        mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        n = tl.zeros([BLOCK_S], dtype=tl.float32)
        for i in range(ITERS):
            offs_s = (ps * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
            valid = offs_s < S
            mask = valid[:, None] & (offs_c < C)[None, :]
            x = tl.load(base + offs_s[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32)
            n += valid.to(tl.float32)
            inv = tl.where(valid, 1.0 / tl.maximum(n, 1.0), 0.0)
            delta = tl.where(valid[:, None], x - mean, 0.0)
            mean += delta * inv[:, None]
            m2 += delta * (x - mean)
        total = tl.maximum(tl.sum(n, axis=0), 1.0)
        mean_c = tl.sum(mean * n[:, None], axis=0) / total
        d = mean - mean_c[None, :]
        m2_c = tl.sum(m2 + d * d * n[:, None], axis=0)
        out = (b.to(tl.int64) * tl.num_programs(0) + ps) * C + offs_c
        cmask = offs_c < C
        tl.store(mean_ptr + out, mean_c, mask=cmask)
        tl.store(m2_ptr + out, m2_c, mask=cmask)

    @triton.jit
    def finalize(mean_ptr, m2_ptr, w_ptr, bias_ptr, pre_ptr, scale_ptr, shift_ptr, T, C, S, G, SPAN, eps,
                 CG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr, PRE: tl.constexpr):
        # program (b, g): merge the T partials of the group's CG channels, then per-channel scale and shift;
        # PRE: the input is x + pre[b, c] (a per-channel shift moves the channel means, not the M2 terms)
        pid = tl.program_id(0)
        b, g = pid // G, pid % G
        offs_c = g * CG + tl.arange(0, BLOCK_CG)
        cmask = tl.arange(0, BLOCK_CG) < CG
        total = S * 1.0 * CG
        if PRE:
            pre = tl.load(pre_ptr + b * C + offs_c, mask=cmask, other=0.0)
        else:
            pre = tl.zeros([BLOCK_CG], dtype=tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t[:, None] < T) & cmask[None, :]
            n_t = tl.minimum(tl.maximum(S - offs_t * SPAN, 0), SPAN).to(tl.float32)
            m = tl.load(mean_ptr + (b * T + offs_t[:, None]).to(tl.int64) * C + offs_c[None, :], mask=mask,
                        other=0.0) + pre[None, :]
            acc += tl.where(mask, m * n_t[:, None], 0.0)
        mean_g = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros([BLOCK_T, BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t[:, None] < T) & cmask[None, :]
            n_t = tl.minimum(tl.maximum(S - offs_t * SPAN, 0), SPAN).to(tl.float32)
            idx = (b * T + offs_t[:, None]).to(tl.int64) * C + offs_c[None, :]
            m = tl.load(mean_ptr + idx, mask=mask, other=0.0) + pre[None, :]
            m2 = tl.load(m2_ptr + idx, mask=mask, other=0.0)
            acc += tl.where(mask, m2 + n_t[:, None] * (m - mean_g) * (m - mean_g), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps)
        w = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        scale = w * rstd
        tl.store(scale_ptr + b * C + offs_c, scale, mask=cmask)
        tl.store(shift_ptr + b * C + offs_c, bias + (pre - mean_g) * scale, mask=cmask)

    @triton.jit
    def apply(x_ptr, y_ptr, scale_ptr, shift_ptr, S, C, sB, sC, sS, SILU: tl.constexpr, BLOCK_S: tl.constexpr,
              BLOCK_C: tl.constexpr):
        ps, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_s = ps * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        mask = (offs_s[:, None] < S) & cmask[None, :]
        off = b.to(tl.int64) * sB + offs_s[:, None].to(tl.int64) * sS + offs_c[None, :].to(tl.int64) * sC
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * C + offs_c, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + b * C + offs_c, mask=cmask, other=0.0)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _source(o, n):
        # align_corners=False source coordinate of output o (x2), clamped at 0 as PyTorch: (i0, i1, weight of i1)
        src = tl.maximum(o.to(tl.float32) * 0.5 - 0.25, 0.0)
        i0 = src.to(tl.int64)
        return i0, tl.minimum(i0 + 1, n - 1), src - i0.to(tl.float32)

    globals()["_source"] = _source  # Triton's CPU interpreter resolves a kernel's helpers among module globals only

    @triton.jit
    def up2(x_ptr, y_ptr, C, D, H, W, R, row0, sxb, sxc, sxd, sxh, sxw, syb, syc, syd, syh, syw,
            BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        # y[b, c, r, oh, ow] = trilinear_x2(x)[b, c, row0 + r, oh, ow]; fp32 math in PyTorch's nesting order
        pv, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        v = pv.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        OH, OW = 2 * H, 2 * W
        ow, oh, r = v % OW, (v // OW) % OH, v // (OW * OH)
        mask = (r < R)[:, None] & (c < C)[None, :]
        d0, d1, ld = _source(r + row0, D)
        h0, h1, lh = _source(oh, H)
        w0, w1, lw = _source(ow, W)
        base = x_ptr + b.to(tl.int64) * sxb + c[None, :].to(tl.int64) * sxc
        off_d0, off_d1 = (d0 * sxd)[:, None], (d1 * sxd)[:, None]
        off_h0, off_h1 = (h0 * sxh)[:, None], (h1 * sxh)[:, None]
        off_w0, off_w1 = (w0 * sxw)[:, None], (w1 * sxw)[:, None]
        lw1, lh1, ld1 = lw[:, None], lh[:, None], ld[:, None]
        lw0, lh0, ld0 = 1.0 - lw1, 1.0 - lh1, 1.0 - ld1
        x000 = tl.load(base + off_d0 + off_h0 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x001 = tl.load(base + off_d0 + off_h0 + off_w1, mask=mask, other=0.0).to(tl.float32)
        x010 = tl.load(base + off_d0 + off_h1 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x011 = tl.load(base + off_d0 + off_h1 + off_w1, mask=mask, other=0.0).to(tl.float32)
        x100 = tl.load(base + off_d1 + off_h0 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x101 = tl.load(base + off_d1 + off_h0 + off_w1, mask=mask, other=0.0).to(tl.float32)
        x110 = tl.load(base + off_d1 + off_h1 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x111 = tl.load(base + off_d1 + off_h1 + off_w1, mask=mask, other=0.0).to(tl.float32)
        val = (ld0 * (lh0 * (lw0 * x000 + lw1 * x001) + lh1 * (lw0 * x010 + lw1 * x011))
               + ld1 * (lh0 * (lw0 * x100 + lw1 * x101) + lh1 * (lw0 * x110 + lw1 * x111)))
        out = (y_ptr + b.to(tl.int64) * syb + c[None, :].to(tl.int64) * syc + (r * syd)[:, None]
               + (oh * syh)[:, None] + (ow * syw)[:, None])
        tl.store(out, val.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bias_add(h_ptr, r_ptr, b_ptr, N, C, INNER, RES: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
        # h[i] = h[i] + bias[c(i)] (+ r[i]) [then SiLU] in fp32, one rounding; c(i) = (i // INNER) % C over the flat
        # storage
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        y = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(b_ptr + (offs // INNER) % C, mask=mask, other=0.0).to(tl.float32)
        if RES:
            y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(h_ptr + offs, y.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _voxel(t, W, H, D):
        # flat index over (B, D, H, W), W fastest -> (b, d, h, w)
        w = t % W
        t = t // W
        h = t % H
        t = t // H
        return t // D, t % D, h, w

    globals()["_voxel"] = _voxel  # Triton's CPU interpreter resolves a kernel's helpers among module globals only

    @triton.jit
    def up_add(h_ptr, x_ptr, N, C, W2, H2, D2, sxb, sxc, sxd, sxh, sxw, BLOCK: tl.constexpr):
        # h += nearest_x2(x), h channels-last (B, 2D, 2H, 2W, C) in storage order; x any strides; fp32, one rounding
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        c = offs % C
        b, d, hh, w = _voxel(offs // C, W2, H2, D2)
        xo = b * sxb + c * sxc + (d // 2) * sxd + (hh // 2) * sxh + (w // 2) * sxw
        y = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, y.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def cat2(a_ptr, b_ptr, r_ptr, y_ptr, N, CA, CB, ADD: tl.constexpr, BLOCK: tl.constexpr):
        # y = cat([a, b (+ r)], channels) for channels-last a, b, r, y: y's storage is (positions, CA + CB); b + r in
        # fp32, one rounding (as PyTorch's half add)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        C = CA + CB
        c = offs % C
        pos = offs // C
        in_a = c < CA
        va = tl.load(a_ptr + pos * CA + c, mask=mask & in_a, other=0.0)
        vb = tl.load(b_ptr + pos * CB + (c - CA), mask=mask & (c >= CA), other=0.0)
        if ADD:
            vr = tl.load(r_ptr + pos * CB + (c - CA), mask=mask & (c >= CA), other=0.0)
            vb = (vb.to(tl.float32) + vr.to(tl.float32)).to(vb.dtype)
        tl.store(y_ptr + offs, tl.where(in_a, va, vb), mask=mask)

    @triton.jit
    def pool_norm(x_ptr, xp_ptr, hp_ptr, scale_ptr, shift_ptr, NV, C, D2, H2, W2, BLOCK_V: tl.constexpr,
                  BLOCK_C: tl.constexpr):
        # channels-last x (B, D, H, W, C) -> xp = avg_pool_x2(x), hp = avg_pool_x2(silu(x * scale + shift)), both
        # (B, D/2, H/2, W/2, C); fp32 sums of the 8 voxels, one rounding each
        v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (v < NV)[:, None] & (c < C)[None, :]
        b, d, h, w = _voxel(v, W2, H2, D2)
        H, W = 2 * H2, 2 * W2
        corner = (((b * 2 * D2 + 2 * d) * H + 2 * h) * W + 2 * w) * C
        aff = b[:, None] * C + c[None, :]
        scale = tl.load(scale_ptr + aff, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + aff, mask=mask, other=0.0)
        acc_x = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        acc_h = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(8):
            off = corner + (((i // 4) * H + (i // 2) % 2) * W + i % 2) * C
            x = tl.load(x_ptr + off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            acc_x += x
            y = x * scale + shift
            acc_h += y * tl.sigmoid(y)
        out = v[:, None] * C + c[None, :]
        tl.store(xp_ptr + out, (acc_x * 0.125).to(xp_ptr.dtype.element_ty), mask=mask)
        tl.store(hp_ptr + out, (acc_h * 0.125).to(hp_ptr.dtype.element_ty), mask=mask)

    _TRITON.update(stats=stats, stats_cl=stats_cl, finalize=finalize, apply=apply, up2=up2, bias_add=bias_add,
                   up_add=up_add, cat2=cat2, pool_norm=pool_norm, cdiv=triton.cdiv, next_pow2=triton.next_power_of_2)
    return _TRITON


def _gn_layout(x: torch.Tensor):
    """(sB, sC, sS) of x's (B, C, S) view when it is NCDHW- or channels-last-strided, else None."""
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    if x.is_contiguous():
        return C * S, S, 1
    if x.stride(1) == 1 and (B == 1 or x.stride(0) == C * S) and x.flatten(2).stride(2) == C:  # a view here
        return C * S, 1, C
    return None


def fast_group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    """Whether `group_norm` runs the Triton kernels for x (CUDA, inference, NCDHW or channels-last, triton present)."""
    return (kernels_run_on(x) and norm.weight is not None and norm.bias is not None and x.numel() > 0
            and not _needs_grad(x, norm.weight, norm.bias) and _gn_layout(x) is not None
            and _triton_kernels() is not None)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False,
               pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(x + pre_bias) (+SiLU), fp32 statistics, output in x's dtype: Triton kernels on CUDA for inference
    (see above), `ops.group_norm` otherwise. x: (B, C, *S); pre_bias: (C,) or (B, C), folded into the statistics
    and the affine (a conv's bias plus the time embedding, without a pass over x)."""
    if not fast_group_norm(x, norm):
        if pre_bias is not None:
            x = x + pre_bias.reshape(*pre_bias.shape, *([1] * (x.dim() - pre_bias.dim()))).to(x.dtype)
        return ops.group_norm(x, norm, silu)
    return scale_shift(x, *_group_norm_affine(x, norm, pre_bias), silu)


def _group_norm_affine(x: torch.Tensor, norm: nn.GroupNorm,
                       pre_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) fp32 (scale, shift), each (B, C), with GroupNorm(x + pre_bias) = x * scale + shift
    (Triton statistics; the caller checked `fast_group_norm`)."""
    k = _triton_kernels()
    B, C = x.shape[:2]
    mean, m2, T, span, S = _stats_tiles(x, k)
    G = norm.num_groups
    cg = C // G
    scale = torch.empty(B, C, device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    pre = scale if pre_bias is None else pre_bias.float().expand(B, C).contiguous()
    k["finalize"][(B * G,)](mean, m2, norm.weight, norm.bias, pre, scale, shift, T, C, S, G, span,
                            norm.eps, CG=cg, BLOCK_T=max(16, 2048 // k["next_pow2"](cg)),
                            BLOCK_CG=k["next_pow2"](cg), PRE=pre_bias is not None, num_warps=4)
    return scale, shift


def _tile(C: int, sS: int, k: dict) -> tuple[int, int]:
    """(channels, voxels) per Triton program: long rows per channel for NCDHW (sS == 1), else channel vectors."""
    if sS == 1:
        return 2, 4096
    block_c = min(k["next_pow2"](C), 64)
    return block_c, 8192 // block_c


# channels-last statistics tiling (bench/bench_gn_stats.py --sweep, H200): channels and voxels per register tile,
# warps, the number of programs aimed at and the fewest tiles a program merges; tensors of 2^27 elements and more
# take 8 warps and twice the programs (0.156 against 0.165 ms at 128 x 128^3), smaller ones 4 (0.028 against
# 0.038 ms at 128 x 64^3)
_STATS_CL = {"block_c": 64, "block_s": 32, "num_warps": 4, "programs": 1056, "min_iters": 8}
_STATS_CL_LARGE = {"num_warps": 8, "programs": 2112}
_STATS_CL_LARGE_NUMEL = 1 << 27


def _stats_cl_config(numel: int) -> dict:
    return {**_STATS_CL, **_STATS_CL_LARGE} if numel >= _STATS_CL_LARGE_NUMEL else _STATS_CL


def _stats_tiles(x: torch.Tensor, k: dict) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Per (sample, spatial tile, channel) mean and M2 of x in fp32 (the `stats` kernels); (mean, m2, T, span, S)."""
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    sB, sC, sS = _gn_layout(x)
    if sC == 1 and C > 1:
        cfg = _stats_cl_config(x.numel())
        block_c = min(k["next_pow2"](C), cfg["block_c"])
        block_s = max(16, cfg["block_s"] * cfg["block_c"] // block_c)
        c_tiles, s_tiles = k["cdiv"](C, block_c), k["cdiv"](S, block_s)
        iters = min(s_tiles, max(cfg["min_iters"], s_tiles * c_tiles * B // cfg["programs"]))
        T = k["cdiv"](s_tiles, iters)
        mean = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
        m2 = torch.empty_like(mean)
        k["stats_cl"][(T, c_tiles, B)](x, mean, m2, S, C, sB, iters, BLOCK_S=block_s, BLOCK_C=block_c,
                                       num_warps=cfg["num_warps"])
        return mean, m2, T, block_s * iters, S
    return _stats_two_pass(x, k)


def _stats_two_pass(x: torch.Tensor, k: dict) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """`_stats_tiles` by the `stats` kernel (two passes within each tile), for any `_gn_layout`."""
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    sB, sC, sS = _gn_layout(x)
    block_c, block_s = _tile(C, sS, k)
    c_tiles, s_tiles = k["cdiv"](C, block_c), k["cdiv"](S, block_s)
    iters = max(1, s_tiles * c_tiles * B // 4096)
    T = k["cdiv"](s_tiles, iters)
    mean = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    k["stats"][(T, c_tiles, B)](x, mean, m2, S, C, sB, sC, sS, iters, BLOCK_S=block_s, BLOCK_C=block_c,
                                num_warps=8)
    return mean, m2, T, block_s * iters, S


def group_moments(x: torch.Tensor, groups: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of x (B, C, *S) per (sample, group), mean and M2 (B, G) in fp64 — the pieces that merge
    exactly across slabs (Chan et al.). On CUDA one read of x (Triton, fp32 two-pass per tile); else torch."""
    B, C = x.shape[:2]
    n = x[0].numel() / groups
    k = _triton_kernels() if kernels_run_on(x) and _gn_layout(x) is not None else None
    if k is None:
        var, mean = torch.var_mean(x.reshape(B, groups, -1).float(), dim=2, correction=0)
        return n, mean.double(), var.double() * n
    mean, m2, T, span, S = _stats_tiles(x, k)
    n_t = (S - torch.arange(T, device=x.device, dtype=torch.float64) * span).clamp(0, span).view(1, T, 1, 1)
    mean, m2 = mean.double().view(B, T, groups, C // groups), m2.double().view(B, T, groups, C // groups)
    mean_g = (mean * n_t).sum((1, 3)) / n
    m2_g = (m2 + n_t * (mean - mean_g[:, None, :, None]).square()).sum((1, 3))
    return n, mean_g, m2_g


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """silu?(x * scale + shift) with per-(sample, channel) fp32 scale and shift (B, C), fp32 math, one rounding to
    x's dtype: a normalisation whose statistics are already known. One Triton pass on CUDA; torch otherwise."""
    B, C = x.shape[:2]
    k = _triton_kernels() if kernels_run_on(x) and _gn_layout(x) is not None else None
    if k is None:
        view = (B, C, *([1] * (x.dim() - 2)))
        y = torch.addcmul(shift.view(view), x, scale.view(view))
        return (F.silu(y, inplace=True) if silu else y).to(x.dtype)
    sB, sC, sS = _gn_layout(x)
    S = x[0, 0].numel()
    block_c, block_s = _tile(C, sS, k)
    y = torch.empty_like(x)
    k["apply"][(k["cdiv"](S, block_s), k["cdiv"](C, block_c), B)](
        x, y, scale.float().contiguous(), shift.float().contiguous(), S, C, sB, sC, sS, SILU=silu,
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=8)
    return y


def upsample_trilinear_x2(x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """`F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)[:, :, r0:r1]` for x (B, C, D, H, W).

    On CUDA (inference) one Triton pass that computes only the output rows asked for, in x's layout (PyTorch's
    kernel takes ~0.7 s of a 512^3 decode); elsewhere F.interpolate, then the slice.
    """
    r0, r1 = rows if rows is not None else (0, 2 * x.shape[2])
    k = _triton_kernels() if kernels_run_on(x) and x.dim() == 5 and not _needs_grad(x) else None
    if k is None:
        return F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)[:, :, r0:r1]
    B, C, D, H, W = x.shape
    fmt = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
    y = torch.empty((B, C, r1 - r0, 2 * H, 2 * W), device=x.device, dtype=x.dtype, memory_format=fmt)
    if y.numel() == 0:
        return y
    block_c = min(k["next_pow2"](C), 64)
    block_v = 4096 // block_c
    grid = (k["cdiv"]((r1 - r0) * 4 * H * W, block_v), k["cdiv"](C, block_c), B)
    k["up2"][grid](x, y, C, D, H, W, r1 - r0, r0, *x.stride(), *y.stride(), BLOCK_V=block_v, BLOCK_C=block_c,
                   num_warps=4)
    return y


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C) view: contiguous for channels-last x, a transposed view otherwise (no copy)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, C, *S) view (channels-last strides when t is contiguous)."""
    return t.transpose(1, 2).unflatten(2, like.shape[2:])


def _linear_weight(conv: nn.Module) -> torch.Tensor:
    """A 1x1(x1) convolution's weight as a Linear weight (Cout, Cin) (a view)."""
    return conv.weight.flatten(1)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d) view (last dim contiguous, what SDPA/flash wants)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _maybe_cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(list(tensors))


# Per axis, conv_k3(nearest_x2(x)) is a transposed conv (stride 2, kernel 4, padding 1) whose taps are sums of the
# original ones: output 2i gets w[-1] x[i-1] + (w[0] + w[1]) x[i], output 2i+1 gets (w[-1] + w[0]) x[i] + w[1] x[i+1].
# Row t of _UP_TAPS says which original taps (w[-1], w[0], w[1]) make transposed-conv tap t.
_UP_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
_UP_EINSUM = {1: "pk,oik->iop", 2: "pk,ql,oikl->iopq", 3: "pk,ql,rm,oiklm->iopqr"}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def upsample_conv(x: torch.Tensor, conv: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """conv(nearest_x2(x)) for a k3 p1 s1 conv as one transposed conv on the coarse grid (same math, no upsampled
    copy; cuDNN runs the 2^d phases with 2^d taps each: 8/27 of the FLOPs in 3D). x: (B, Cin, *N) -> (B, Cout, *2N)."""
    from fastmaisi.nets.derived import derived_weight

    d = x.dim() - 2
    w = conv.weight
    channels_last = _is_channels_last(x)

    def transposed_weight() -> torch.Tensor:
        taps = w.new_zeros(len(_UP_TAPS), 3, dtype=torch.float32)  # filled on w's device: no host-to-device copy
        for t, row in enumerate(_UP_TAPS):
            for k, used in enumerate(row):
                if used:
                    taps[t, k] = 1.0
        wt = torch.einsum(_UP_EINSUM[d], *([taps] * d), w.float()).to(w.dtype)  # (Cin, Cout, 4, .., 4)
        return wt.contiguous(memory_format=torch.channels_last_3d) if channels_last else wt

    # derived at every call (never stale); once per loop inside `nets.derived.reuse_derived_weights`
    wt = transposed_weight() if _needs_grad(w) else derived_weight(conv, ("upsample", channels_last),
                                                                   transposed_weight)
    if bias is not None and kernels_run_on(x) and not _needs_grad(x, bias):
        return add_bias_(_CONV_T[d](x, wt, None, stride=2, padding=1), bias)
    return _CONV_T[d](x, wt, bias, stride=2, padding=1)


def add_upsampled_(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h + nearest_x2(x) without materialising the upsampled x (a broadcast add). h: (B, C, *2N), x: (B, C, *N)."""
    if (kernels_run_on(h) and h.dim() == 5 and _is_channels_last(h) and x.dtype == h.dtype and not _needs_grad(h, x)
            and _triton_kernels() is not None):  # one Triton pass (the broadcast add below runs at ~1/4 bandwidth)
        k, N = _triton_kernels(), h.numel()
        B, C, D2, H2, W2 = h.shape
        k["up_add"][(k["cdiv"](N, 4096),)](h, x, N, C, W2, H2, D2, *x.stride(), BLOCK=4096, num_warps=8)
        return h
    n = x.shape[2:]
    hv = h.view(*h.shape[:2], *[v for s in n for v in (s, 2)])
    xv = x.view(*x.shape[:2], *[v for s in n for v in (s, 1)])
    if _needs_grad(h, x) or h.dtype != torch.result_type(h, x):
        return (hv + xv).reshape(h.shape)
    hv.add_(xv)
    return h  # (a view of hv would carry a non-standard batch stride, which makes torch.cat fall back to NCDHW)


def fast_bias_add(x: torch.Tensor) -> bool:
    """Whether `add_bias_` / `add_bias_residual_` run their Triton pass for a conv output shaped like x (CUDA
    inference, a layout `_gn_layout` reads: NCDHW or channels-last, triton present)."""
    return (kernels_run_on(x) and x.dim() >= 3 and not _needs_grad(x) and _gn_layout(x) is not None
            and _triton_kernels() is not None)


def add_bias_residual_(h: torch.Tensor, bias: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """h + bias (per channel) + r, in place on a fresh conv output h. On CUDA one Triton pass in fp32 with one
    rounding (PyTorch's conv adds its bias in a pass of its own, and the residual add is another); else two adds."""
    if not (fast_bias_add(h) and r.dtype == h.dtype and r.shape == h.shape and r.stride() == h.stride()
            and not _needs_grad(bias, r)):
        return add_(add_bias_(h, bias), r)
    return _bias_add_pass(h, bias, r)


def add_bias_(h: torch.Tensor, bias: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """h + bias (per channel), then SiLU if asked, in place on a fresh conv output h: one Triton pass on CUDA
    (PyTorch's cuDNN convs add their bias with a broadcast kernel that runs at ~1/4 of the memory bandwidth on
    channels-last outputs, and SiLU would be another pass)."""
    if not (fast_bias_add(h) and not _needs_grad(bias)):
        h = add_(h, bias.reshape(-1, *([1] * (h.dim() - 2))))
        return silu_(h) if silu else h
    return _bias_add_pass(h, bias, None, silu)


def _bias_add_pass(h: torch.Tensor, bias: torch.Tensor, r: torch.Tensor | None, silu: bool = False) -> torch.Tensor:
    """The Triton pass behind `add_bias_` / `add_bias_residual_`: h += bias (+ r) [then SiLU], in place, one
    rounding."""
    k, n = _triton_kernels(), h.numel()
    channel_stride = _gn_layout(h)[1]  # flat index i -> channel (i // sC) % C: sC = S for NCDHW, 1 for channels-last
    k["bias_add"][(k["cdiv"](n, 4096),)](h, h if r is None else r, bias, n, h.shape[1], channel_stride,
                                          RES=r is not None, SILU=silu, BLOCK=4096, num_warps=8)
    return h


def cat_channels(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
    """torch.cat([a, b (+ r)], dim=1). Channels-last CUDA tensors are joined by one Triton copy: PyTorch's cat along
    the innermost storage dim takes a generic strided-copy kernel (3 ms a UNet step at a 128^3 latent); a residual r
    (a ControlNet's, for the skip b) is added on the way, instead of by a pass of its own over b."""
    if not (kernels_run_on(a) and _is_channels_last(a) and _is_channels_last(b) and a.dtype == b.dtype
            and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:] and not _needs_grad(a, b, r)
            and (r is None or (r.shape == b.shape and r.dtype == b.dtype and _is_channels_last(r)))
            and _triton_kernels() is not None):
        return torch.cat([a, b if r is None else b + r], dim=1)
    k = _triton_kernels()
    y = torch.empty((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), dtype=a.dtype, device=a.device,
                    memory_format=torch.channels_last_3d)
    n = y.numel()
    k["cat2"][(k["cdiv"](n, 4096),)](a, b, b if r is None else r, y, n, a.shape[1], b.shape[1], ADD=r is not None,
                                     BLOCK=4096, num_warps=8)
    return y


def norm_silu_pool_x2(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(avg_pool_x2(x), avg_pool_x2(SiLU(GroupNorm(x)))) in one read of x, both channels-last — a downsampling
    resnet's two inputs, without writing the full-resolution normalised tensor; None where this does not apply
    (not a CUDA inference channels-last 5-D x with even sizes)."""
    if not (x.dim() == 5 and _is_channels_last(x) and all(n % 2 == 0 for n in x.shape[2:])
            and fast_group_norm(x, norm)):
        return None
    k = _triton_kernels()
    scale, shift = _group_norm_affine(x, norm)
    B, C, D, H, W = x.shape
    xp = torch.empty((B, C, D // 2, H // 2, W // 2), dtype=x.dtype, device=x.device,
                     memory_format=torch.channels_last_3d)
    hp = torch.empty_like(xp)
    nv = B * (D // 2) * (H // 2) * (W // 2)
    block_c = min(k["next_pow2"](C), 64)
    block_v = 2048 // block_c
    k["pool_norm"][(k["cdiv"](nv, block_v), k["cdiv"](C, block_c))](
        x, xp, hp, scale, shift, nv, C, D // 2, H // 2, W // 2, BLOCK_V=block_v, BLOCK_C=block_c, num_warps=4)
    return xp, hp


def avg_pool_x2(x: torch.Tensor) -> torch.Tensor:
    """`F.avg_pool3d(x, 2, 2)` for a channels-last x, returned channels-last: a mean over the (B, D, H, W, C) view
    (fp32 accumulation, as avg_pool's). CUDA's avg_pool3d copies a channels-last input to NCDHW first: at 64 x 128^3
    that copy and the pool took 2.7 ms instead of ~0.2 ms."""
    B, C, D, H, W = x.shape
    if D % 2 or H % 2 or W % 2 or _needs_grad(x):
        return F.avg_pool3d(x, kernel_size=2, stride=2).contiguous(memory_format=torch.channels_last_3d)
    v = x.permute(0, 2, 3, 4, 1).view(B, D // 2, 2, H // 2, 2, W // 2, 2, C)
    return v.mean(dim=(2, 4, 6)).permute(0, 4, 1, 2, 3)  # (B, C, D/2, H/2, W/2), channels-last strides


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def embedding_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear (MONAI's time / region / spacing embedding; keys `.0.*`, `.2.*`)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


def run_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = mlp[0](x)
    return mlp[2](silu_(h))


# -------------------------------------------------------------------------------------------------------- convolution
class Conv(nn.Module):
    """MONAI `Convolution` stand-in: the real conv is the child `conv` (keys `<name>.conv.weight/bias`).

    act=True appends Swish (x * sigmoid(x) = SiLU), as the ControlNet conditioning embedding's `act="SWISH"`.
    k3 convs with few channels on one side run as one Triton pass on CUDA (`nets.thin_conv`), bias and Swish fused.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, act: bool = False) -> None:
        super().__init__()
        self.conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size, stride, padding)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if thin_conv.applies(x, conv):
            return thin_conv.thin_conv(x, conv, silu=self.act)
        if self.act and kernels_run_on(x) and conv.bias is not None and not _needs_grad(x, conv.weight, conv.bias):
            return add_bias_(conv._conv_forward(x, conv.weight, None), conv.bias, silu=True)  # bias + SiLU: one pass
        y = conv(x)
        return silu_(y) if self.act else y


def add_residual_inplace(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """MONAI's `s += r` (result keeps s's dtype), out of place when autograd needs `s` unmodified."""
    if torch.is_grad_enabled() and s.requires_grad:
        return (s + r).to(s.dtype)
    return s.add_(r)


def conv_add_(conv: Conv, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """MONAI's `h = conv(x); h += r` (a ControlNet's input conv plus the condition embedding); on CUDA inference the
    bias and r go in with one pass instead of two."""
    c = conv.conv
    if thin_conv.applies(x, c, r):
        return thin_conv.thin_conv(x, c, r=r)
    if c.bias is not None and kernels_run_on(x) and not _needs_grad(x, c.weight, c.bias, r):
        return add_bias_residual_(c._conv_forward(x, c.weight, None), c.bias, r)
    return add_residual_inplace(conv(x), r)


# ------------------------------------------------------------------------------------------------------ resnet block
class ResnetBlock(nn.Module):
    """MONAI `DiffusionUNetResnetBlock`: conv1(SiLU(GN1(x))) [+ up/down] + temb -> conv2(SiLU(GN2(.))) + skip(x).

    `temb` passed to forward is this block's precomputed `time_emb_proj(SiLU(emb))`, shape (B, Cout)
    (see `time_projections`). With the Triton GroupNorm, conv1 runs without bias and GN2 takes conv1's bias + temb
    into its statistics (no pass over the feature map); otherwise with B == 1 temb is folded into conv1's bias.
    Upsampling resnets run conv1 as one transposed conv on the coarse grid (`upsample_conv`) and add the
    residual by broadcasting (`add_upsampled_`).
    """

    upsample_on_coarse_grid = True  # up=True: conv1(nearest_x2(h)) via `upsample_conv` (same math, 8/27 FLOPs)

    def __init__(self, spatial_dims: int, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 up: bool = False, down: bool = False, norm_num_groups: int = 32, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels = out_channels or in_channels
        self.up, self.down = up, down
        self.temb_index = -1  # position in the owning network's time_projections() output, set by the network
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.conv1 = Conv(spatial_dims, in_channels, out_channels, 3, 1, 1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps, affine=True)
        self.conv2 = Conv(spatial_dims, out_channels, out_channels, 3, 1, 1)
        self.skip_connection = (Conv(spatial_dims, in_channels, out_channels, 1, 1, 0)
                                if in_channels != out_channels else None)

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        if self.down:
            return avg_pool_x2(t) if _is_channels_last(t) else _AVG_POOL[self.spatial_dims](t, kernel_size=2, stride=2)
        return t

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        conv1 = self.conv1.conv
        coarse_up = self.up and self.upsample_on_coarse_grid
        pooled = norm_silu_pool_x2(x, self.norm1) if self.down else None
        if pooled is not None:  # one pass: both pooled inputs, the full-resolution h never written
            x, h = pooled
        else:
            h = group_norm(x, self.norm1, silu=True)
            if not coarse_up and (self.up or self.down):
                x, h = self._resample(x), self._resample(h)
        if conv1.bias is not None and fast_group_norm(h, self.norm2):
            # conv1 without bias; GN2 takes bias + temb into its statistics and affine (no pass over h)
            h = upsample_conv(h, conv1, None) if coarse_up else conv1._conv_forward(h, conv1.weight, None)
            h = group_norm(h, self.norm2, silu=True, pre_bias=conv1.bias + temb)
        else:
            # batch 1: conv1(h) + temb == conv with bias (b + temb); saves a pass over the feature map.
            fold = h.shape[0] == 1 and temb.shape[0] == 1 and conv1.bias is not None
            bias = conv1.bias + temb[0] if fold else conv1.bias
            h = upsample_conv(h, conv1, bias) if coarse_up else conv1._conv_forward(h, conv1.weight, bias)
            if not fold:
                h = add_(h, temb.reshape(*temb.shape, *([1] * self.spatial_dims)))
            h = group_norm(h, self.norm2, silu=True)
        c2, sk = self.conv2.conv, self.skip_connection.conv if self.skip_connection is not None else None
        if not coarse_up and c2.bias is not None and fast_bias_add(h):
            # conv2 and the 1x1 skip without their biases: both biases and the residual go in with one pass over h
            h = c2._conv_forward(h, c2.weight, None)
            skip = sk._conv_forward(x, sk.weight, None) if sk is not None else x
            return add_bias_residual_(h, c2.bias if sk is None or sk.bias is None else c2.bias + sk.bias, skip)
        h = self.conv2(h)
        skip = self.skip_connection(x) if self.skip_connection is not None else x
        if coarse_up:  # x is still coarse: skip(up(x)) == up(skip(x)) (1x1 conv), added by broadcasting
            return add_upsampled_(h, skip)
        return add_(h, skip)


def time_projections(resnets: Sequence[ResnetBlock], emb: torch.Tensor) -> list[torch.Tensor]:
    """All `time_emb_proj(SiLU(emb))` of a network in one GEMM: SiLU once, weights concatenated (differentiable).

    Returns one (B, Cout_i) view per resnet, in the order of `resnets` (index = `resnet.temb_index`).
    """
    act = F.silu(emb)
    weight = torch.cat([r.time_emb_proj.weight for r in resnets])
    bias = torch.cat([r.time_emb_proj.bias for r in resnets])
    return list(F.linear(act, weight, bias).split([r.out_channels for r in resnets], dim=1))


# --------------------------------------------------------------------------------------------------- resample blocks
class Downsample(nn.Module):
    """MONAI `DiffusionUnetDownsample(use_conv=True)`: conv k3 s2 (key `op.conv.*`)."""

    def __init__(self, spatial_dims: int, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.op = Conv(spatial_dims, channels, channels, 3, 2, padding)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """MONAI `WrappedUpsample` (nontrainable nearest x2 + `postconv` k3)."""

    upsample_on_coarse_grid = True  # `upsample_conv` instead of interpolate + conv (same math, 8/27 FLOPs)

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.postconv = Conv(spatial_dims, channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample_on_coarse_grid:
            return upsample_conv(x, self.postconv.conv, self.postconv.conv.bias)
        return self.postconv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------- attention
class SelfAttention(nn.Module):
    """MONAI `SABlock` as used by the UNets: keys `out_proj` (if include_fc), then `to_q/to_k/to_v` or `qkv`.

    Runs one fused QKV GEMM (the three weights concatenated per call, or `qkv` directly) and SDPA.
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool, include_fc: bool = True,
                 use_combined_linear: bool = False, dropout_rate: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden size {hidden_size} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5  # MONAI's dim_head ** -0.5, passed to SDPA explicitly
        self.dropout_rate = dropout_rate
        self.use_combined_linear = use_combined_linear
        self.out_proj = nn.Linear(hidden_size, hidden_size) if include_fc else None
        if use_combined_linear:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.to_k = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.to_v = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)

    def qkv_projection(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.use_combined_linear:
            return self.qkv(tokens)
        layers = (self.to_q, self.to_k, self.to_v)
        return F.linear(tokens, torch.cat([m.weight for m in layers]), _maybe_cat([m.bias for m in layers]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C) -> (B, N, C)."""
        qkv = self.qkv_projection(tokens).unflatten(-1, (3, self.num_heads, -1))  # MONAI: "(qkv l d)"
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d), views
        p = self.dropout_rate if self.training else 0.0
        o = attention(q, k, v, self.scale, p)
        if self.out_proj is not None:
            o = self.out_proj(o)
        return F.dropout(o, p, training=True) if p > 0 else o


class CrossAttention(nn.Module):
    """MONAI `CrossAttentionBlock` (no qkv bias; keys `out_proj`, `to_q`, `to_k`, `to_v`).

    With a context of sequence length 1, softmax over the single key is exactly 1, so the output is
    `out_proj(to_v(context))` for every query token: computed as (B, 1, C) and broadcast by the caller.
    """

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int | None, dropout_rate: float = 0.0) -> None:
        super().__init__()
        context_dim = context_dim or hidden_size
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.dropout_rate = dropout_rate
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_k = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v = nn.Linear(context_dim, hidden_size, bias=False)

    def single_key(self, context: torch.Tensor | None) -> bool:
        """True when the shortcut is exact: one key, and no attention-weight dropout in effect."""
        return context is not None and context.shape[1] == 1 and not (self.training and self.dropout_rate > 0)

    def context_only(self, context: torch.Tensor) -> torch.Tensor:
        """The attention output for a length-1 context, (B, 1, C)."""
        o = self.out_proj(self.to_v(context))
        return F.dropout(o, self.dropout_rate, training=True) if self.training and self.dropout_rate > 0 else o

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = tokens if context is None else context
        q = _split_heads(self.to_q(tokens), self.num_heads)
        k = _split_heads(self.to_k(kv), self.num_heads)
        v = _split_heads(self.to_v(kv), self.num_heads)
        p = self.dropout_rate if self.training else 0.0
        o = self.out_proj(attention(q, k, v, self.scale, p))
        return F.dropout(o, p, training=True) if p > 0 else o


class SpatialAttentionBlock(nn.Module):
    """MONAI `SpatialAttentionBlock`: x + attn(GN(x)) over the N = prod(S) voxels as tokens (keys `norm`, `attn.*`).

    Output keeps x's memory layout (MONAI's `.contiguous()` copies are not needed).
    """

    def __init__(self, spatial_dims: int, num_channels: int, num_head_channels: int, norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, include_fc: bool = True, use_combined_linear: bool = False) -> None:
        super().__init__()
        if num_head_channels <= 0 or num_channels % num_head_channels != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by a positive num_head_channels "
                             f"({num_head_channels}) at every attention level")
        self.norm = nn.GroupNorm(norm_num_groups, num_channels, eps=norm_eps, affine=True)
        self.attn = SelfAttention(num_channels, num_channels // num_head_channels, qkv_bias=True,
                                  include_fc=include_fc, use_combined_linear=use_combined_linear)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = group_norm(x, self.norm)
        return x + from_tokens(self.attn(to_tokens(h)), x)  # x first: the sum takes x's memory layout


class GEGLUMLP(nn.Module):
    """MONAI `MLPBlock(act="GEGLU")`: linear2(a * gelu(g)), [a, g] = linear1(x).chunk(2)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim * 2)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.linear1(x).chunk(2, dim=-1)
        h = a * F.gelu(g)
        p = self.dropout_rate if self.training else 0.0
        if p > 0:
            return F.dropout(self.linear2(F.dropout(h, p, training=True)), p, training=True)
        return self.linear2(h)


class TransformerBlock(nn.Module):
    """MONAI `DiffusionUNetTransformerBlock`: x += attn1(LN1 x); x += attn2(LN2 x, ctx); x += ff(LN3 x)."""

    def __init__(self, num_channels: int, num_attention_heads: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, include_fc: bool = True,
                 use_combined_linear: bool = False) -> None:
        super().__init__()
        self.attn1 = SelfAttention(num_channels, num_attention_heads, qkv_bias=False, include_fc=include_fc,
                                   use_combined_linear=use_combined_linear, dropout_rate=dropout)
        self.ff = GEGLUMLP(num_channels, num_channels * 4, dropout)
        self.attn2 = CrossAttention(num_channels, num_attention_heads, cross_attention_dim, dropout)
        self.norm1 = nn.LayerNorm(num_channels)
        self.norm2 = nn.LayerNorm(num_channels)
        self.norm3 = nn.LayerNorm(num_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = add_(self.attn1(layer_norm(x, self.norm1)), x)
        if self.attn2.single_key(context):
            x = add_(x, self.attn2.context_only(context))  # (B, 1, C) broadcast; LN2, to_q, to_k skipped
        else:
            x = add_(self.attn2(layer_norm(x, self.norm2), context), x)
        return add_(self.ff(layer_norm(x, self.norm3)), x)


class SpatialTransformer(nn.Module):
    """MONAI `SpatialTransformer`: x + proj_out(blocks(proj_in(GN x) as tokens)); 1x1 convs run as token GEMMs."""

    def __init__(self, spatial_dims: int, in_channels: int, num_attention_heads: int, num_head_channels: int,
                 num_layers: int = 1, dropout: float = 0.0, norm_num_groups: int = 32, norm_eps: float = 1e-6,
                 cross_attention_dim: int | None = None, include_fc: bool = True,
                 use_combined_linear: bool = False) -> None:
        super().__init__()
        inner_dim = num_attention_heads * num_head_channels
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.proj_in = Conv(spatial_dims, in_channels, inner_dim, 1, 1, 0)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(inner_dim, num_attention_heads, dropout, cross_attention_dim, include_fc,
                             use_combined_linear) for _ in range(num_layers)])
        self.proj_out = Conv(spatial_dims, inner_dim, in_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = group_norm(x, self.norm)
        t = F.linear(to_tokens(h), _linear_weight(self.proj_in.conv), self.proj_in.conv.bias)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = F.linear(t, _linear_weight(self.proj_out.conv), self.proj_out.conv.bias)
        return x + from_tokens(t, x)


def make_attention(kind: str | None, spatial_dims: int, channels: int, num_head_channels: int, norm_num_groups: int,
                   norm_eps: float, transformer_num_layers: int, cross_attention_dim: int | None, dropout_cattn: float,
                   include_fc: bool, use_combined_linear: bool) -> nn.Module:
    if kind == "self":
        return SpatialAttentionBlock(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps, include_fc,
                                     use_combined_linear)
    if num_head_channels <= 0:
        raise ValueError(f"num_head_channels must be positive at every attention level, got {num_head_channels}")
    return SpatialTransformer(spatial_dims, channels, channels // num_head_channels, num_head_channels,
                              transformer_num_layers, dropout_cattn, norm_num_groups, norm_eps, cross_attention_dim,
                              include_fc, use_combined_linear)


# ----------------------------------------------------------------------------------------------------- level blocks
class DownBlock(nn.Module):
    """MONAI `DownBlock` / `AttnDownBlock` / `CrossAttnDownBlock` (attention=None / "self" / "cross").

    Returns (h, skips): one skip per resnet(+attention) and one for the downsampler.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, temb_channels: int,
                 num_res_blocks: int, norm_num_groups: int, norm_eps: float, add_downsample: bool,
                 resblock_updown: bool, attention: str | None = None, **attn_kwargs) -> None:
        super().__init__()
        if attention is not None:  # MONAI registers `attentions` before `resnets` in the attention down blocks
            self.attentions = nn.ModuleList([
                make_attention(attention, spatial_dims, out_channels, norm_num_groups=norm_num_groups,
                               norm_eps=norm_eps, **attn_kwargs) for _ in range(num_res_blocks)])
        self.resnets = nn.ModuleList([
            ResnetBlock(spatial_dims, in_channels if i == 0 else out_channels, temb_channels, out_channels,
                        norm_num_groups=norm_num_groups, norm_eps=norm_eps) for i in range(num_res_blocks)])
        if attention is None:
            self.attentions = None
        self.downsampler: nn.Module | None = None
        if add_downsample:
            self.downsampler = (
                ResnetBlock(spatial_dims, out_channels, temb_channels, out_channels, down=True,
                            norm_num_groups=norm_num_groups, norm_eps=norm_eps)
                if resblock_updown else Downsample(spatial_dims, out_channels))

    def forward(self, h: torch.Tensor, temb: Sequence[torch.Tensor], context: torch.Tensor | None = None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb[resnet.temb_index])
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = (self.downsampler(h, temb[self.downsampler.temb_index]) if isinstance(self.downsampler, ResnetBlock)
                 else self.downsampler(h))
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """MONAI `AttnMidBlock` / `CrossAttnMidBlock`: resnet_1, attention, resnet_2."""

    def __init__(self, spatial_dims: int, channels: int, temb_channels: int, norm_num_groups: int, norm_eps: float,
                 attention: str, **attn_kwargs) -> None:
        super().__init__()
        kw = dict(norm_num_groups=norm_num_groups, norm_eps=norm_eps)
        self.resnet_1 = ResnetBlock(spatial_dims, channels, temb_channels, channels, **kw)
        self.attention = make_attention(attention, spatial_dims, channels, **kw, **attn_kwargs)
        self.resnet_2 = ResnetBlock(spatial_dims, channels, temb_channels, channels, **kw)

    def forward(self, h: torch.Tensor, temb: Sequence[torch.Tensor], context: torch.Tensor | None = None):
        h = self.resnet_1(h, temb[self.resnet_1.temb_index])
        h = self.attention(h, context)
        return self.resnet_2(h, temb[self.resnet_2.temb_index])


class UpBlock(nn.Module):
    """MONAI `UpBlock` / `AttnUpBlock` / `CrossAttnUpBlock`: cat(h, skip) -> resnet [-> attention], then upsampler."""

    def __init__(self, spatial_dims: int, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, num_res_blocks: int, norm_num_groups: int, norm_eps: float, add_upsample: bool,
                 resblock_updown: bool, attention: str | None = None, **attn_kwargs) -> None:
        super().__init__()

        def attentions():
            return nn.ModuleList([
                make_attention(attention, spatial_dims, out_channels, norm_num_groups=norm_num_groups,
                               norm_eps=norm_eps, **attn_kwargs) for _ in range(num_res_blocks)])

        if attention == "cross":  # registration order as MONAI: CrossAttnUpBlock has attentions first
            self.attentions = attentions()
        resnets = []
        for i in range(num_res_blocks):
            res_skip = in_channels if i == num_res_blocks - 1 else out_channels
            res_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock(spatial_dims, res_in + res_skip, temb_channels, out_channels,
                                       norm_num_groups=norm_num_groups, norm_eps=norm_eps))
        self.resnets = nn.ModuleList(resnets)
        if attention == "self":
            self.attentions = attentions()
        elif attention is None:
            self.attentions = None
        self.upsampler: nn.Module | None = None
        if add_upsample:
            self.upsampler = (
                ResnetBlock(spatial_dims, out_channels, temb_channels, out_channels, up=True,
                            norm_num_groups=norm_num_groups, norm_eps=norm_eps)
                if resblock_updown else Upsample(spatial_dims, out_channels))

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: Sequence[torch.Tensor],
                context: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()  # a tensor, or (skip, ControlNet residual) to add on the way (`_UNetBase._forward`)
            h = resnet(cat_channels(h, *skip) if isinstance(skip, tuple) else cat_channels(h, skip),
                       temb[resnet.temb_index])
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsampler is not None:
            h = (self.upsampler(h, temb[self.upsampler.temb_index]) if isinstance(self.upsampler, ResnetBlock)
                 else self.upsampler(h))
        return h


# --------------------------------------------------------------------------------------------------- network config
def check_config(name: str, spatial_dims: int, channels: Sequence[int], attention_levels: Sequence[bool],
                 norm_num_groups: int, num_head_channels: int | Sequence[int], num_res_blocks: int | Sequence[int],
                 with_conditioning: bool, cross_attention_dim: int | None, dropout_cattn: float = 0.0):
    """MONAI's constructor checks (as ValueErrors) plus ours; returns (num_head_channels, num_res_blocks) tuples."""
    if spatial_dims not in _CONV:
        raise ValueError(f"{name}: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    if with_conditioning and cross_attention_dim is None:
        raise ValueError(f"{name} expects cross_attention_dim when with_conditioning=True")
    if cross_attention_dim is not None and not with_conditioning:
        raise ValueError(f"{name} expects with_conditioning=True when cross_attention_dim is given")
    if not 0.0 <= dropout_cattn <= 1.0:
        raise ValueError(f"{name}: dropout_cattn must be in [0, 1], got {dropout_cattn}")
    if any(c % norm_num_groups != 0 for c in channels):
        raise ValueError(f"{name} expects every channel count to be a multiple of norm_num_groups, got channels "
                         f"{list(channels)} and norm_num_groups {norm_num_groups}")
    if len(channels) != len(attention_levels):
        raise ValueError(f"{name}: channels ({len(channels)}) and attention_levels ({len(attention_levels)}) "
                         "must have the same length")
    heads = (num_head_channels,) * len(attention_levels) if isinstance(num_head_channels, int) \
        else tuple(num_head_channels)
    if len(heads) != len(attention_levels):
        raise ValueError(f"{name}: num_head_channels must be an int or have one entry per level "
                         f"({len(attention_levels)}), got {list(heads)}")
    blocks = (num_res_blocks,) * len(channels) if isinstance(num_res_blocks, int) else tuple(num_res_blocks)
    if len(blocks) != len(channels):
        raise ValueError(f"{name}: num_res_blocks must be an int or have one entry per level ({len(channels)}), "
                         f"got {list(blocks)}")
    for level, (c, attn, nh) in enumerate(zip(channels, attention_levels, heads)):
        if not (attn or level == len(channels) - 1):  # the middle block always attends, with the last level's heads
            continue
        if nh <= 0 or nh > c or (not with_conditioning and c % nh != 0):
            raise ValueError(f"{name}: level {level} has attention (or feeds the middle block) and needs "
                             f"num_head_channels dividing {c}, got {nh}")
    return heads, blocks


def build_down_path(module: nn.Module, spatial_dims: int, channels: Sequence[int],
                    attention_levels: Sequence[bool], heads: Sequence[int], blocks: Sequence[int], temb_channels: int,
                    norm_num_groups: int, norm_eps: float, resblock_updown: bool, with_conditioning: bool,
                    attn_kwargs: dict) -> None:
    """Registers `down_blocks` on `module` (MONAI's get_down_block loop)."""
    module.down_blocks = nn.ModuleList()
    out_c = channels[0]
    for i, c in enumerate(channels):
        in_c, out_c = out_c, c
        attention = ("cross" if with_conditioning else "self") if attention_levels[i] else None
        module.down_blocks.append(DownBlock(
            spatial_dims, in_c, out_c, temb_channels, blocks[i], norm_num_groups, norm_eps,
            add_downsample=i < len(channels) - 1, resblock_updown=resblock_updown, attention=attention,
            **(dict(num_head_channels=heads[i], **attn_kwargs) if attention else {})))


def build_mid_block(spatial_dims: int, channels: Sequence[int], heads: Sequence[int], temb_channels: int,
                    norm_num_groups: int, norm_eps: float, with_conditioning: bool, attn_kwargs: dict) -> MidBlock:
    return MidBlock(spatial_dims, channels[-1], temb_channels, norm_num_groups, norm_eps,
                    attention="cross" if with_conditioning else "self", num_head_channels=heads[-1], **attn_kwargs)


def build_up_path(module: nn.Module, spatial_dims: int, channels: Sequence[int], attention_levels: Sequence[bool],
                  heads: Sequence[int], blocks: Sequence[int], temb_channels: int, norm_num_groups: int,
                  norm_eps: float, resblock_updown: bool, with_conditioning: bool, attn_kwargs: dict) -> None:
    """Registers `up_blocks` on `module` (MONAI's get_up_block loop)."""
    module.up_blocks = nn.ModuleList()
    rc, rb, ra, rh = (list(reversed(v)) for v in (channels, blocks, attention_levels, heads))
    out_c = rc[0]
    for i in range(len(rc)):
        prev_c, out_c = out_c, rc[i]
        in_c = rc[min(i + 1, len(rc) - 1)]
        attention = ("cross" if with_conditioning else "self") if ra[i] else None
        module.up_blocks.append(UpBlock(
            spatial_dims, in_c, prev_c, out_c, temb_channels, rb[i] + 1, norm_num_groups, norm_eps,
            add_upsample=i < len(rc) - 1, resblock_updown=resblock_updown, attention=attention,
            **(dict(num_head_channels=rh[i], **attn_kwargs) if attention else {})))


def index_resnets(module: nn.Module) -> tuple[ResnetBlock, ...]:
    """Number every ResnetBlock of `module` (its `temb_index`) for `time_projections`."""
    resnets = tuple(m for m in module.modules() if isinstance(m, ResnetBlock))
    for i, r in enumerate(resnets):
        r.temb_index = i
    return resnets
