"""3x3x3 convs with few channels on one side (the UNets' 4->64 input and 64->4 output convs, the ControlNet
embedding's 8-channel convs), channels-last, as one Triton implicit GEMM with the bias, a residual and SiLU fused.

cuDNN runs these at a tenth of the memory bandwidth (0.83-0.87 ms for 4->64 / 64->4 at 128^3 on an H200, 10.4 ms for
8->8 at 512^3). Here one program computes BLOCK_M output voxels: per (kd, kh) row of taps, when 3 * Cin is small, the
three kw taps' inputs are 3 * Cin contiguous values in channels-last memory, so one [BLOCK_M, K] load and one
tensor-core dot cover them (K padded to 16 or 32 with zero weights); with Cin >= 16, one dot per tap. fp32
accumulation, bias (+ residual) (+ SiLU) in fp32, one rounding.
"""

import torch

from fastmaisi.nets.kernel_device import kernels_run_on

_KERNEL: dict = {}
ENABLED = True  # (benchmarks switch it off to time cuDNN in the same process)


def _kernel():
    if "k" in _KERNEL or "error" in _KERNEL:
        return _KERNEL.get("k")
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        _KERNEL["error"] = e
        return None

    @triton.jit
    def conv3(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, NO, D, H, W, DO, HO, WO, CIN: tl.constexpr, COUT: tl.constexpr,
              NP: tl.constexpr, KC: tl.constexpr, ROWS: tl.constexpr, STRIDE: tl.constexpr, RES: tl.constexpr,
              SILU: tl.constexpr, BLOCK_M: tl.constexpr):
        # x (B, D, H, W, CIN) and y (B, DO, HO, WO, COUT) channels-last; w packed (taps, KC, NP), zero-padded
        o = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        omask = o < NO
        wo = o % WO
        t = o // WO
        ho = t % HO
        t = t // HO
        do = t % DO
        b = t // DO
        di, hi, wi = do * STRIDE, ho * STRIDE, wo * STRIDE
        centre = ((b * D + di) * H + hi) * W + wi  # input voxel under the kernel's centre
        k = tl.arange(0, KC)
        n = tl.arange(0, NP)
        acc = tl.zeros([BLOCK_M, NP], dtype=tl.float32)
        for row in tl.static_range(9):
            zd = di + (row // 3 - 1)
            zh = hi + (row % 3 - 1)
            ok = omask & (zd >= 0) & (zd < D) & (zh >= 0) & (zh < H)
            vox = centre + ((row // 3 - 1) * H + (row % 3 - 1)) * W
            if ROWS:  # k = kw * CIN + c: the three kw taps are contiguous
                zw = wi[:, None] - 1 + (k // CIN)[None, :]
                m = ok[:, None] & (k < 3 * CIN)[None, :] & (zw >= 0) & (zw < W)
                a = tl.load(x_ptr + (vox[:, None] - 1) * CIN + k[None, :], mask=m, other=0.0)
                wt = tl.load(w_ptr + (row * KC + k)[:, None] * NP + n[None, :])
                acc = tl.dot(a, wt, acc)
            else:
                for kw in tl.static_range(3):
                    zw = wi + (kw - 1)
                    m = ok & (zw >= 0) & (zw < W)
                    a = tl.load(x_ptr + (vox + (kw - 1))[:, None] * CIN + k[None, :], mask=m[:, None], other=0.0)
                    wt = tl.load(w_ptr + ((row * 3 + kw) * KC + k)[:, None] * NP + n[None, :])
                    acc = tl.dot(a, wt, acc)
        acc += tl.load(b_ptr + n)[None, :]
        out = omask[:, None] & (n < COUT)[None, :]
        if RES:
            acc += tl.load(r_ptr + o[:, None] * COUT + n[None, :], mask=out, other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_ptr + o[:, None] * COUT + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)

    _KERNEL["k"] = (conv3, triton.cdiv, triton.next_power_of_2)
    return _KERNEL["k"]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _shape(cin: int, cout: int) -> tuple[bool, int, int]:
    """(rows, KC, NP): one dot per row of taps (3 * cin values, padded to KC) or per tap (KC = cin); NP padded cout."""
    rows = 3 * cin <= 32
    return rows, (max(16, _pow2(3 * cin)) if rows else cin), max(16, _pow2(cout))


def applies(x: torch.Tensor, conv: torch.nn.Module, r: torch.Tensor | None = None) -> bool:
    """Whether `thin_conv(x, conv, ...)` stands in for conv(x): CUDA inference in fp16/bf16, channels-last 5-D x, a
    k3 p1 conv (stride 1 or 2, no groups or dilation) with a bias and min(Cin, Cout) <= 8, Cin <= 8 or a power of
    two >= 16, Cout <= 64."""
    if not (ENABLED and isinstance(conv, torch.nn.Conv3d) and kernels_run_on(x) and x.dim() == 5
            and x.dtype in (torch.float16, torch.bfloat16) and conv.weight.dtype == x.dtype and conv.bias is not None
            and not torch.is_grad_enabled()):
        return False
    cin, cout = conv.in_channels, conv.out_channels
    if (conv.kernel_size != (3, 3, 3) or conv.padding != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1
            or conv.stride not in ((1, 1, 1), (2, 2, 2)) or min(cin, cout) > 8 or cout > 64
            or not (3 * cin <= 32 or (cin >= 16 and cin == _pow2(cin))) or x.shape[1] != cin):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last_3d):
        return False
    if r is not None and not (r.dtype == x.dtype and r.shape == _out_shape(x, conv)
                              and r.is_contiguous(memory_format=torch.channels_last_3d)):
        return False
    return _kernel() is not None


def _out_shape(x: torch.Tensor, conv: torch.nn.Conv3d) -> tuple[int, ...]:
    s = conv.stride[0]
    return (x.shape[0], conv.out_channels, *[(n - 1) // s + 1 for n in x.shape[2:]])


def _packed(conv: torch.nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as (taps, KC, NP) for the kernel and the bias padded to NP (fp32), cached on the module until the
    weight or bias changes."""
    w, b = conv.weight, conv.bias
    key = (w.data_ptr(), w._version, b.data_ptr(), b._version, w.dtype, w.device)
    cached = getattr(conv, "_thin_conv_pack", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    cout, cin = w.shape[:2]
    rows, kc, np_ = _shape(cin, cout)
    wk = w.detach().permute(2, 3, 4, 1, 0)  # (kd, kh, kw, cin, cout)
    pack = torch.zeros((9 if rows else 27), kc, np_, dtype=w.dtype, device=w.device)
    pack[:, : (3 * cin if rows else cin), :cout] = wk.reshape(9 if rows else 27, -1, cout)
    bias = torch.zeros(np_, dtype=torch.float32, device=w.device)
    bias[:cout] = b.detach().float()
    conv._thin_conv_pack = (key, pack, bias)
    return pack, bias


def thin_conv(x: torch.Tensor, conv: torch.nn.Conv3d, r: torch.Tensor | None = None, silu: bool = False,
              block_m: int = 128, num_warps: int = 4) -> torch.Tensor:
    """conv(x) [+ r] [then SiLU] -> channels-last, one pass (requires `applies(x, conv, r)`)."""
    kernel, cdiv, _ = _kernel()
    cin, d, h, w = x.shape[1:]
    bsz, cout, do, ho, wo = shape = _out_shape(x, conv)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    rows, kc, np_ = _shape(cin, cout)
    pack, bias = _packed(conv)
    no = bsz * do * ho * wo
    kernel[(cdiv(no, block_m),)](x, pack, bias, y if r is None else r, y, no, d, h, w, do, ho, wo, CIN=cin,
                                 COUT=cout, NP=np_, KC=kc, ROWS=rows, STRIDE=conv.stride[0], RES=r is not None, SILU=silu,
                                 BLOCK_M=block_m, num_warps=num_warps)
    return y
