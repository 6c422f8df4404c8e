"""Tensor operations with a Triton fast path for CUDA inference and a PyTorch path everywhere else (same math):
GroupNorm statistics and apply, bias (+ residual, + SiLU) adds, nearest/trilinear x2 upsampling, fused
upsample-conv weights, channel concatenation, pooling. The kernels are in `nets.triton_kernels`; the modules that use
these ops in `nets.blocks` (which re-exports them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmaisi.nets.kernel_device import kernels_run_on
from fastmaisi.nets.triton_kernels import _triton_kernels


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


# Per axis, conv_k3(nearest_x2(x)) is a transposed conv (stride 2, kernel 4, padding 1) whose taps are sums of the
# original ones: output 2i gets w[-1] x[i-1] + (w[0] + w[1]) x[i], output 2i+1 gets (w[-1] + w[0]) x[i] + w[1] x[i+1].
# Row t of _UP_TAPS says which original taps (w[-1], w[0], w[1]) make transposed-conv tap t.
_UP_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
_UP_EINSUM = {1: "pk,oik->iop", 2: "pk,ql,oikl->iopq", 3: "pk,ql,rm,oiklm->iopqr"}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _up_taps(device) -> torch.Tensor:
    """_UP_TAPS as a float32 (4, 3) tensor made on `device` by arithmetic (tap t uses w[k-1] iff t + k is 2 or 3): no
    host-to-device copy, so it can be recomputed inside a CUDA graph capture (a host table or item assignment
    cannot)."""
    s = torch.arange(4, device=device).view(4, 1) + torch.arange(3, device=device).view(1, 3)
    return ((s == 2) | (s == 3)).float()


def upsample_conv(x: torch.Tensor, conv: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """conv(nearest_x2(x)) for a k3 p1 s1 conv as one transposed conv on the coarse grid (same math, no upsampled
    copy; cuDNN runs the 2^d phases with 2^d taps each: 8/27 of the FLOPs in 3D). x: (B, Cin, *N) -> (B, Cout, *2N)."""
    from fastmaisi.nets.derived import derived_weight

    d = x.dim() - 2
    w = conv.weight
    channels_last = _is_channels_last(x)

    def transposed_weight() -> torch.Tensor:
        taps = _up_taps(w.device)
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
