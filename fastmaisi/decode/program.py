"""The VAE as a short program of ops, one per conv (`y = conv(act(GN(x))) [+ shortcut(res)]`), and the
shapes and input rows each op needs: what the exact decode/encode planner and executor work on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastmaisi.nets.autoencoder import Downsample, GroupNorm, MaisiConv, ResBlock, Upsample


_MiB = 1 << 20
_GiB = 1 << 30
# Rough sustained throughputs for the time estimate (FLOP/s of 3-D convs; host<->device bytes/s).
_CUDA_WORKSPACE = 256 * _MiB  # allowance for cuDNN workspaces and allocator rounding per op





@dataclass
class _Op:
    kind: str  # "conv" (stride 1, k1/k3), "up" (trilinear x2 + conv), "upT" (ConvTranspose3d x2), "down" (pad-end s2)
    src: int
    dst: int
    conv: torch.nn.Module  # the innermost nn.Conv3d / nn.ConvTranspose3d
    norm: torch.nn.GroupNorm | None = None
    silu: bool = False
    res: int | None = None
    shortcut: torch.nn.Module | None = None  # 1x1x1 conv on the residual

    @property
    def scale(self) -> float:
        return {"up": 2.0, "upT": 2.0, "down": 0.5}.get(self.kind, 1.0)


@dataclass
class _Slot:
    channels: int
    spatial: tuple[int, int, int] = (0, 0, 0)
    groups: int | None = None  # GroupNorm groups of the consumer that normalises this slot
    eps: float = 0.0
    last_use: int = -1


def _compile(blocks: Sequence[torch.nn.Module], in_channels: int, head: torch.nn.Module | None) -> tuple[list, list]:
    """Ops and slots for `blocks` (encoder or decoder), preceded by an optional 1x1 `head` conv (post_quant_conv)."""
    slots = [_Slot(in_channels)]
    ops: list[_Op] = []

    def emit(kind, src, conv, channels, **kw) -> int:
        slots.append(_Slot(channels))
        ops.append(_Op(kind, src, len(slots) - 1, conv, **kw))
        return len(slots) - 1

    cur = 0
    if head is not None:
        cur = emit("conv", cur, head.conv, head.conv.out_channels)
    blocks = list(blocks)
    i = 0
    while i < len(blocks):
        blk = blocks[i]
        if isinstance(blk, ResBlock):
            h = emit("conv", cur, blk.conv1.op, blk.out_channels, norm=blk.norm1, silu=True)
            sc = blk.nin_shortcut.op if isinstance(blk.nin_shortcut, MaisiConv) else None
            cur = emit("conv", h, blk.conv2.op, blk.out_channels, norm=blk.norm2, silu=True, res=cur, shortcut=sc)
        elif isinstance(blk, Downsample):
            cur = emit("down", cur, blk.conv.op, blk.conv.op.out_channels)
        elif isinstance(blk, Upsample):
            cur = emit("upT" if blk.use_convtranspose else "up", cur, blk.conv.op, blk.conv.op.out_channels)
        elif isinstance(blk, GroupNorm):  # final GN, applied (without SiLU) as the next conv's prologue
            conv = blocks[i + 1]
            cur = emit("conv", cur, conv.op, conv.op.out_channels, norm=blk, silu=False)
            i += 1
        elif isinstance(blk, MaisiConv):
            cur = emit("conv", cur, blk.op, blk.op.out_channels)
        else:
            raise TypeError(f"cannot tile a {type(blk).__name__} block")
        i += 1
    for k, op in enumerate(ops):
        for s in (op.src, op.res):
            if s is not None:
                slots[s].last_use = k
        if op.norm is not None:
            slots[op.src].groups, slots[op.src].eps = op.norm.num_groups, op.norm.eps
    return ops, slots


def _out_len(kind: str, n: int) -> int:
    return {"up": 2 * n, "upT": 2 * n, "down": (n + 1 - 3) // 2 + 1}.get(kind, n)


def _shapes(ops: list[_Op], slots: list[_Slot], spatial: Sequence[int]) -> None:
    slots[0].spatial = tuple(spatial)
    for op in ops:
        slots[op.dst].spatial = tuple(_out_len(op.kind, n) for n in slots[op.src].spatial)


def _in_rows(op: _Op, a: int, b: int, n_in: int) -> tuple[int, int]:
    """Input rows [lo, hi) that output rows [a, b) of `op` need (see the module docstring)."""
    return _in_rows_of(op.kind, op.conv.padding[0], a, b, n_in)


def _in_rows_of(kind: str, p: int, a: int, b: int, n_in: int) -> tuple[int, int]:
    if kind == "conv":
        return max(a - p, 0), min(b + p, n_in)
    if kind == "down":
        return 2 * a, min(2 * b + 1, n_in)
    if kind == "upT":
        return a // 2, min(b // 2 + 1, n_in)
    c, d = max(a - 1, 0), min(b + 1, 2 * n_in)  # "up": interpolated rows the conv needs, then input rows
    return max((c - 1) // 2, 0), min((d + 2) // 2, n_in)
