"""The smallest root among each voxel's same-label neighbours (its 3^D cube, itself included): the one pass per
round of the piece labelling in `pipelines.label_pieces`. A Triton kernel reads the 27 neighbours of a 3-D volume
in one pass on CUDA; elsewhere (and for other dimensions) the same minimum over 13 shifted-slice pairs."""

from __future__ import annotations

import itertools

import torch

from fastmaisi.nets.kernel_device import kernels_run_on, lazy_kernels

_BLOCK = 512


def _build(triton, tl):
    @triton.jit
    def neighbour_min(key_ptr, root_ptr, out_ptr, N, D1, D2, BIG, BLOCK: tl.constexpr):
        # out[v] = min(root[u]) over u in v's 3^3 cube (v included) with key[u] == key[v] >= 0; BIG where key[v] < 0
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < N
        k = tl.load(key_ptr + offs, mask=valid, other=-1)
        i2 = offs % D2
        i1 = (offs // D2) % D1
        i0 = offs // (D2 * D1)
        D0 = N // (D1 * D2)
        best = tl.zeros([BLOCK], tl.int64) + BIG
        for a in tl.static_range(3):
            for b in tl.static_range(3):
                for c in tl.static_range(3):
                    j0 = i0 + (a - 1)
                    j1 = i1 + (b - 1)
                    j2 = i2 + (c - 1)
                    inside = valid & (k >= 0) & (j0 >= 0) & (j0 < D0) & (j1 >= 0) & (j1 < D1) & (j2 >= 0) & (j2 < D2)
                    n = offs + ((a - 1) * D1 + (b - 1)) * D2 + (c - 1)
                    kn = tl.load(key_ptr + n, mask=inside, other=-2)
                    same = inside & (kn == k)
                    r = tl.load(root_ptr + n, mask=same, other=BIG)
                    best = tl.minimum(best, r)
        tl.store(out_ptr + offs, best, mask=valid)

    return neighbour_min


_kernels = lazy_kernels(_build)


def _shifted(n: int, step: int) -> tuple[slice, slice]:
    """Along one axis of length n: the slice of voxels v and the slice of their neighbours v + step."""
    return slice(max(0, -step), n - max(0, step)), slice(max(0, step), n - max(0, -step))


def _neighbour_min_torch(key: torch.Tensor, root: torch.Tensor, big: int) -> torch.Tensor:
    """The kernel's result with shifted slices (half the neighbour directions, each used both ways)."""
    best = torch.where(key >= 0, root, big)
    steps = [s for s in itertools.product((-1, 0, 1), repeat=key.ndim) if s > (0,) * key.ndim]
    for step in steps:
        here, there = zip(*(_shifted(n, s) for n, s in zip(key.shape, step)))
        same = (key[here] == key[there]) & (key[here] >= 0)
        best[here] = torch.minimum(best[here], torch.where(same, root[there], big))
        best[there] = torch.minimum(best[there], torch.where(same, root[here], big))
    return best


def same_label_neighbour_min(key: torch.Tensor, root: torch.Tensor, big: int) -> torch.Tensor:
    """key (*S) int32, < 0 = not taking part; root (*S) int64 -> (*S) int64: min of root over each voxel's cube
    neighbours u with key[u] == key[v] >= 0 (v included); `big` where key[v] < 0."""
    kernel = _kernels() if kernels_run_on(key) else None
    if kernel is None or key.ndim != 3:
        return _neighbour_min_torch(key, root, big)
    out = torch.empty_like(root)
    n = key.numel()
    kernel[(-(-n // _BLOCK),)](key, root, out, n, key.shape[1], key.shape[2], big, BLOCK=_BLOCK)
    return out
