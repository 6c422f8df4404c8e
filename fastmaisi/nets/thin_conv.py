"""3x3x3 convs from few input channels to many (the UNets' and ControlNets' 4->64 input convs), channels-last, as one
Triton implicit GEMM with the bias, a residual (the ControlNet's condition embedding) and SiLU fused.

cuDNN + our bias pass take 1.65 ms for 4->64 at 128^3 on an H200, about ten times the memory traffic's worth; this
kernel 0.36 ms (docs/performance.md). One program computes BLOCK_M output voxels: per (kd, kh) row of taps, the three
kw taps' inputs are 3 * Cin contiguous values in channels-last memory, so one [BLOCK_M, 16] load and one tensor-core
dot cover them (K padded to 16 with zero weights). fp32 accumulation, bias (+ residual) (+ SiLU) in fp32, one rounding.
The same scheme for 64->4 output convs (a dot per tap) and the embedding's 8->8 convs was slower than cuDNN (1.25 vs
1.0 ms, 17 vs 11.6 ms: 27 reloads of the input tile through L2), so those stay with cuDNN.
"""

import torch

from fastmaisi.nets.kernel_device import kernels_run_on, lazy_kernels

ENABLED = True  # (benchmarks switch it off to time cuDNN in the same process)


def _build(triton, tl):
    @triton.jit
    def conv3(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, NV, D, H, W, CIN: tl.constexpr, COUT: tl.constexpr,
              KC: tl.constexpr, RES: tl.constexpr, SILU: tl.constexpr, BLOCK_M: tl.constexpr):
        # x (B, D, H, W, CIN) and y (B, D, H, W, COUT) channels-last; w packed (9 rows of taps, KC, COUT), row
        # (kd, kh) holds the three kw taps' weights at k = kw * CIN + c, zero for k >= 3 * CIN
        v = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        vmask = v < NV
        w = v % W
        t = v // W
        h = t % H
        d = (t // H) % D
        k = tl.arange(0, KC)
        n = tl.arange(0, COUT)
        zw = w[:, None] - 1 + (k // CIN)[None, :]
        kw_ok = (k < 3 * CIN)[None, :] & (zw >= 0) & (zw < W)
        acc = tl.zeros([BLOCK_M, COUT], dtype=tl.float32)
        for row in tl.static_range(9):
            zd = d + (row // 3 - 1)
            zh = h + (row % 3 - 1)
            ok = vmask & (zd >= 0) & (zd < D) & (zh >= 0) & (zh < H)
            first = v + ((row // 3 - 1) * H + (row % 3 - 1)) * W - 1  # voxel under the kw = 0 tap
            a = tl.load(x_ptr + first[:, None] * CIN + k[None, :], mask=ok[:, None] & kw_ok, other=0.0)
            acc = tl.dot(a, tl.load(w_ptr + (row * KC + k)[:, None] * COUT + n[None, :]), acc)
        acc += tl.load(b_ptr + n).to(tl.float32)[None, :]
        if RES:
            acc += tl.load(r_ptr + v[:, None] * COUT + n[None, :], mask=vmask[:, None], other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_ptr + v[:, None] * COUT + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=vmask[:, None])

    return conv3, triton.cdiv


_kernel = lazy_kernels(_build)


KC = 16  # the dot's K: three kw taps of up to 5 input channels, zero-padded


def applies(x: torch.Tensor, conv: torch.nn.Module, r: torch.Tensor | None = None) -> bool:
    """Whether `thin_conv(x, conv, r)` stands in for conv(x) [+ r]: CUDA inference in fp16/bf16, a 5-D x, a k3 s1 p1
    conv (no groups or dilation) with a bias, Cin <= 5 and Cout a power of two in 16..64. x may be NCDHW
    (the sampler's latent is): its few channels are copied to channels-last first."""
    # (asked for every conv of every step: the channel counts, which turn nearly all of them away, come first)
    if not (isinstance(conv, torch.nn.Conv3d) and 3 * conv.in_channels <= KC and conv.out_channels in (16, 32, 64)
            and ENABLED and kernels_run_on(x) and x.dim() == 5 and x.shape[1] == conv.in_channels
            and x.dtype in (torch.float16, torch.bfloat16) and conv.weight.dtype == x.dtype and conv.bias is not None
            and not torch.is_grad_enabled()):
        return False
    if (conv.kernel_size != (3, 3, 3) or conv.padding != (1, 1, 1) or conv.stride != (1, 1, 1)
            or conv.dilation != (1, 1, 1) or conv.groups != 1):
        return False
    cout = conv.out_channels
    if r is not None and not (r.dtype == x.dtype and r.shape == (x.shape[0], cout, *x.shape[2:])
                              and r.is_contiguous(memory_format=torch.channels_last_3d)):
        return False
    return _kernel() is not None


def _packed(conv: torch.nn.Conv3d) -> torch.Tensor:
    """The weight as (9 rows of taps, KC, Cout) for the kernel: packed at every call, once per loop inside
    `nets.derived.reuse_derived_weights`."""
    from fastmaisi.nets.derived import derived_weight

    def pack() -> torch.Tensor:
        w = conv.weight
        cout, cin = w.shape[:2]
        out = torch.zeros(9, KC, cout, dtype=w.dtype, device=w.device)
        out[:, : 3 * cin] = w.detach().permute(2, 3, 4, 1, 0).reshape(9, 3 * cin, cout)  # (kd kh, kw cin, cout)
        return out

    return derived_weight(conv, ("thin_conv",), pack)


def thin_conv(x: torch.Tensor, conv: torch.nn.Conv3d, r: torch.Tensor | None = None, silu: bool = False,
              block_m: int = 64, num_warps: int = 4) -> torch.Tensor:
    """conv(x) [+ r] [then SiLU] -> channels-last, one pass (requires `applies(x, conv, r)`)."""
    kernel, cdiv = _kernel()
    x = x.contiguous(memory_format=torch.channels_last_3d)  # (a copy only for an NCDHW x: 4 channels, 32 MiB at 128^3)
    bsz, cin, d, h, w = x.shape
    cout = conv.out_channels
    y = torch.empty((bsz, cout, d, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    nv = bsz * d * h * w
    kernel[(cdiv(nv, block_m),)](x, _packed(conv), conv.bias, y if r is None else r, y, nv, d, h, w, CIN=cin,
                                 COUT=cout, KC=KC, RES=r is not None, SILU=silu, BLOCK_M=block_m,
                                 num_warps=num_warps)
    return y
