"""The ControlNet embedding's first conv straight from a uint8 label map, without building the bit-channels.

The condition is 8 channels, channel b = bit b of the label id, and conv_in is linear in them, so each of the 27
taps contributes one row of a table: T[tap, id, :] = sum over id's set bits b of W[:, b, tap]. conv_in(bits(label))
at a voxel is bias + the sum over taps of T[tap, label(neighbour)] (a neighbour outside the volume adds nothing, as
id 0 does). One Triton pass reads 1 byte per voxel and writes SiLU(conv_in) channels-last; the usual path writes the
2 GiB fp16 condition at 512^3 in three passes, then runs cuDNN's 8->8 conv and a bias + SiLU pass.
"""

import torch

from fastmaisi.nets.kernel_device import kernels_run_on, lazy_kernels


def _build(triton, tl):
    @triton.jit
    def label_conv(lab_ptr, tab_ptr, bias_ptr, y_ptr, NV, D, H, W, C: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_V: tl.constexpr):
        # y[v, :] = silu(bias + sum_tap tab[tap, label[v + offset(tap)], :]); label (B, D, H, W) uint8, y (NV, C)
        # channels-last; fp32 sums, one rounding
        v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        vmask = v < NV
        w = v % W
        t = v // W
        h = t % H
        d = (t // H) % D
        c = tl.arange(0, C)
        acc = tl.zeros([BLOCK_V, C], dtype=tl.float32) + tl.load(bias_ptr + c).to(tl.float32)[None, :]
        for tap in tl.static_range(27):
            dd = tap // 9 - 1
            dh = (tap // 3) % 3 - 1
            dw = tap % 3 - 1
            m = vmask & (d + dd >= 0) & (d + dd < D) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            ids = tl.load(lab_ptr + v + (dd * H + dh) * W + dw, mask=m, other=0).to(tl.int32)
            acc += tl.load(tab_ptr + (tap * 256 + ids)[:, None] * C + c[None, :])  # (id 0's row is 0)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_ptr + v[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=vmask[:, None])

    return label_conv, triton.cdiv


_label_conv_kernel = lazy_kernels(_build)


def tap_table(weight: torch.Tensor) -> torch.Tensor:
    """(27, 256, Cout) fp32 from a (Cout, 8, 3, 3, 3) weight: row (tap, id) = sum over id's set bits b of
    weight[:, b, tap], taps in (kd, kh, kw) order."""
    cout, bits = weight.shape[:2]
    ids = torch.arange(256, device=weight.device)
    id_bits = ((ids[:, None] >> torch.arange(bits, device=weight.device)) & 1).double()  # (256, bits)
    w = weight.double().reshape(cout, bits, 27)
    return torch.einsum("ib,cbt->tic", id_bits, w).float().contiguous()


def label_conv_applies(label: torch.Tensor, conv: torch.nn.Module) -> bool:
    """Whether `label_conv` can stand in for conv(bits(label)): a uint8 (B, 1, D, H, W) map, a 3D k3 s1 p1 conv
    with 8 input channels and a bias, inference on a device our kernels run on."""
    return (kernels_run_on(label) and label.dtype == torch.uint8 and label.dim() == 5 and label.shape[1] == 1
            and isinstance(conv, torch.nn.Conv3d) and conv.in_channels == 8 and conv.kernel_size == (3, 3, 3)
            and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.groups == 1 and conv.bias is not None and conv.out_channels in (1, 2, 4, 8, 16, 32)
            and not torch.is_grad_enabled() and _label_conv_kernel() is not None)


def label_conv(label: torch.Tensor, conv: torch.nn.Conv3d, silu: bool = True, block_v: int = 256,
               num_warps: int = 4) -> torch.Tensor:
    """[SiLU](conv(bits(label))) -> (B, Cout, D, H, W) channels-last in conv's dtype, from the uint8 label map
    (B, 1, D, H, W) in one pass (see the module docstring). Requires `label_conv_applies(label, conv)`."""
    kernel, cdiv = _label_conv_kernel()
    b, _, d, h, w = label.shape
    cout = conv.out_channels
    y = torch.empty((b, cout, d, h, w), dtype=conv.weight.dtype, device=label.device,
                    memory_format=torch.channels_last_3d)
    nv = b * d * h * w
    kernel[(cdiv(nv, block_v),)](label.contiguous(), tap_table(conv.weight), conv.bias, y, nv, d, h, w, C=cout,
                                 SILU=silu, BLOCK_V=block_v, num_warps=num_warps)
    return y
