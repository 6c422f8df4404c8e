"""The exact decode split along D across several devices of one process, or across the processes of a
torch.distributed group (NCCL on GPUs, gloo on CPU): `decode_latent_split`, its planner `plan_split`.

Each part owns a contiguous band of D rows of every activation (the same fraction of the axis at every resolution).
Per op it receives from its neighbours the input rows its band reads past its own (the convs' halo, the trilinear
x2's extra row), computes its band slab by slab with the one-device executor's slab code (`_Run.slab`, so zero padding
and the trilinear clamp happen only at the true ends of the volume), and the GroupNorm statistics of the op's output
(count, mean, M2 in fp64 per sample and group) are gathered from every part and merged in part order before any part
normalises. The result is the whole-volume `vae.decode` up to the order of fp64 sums. Memory per part: the live
bands of an op (input, output, residual, plus halo rows) and one slab's temporaries; when the per-device budget
cannot hold them, the largest bands live in page-locked host memory instead (no recomputation, no copy overlap).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fastmaisi.decode.execute import _Recomputed, _Run
from fastmaisi.decode.host_memory import _host_buffer, _host_release
from fastmaisi.decode.plan import (GPU, HOST, RECOMPUTE, _CUDA_WORKSPACE, _ELEMENTWISE_BW, _GiB, _HOST_BW,
                                   _PLAN_FRACTION, _SLAB_VOXELS, _Planner, _default_budget, _host_available,
                                   _lifetimes, _live, _vae_for_plan, format_seconds)
from fastmaisi.decode.program import _compile, _in_rows, _shapes
from fastmaisi.nets.blocks import group_moments


def _band(n: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [a, b) of an axis of n rows that `part` of `parts` owns (bands differ by at most one row)."""
    return n * part // parts, n * (part + 1) // parts


def _need(op, part: int, parts: int, slots) -> tuple[int, int] | None:
    """Input rows [lo, hi) that `part`'s band of op's output reads; None for an empty band."""
    a, b = _band(slots[op.dst].spatial[0], part, parts)
    return _in_rows(op, a, b, slots[op.src].spatial[0]) if b > a else None


@dataclass
class SplitPlan:
    """What a split decode will do: per part its device, its band of output rows, rows per slab and estimated peak.

    `peaks` count activations and per-slab temporaries (weights not counted), like `DecodePlan.peak_bytes`.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    devices: list[str]
    dtype: torch.dtype
    memory_budget_bytes: int | None
    bands: list[tuple[int, int]]  # output rows [a, b) per part
    peaks: list[int]
    slab_rows: list[int]  # rows per slab of the full-resolution ops, per part
    est_seconds: float
    host_bytes: list[int] = field(default_factory=list)  # per part: bands of activations kept in host memory
    _rows: list[list[int]] = field(default_factory=list, repr=False)  # per part, per op
    _place: list[str] = field(default_factory=list, repr=False)  # per slot: GPU (the device) or HOST

    @property
    def peak_bytes(self) -> int:
        """The largest part's estimated peak: what one device needs (the budget is per device)."""
        return max(self.peaks, default=0)

    def describe(self) -> str:
        size = lambda n: f"{n / _GiB:.2f} GiB" if n >= _GiB else f"{n / (1 << 20):.1f} MiB"  # noqa: E731
        budget = ("no budget" if self.memory_budget_bytes is None
                  else f"a budget of {size(self.memory_budget_bytes)} per device")
        per = "; ".join(f"{d}: rows {a}-{b - 1} ({b - a} rows, slabs of {r}), estimated peak {size(p)}"
                        + (f" and {size(h)} of host memory" if h else "")
                        for d, (a, b), r, p, h in zip(self.devices, self.bands, self.slab_rows, self.peaks,
                                                      self.host_bytes or [0] * len(self.devices)))
        return (f"Decode {tuple(self.input_shape)} -> {tuple(self.output_shape)} "
                f"({str(self.dtype).replace('torch.', '')}) split along D over {len(self.devices)} parts with "
                f"{budget}, halo rows exchanged and GroupNorm statistics merged across parts: {per}. "
                f"Expected time about {format_seconds(self.est_seconds)}.")

    __str__ = describe


def _tile_parts(ops, slots, pl: _Planner, place: list[str], P: int, fill: int | None, work: int):
    """Per part: rows per slab of each op, estimated peak, and the least memory any op needs (one-row slabs) with
    the op that needs it. Bands of activations placed on the host are not counted; their slabs' copies are."""
    n, last = len(slots), _lifetimes(ops, slots, place)
    out_bytes = pl.size(n - 1)  # the gathered output
    parts = []
    for p in range(P):
        band = lambda s: _band(slots[s].spatial[0], p, P)  # noqa: E731
        r_p, peak_p, least = [], 0, (0, 0)
        for k, op in enumerate(ops):
            held = sum((band(s)[1] - band(s)[0]) * pl.row_bytes(s) for s in _live(ops, last, k) if place[s] == GPU)
            need = _need(op, p, P, slots)
            if need is not None and op.src != 0:
                a, b = band(op.src)
                held += (max(a - need[0], 0) + max(need[1] - b, 0)) * pl.row_bytes(op.src)  # halo rows
            a, b = band(op.dst)
            cap = -(-_SLAB_VOXELS // max(math.prod(slots[op.dst].spatial[1:]), 1))  # wider slabs gain nothing
            top = max(1, b - a if fill is None else min(b - a, pl.max_rows(k), cap))
            least = max(least, (held + work + pl.ws(k, 1, place), k))
            if fill is None:
                r = top
            elif held + work + pl.ws(k, 1, place) > fill:
                r = 1
            else:
                r = pl._widest(k, 1, top, held + work, fill, place)
            r_p.append(r)
            peak_p = max(peak_p, held + work + pl.ws(k, r, place))
        parts.append((r_p, int(max(peak_p, 2 * out_bytes + work)), least))  # the end: the output gathered
    return parts


_OFF_DEVICE = (RECOMPUTE, HOST)  # where the planner may move an activation's bands off the device (tests narrow it)


def _seconds(ops, slots, pl: _Planner, place: list[str], parts, P: int) -> float:
    """Rough time: the one-device estimate of the slowest part's slabs over the whole volume, divided by P, with
    host copies added to the convolutions (the split does not overlap them)."""
    full = [slots[op.dst].spatial[0] for op in ops]
    gpu = [slots[s].spatial[0] if place[s] == GPU else 0 for s in range(len(slots))]
    bw = _HOST_BW if pl.cuda else float("inf")
    worst = 0.0
    for part in parts:
        rows = [max(1, min(r, f)) for r, f in zip(part[0], full)]
        total = 0.0
        for k in pl.passes(place):
            _, acc, n_slabs = pl.pass_cost(k, place, rows, gpu)
            total += n_slabs * (acc["conv"] + (sum(acc["h2d"].values()) + acc["d2h"]) / bw
                                + acc["ew"] / _ELEMENTWISE_BW)
        worst = max(worst, total)
    return worst / P


def _plan_split(ops, slots, in_shape, out_channels, devices: Sequence, budget: int | None, dtype) -> SplitPlan:
    """Rows per slab per part and op: the widest slab whose live bands and temporaries fit the per-device budget.
    When even one-row slabs do not fit, the largest activation live at the op that needs most is recomputed from
    its producer's inputs whenever read, or goes to host memory (its band page-locked, its slabs copied in and out),
    whichever the time estimate prefers, one at a time, until every op fits."""
    _shapes(ops, slots, in_shape[2:])
    B, P, n = in_shape[0], len(devices), len(slots)
    esz = torch.empty((), dtype=dtype).element_size()
    cuda = torch.device(devices[0]).type == "cuda"
    pl = _Planner(ops, slots, B, B, esz, "cuda" if cuda else "cpu")
    place = [GPU] * n
    fill = None if budget is None else (int(budget * _PLAN_FRACTION) if cuda else budget)
    work = _CUDA_WORKSPACE + (budget or 0) // 32 if cuda else 0
    parts = _tile_parts(ops, slots, pl, place, P, fill, work)
    while True:
        (need, k), p = max((part[2], i) for i, part in enumerate(parts))
        if fill is None or need <= fill:
            break
        band = lambda s: _band(slots[s].spatial[0], p, P)  # noqa: E731
        movable = [s for s in _live(ops, _lifetimes(ops, slots, place), k) if place[s] == GPU and 0 < s < n - 1]
        if movable:  # the largest, recomputed or on the host, whichever the estimate prefers
            s = max(movable, key=lambda s: (band(s)[1] - band(s)[0]) * pl.row_bytes(s))
            options = []
            for where in _OFF_DEVICE:
                cand = place[:s] + [where] + place[s + 1:]
                c_parts = _tile_parts(ops, slots, pl, cand, P, fill, work)
                c_need = max(part[2][0] for part in c_parts)  # plans that fit first, then the faster, else the least
                rank = (0, _seconds(ops, slots, pl, cand, c_parts, P)) if c_need <= fill else (1, c_need)
                options.append((rank, where, cand, c_parts))
            _, _, place, parts = min(options, key=lambda o: o[0])
        else:
            need_b = int(need / (_PLAN_FRACTION if cuda else 1)) + 1
            raise ValueError(
                f"memory_budget_bytes={budget} per device is too small for a split decode of {tuple(in_shape)} over "
                f"{P} parts: part {p} needs at least {need_b} bytes ({need_b / _GiB:.3f} GiB) with every large "
                f"activation recomputed or in host memory; use more devices or a larger budget")
    out_shape = (B, out_channels, *slots[-1].spatial)
    secs = _seconds(ops, slots, pl, place, parts, P)
    top_k = max(range(len(ops)), key=lambda k: slots[ops[k].dst].spatial[0])
    host = [sum((_band(slots[s].spatial[0], p, P)[1] - _band(slots[s].spatial[0], p, P)[0]) * pl.row_bytes(s)
                for s in range(n) if place[s] == HOST) for p in range(P)]
    limit = _host_available() if cuda and any(host) else None
    if limit is not None and sum(host) > limit:
        raise ValueError(
            f"memory_budget_bytes={budget} per device: a split decode of {tuple(in_shape)} over {P} parts would keep "
            f"{sum(host) / _GiB:.1f} GiB in page-locked host memory and {limit / _GiB:.1f} GiB is available; use a "
            f"larger budget or more devices")
    return SplitPlan(tuple(in_shape), out_shape, [str(d) for d in devices], dtype, budget,
                     [_band(out_shape[2], p, P) for p in range(P)], [part[1] for part in parts],
                     [part[0][top_k] for part in parts], secs, host, [part[0] for part in parts], place)


def plan_split(latent_shape: Sequence[int], devices: Sequence[str | torch.device],
               memory_budget_bytes: int | None = None, dtype: torch.dtype = torch.float16, vae=None) -> SplitPlan:
    """Plan a decode of a (B, C, d, h, w) latent split along D over `devices` (one part each, in order; under a
    process group, the ranks' devices); `vae=None` plans for MAISI's image autoencoder. Budget per device: None
    means, on CUDA, the free memory of the first device minus a margin; on CPU, whole bands in one slab."""
    vae = _vae_for_plan(vae)
    if memory_budget_bytes is None:
        memory_budget_bytes = _default_budget(torch.device(devices[0]))
    ops, slots = _compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)
    return _plan_split(ops, slots, tuple(latent_shape), vae.out_channels, list(devices), memory_budget_bytes, dtype)


class _BandStore:
    """An activation's rows owned by one part (`own`, rows [a, b): on the part's device, or in host memory) and the
    halo rows received for the next read; `read(lo, hi)` returns rows [lo, hi) in whole-volume row numbers on the
    part's device, as `_Run.slab` reads stores."""

    def __init__(self, own: torch.Tensor, a: int, device: torch.device, buf: torch.Tensor | None = None):
        self.own, self.a, self.device, self.buf, self.halo, self.stats = own, a, device, buf, [], None

    def read(self, lo: int, hi: int) -> torch.Tensor:
        pieces = sorted([(self.a, self.own)] + self.halo, key=lambda e: e[0])
        out, at = [], lo
        for s, t in pieces:
            e = s + t.shape[2]
            if s <= at < e:
                out.append(t[:, :, at - s : min(hi, e) - s])
                at = min(hi, e)
        if at != hi:
            raise RuntimeError(f"rows [{lo}, {hi}) not held by this part (missing halo)")
        # host rows: copied on the compute stream, after the writes that filled them (also on it)
        out = [t.to(self.device, non_blocking=True) for t in out]
        return out[0] if len(out) == 1 else torch.cat(out, 2)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Own rows [lo, hi) on the part's device (for a neighbour's halo)."""
        return self.own[:, :, lo - self.a : hi - self.a].to(self.device, non_blocking=True)

    def release(self) -> None:
        if self.buf is not None:  # back to the pool once this device's copies from and to it are done
            torch.cuda.current_stream(self.device).synchronize()
            _host_release(self.buf)
        self.own, self.halo, self.buf = None, [], None


def _host_band(shape, dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (B, C, r, H, W) band in host memory: page-locked and pooled (channels_last_3d) for a CUDA part."""
    if device.type != "cuda":
        return torch.empty(shape, dtype=dtype), None
    B, C, r, H, W = shape
    nbytes = B * C * r * H * W * torch.empty((), dtype=dtype).element_size()
    buf = _host_buffer(max(nbytes, 1))
    return buf[:nbytes].view(dtype).view(B, r, H, W, C).permute(0, 4, 1, 2, 3), buf


def _merge(stats: list) -> tuple:
    """Merge per-part (count, mean, M2) in part order (Chan et al.), skipping empty parts."""
    n, mean, m2 = 0.0, None, None
    for n_b, mean_b, m2_b in stats:
        if n_b == 0:
            continue
        if mean is None:
            n, mean, m2 = n_b, mean_b, m2_b
            continue
        tot = n + n_b
        delta = mean_b - mean
        n, mean, m2 = tot, mean + delta * (n_b / tot), m2 + m2_b + delta.square() * (n * n_b / tot)
    return n, mean, m2


class _Part:
    """One part's state: its program (on its device), its band stores and its slab sizes."""

    def __init__(self, index: int, parts: int, vae, z: torch.Tensor, plan: SplitPlan, device, dtype):
        self.index, self.parts, self.device, self.dtype = index, parts, torch.device(device), dtype
        self.ops, self.slots = _compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)
        _shapes(self.ops, self.slots, z.shape[2:])
        self.fmt = torch.channels_last_3d if self.device.type == "cuda" else torch.contiguous_format
        self.place = plan._place
        self.last = _lifetimes(self.ops, self.slots, self.place)
        self.run = _Run(self.ops, self.slots, SimpleNamespace(_place=self.place), self.device, dtype, self.fmt)
        x = z.to(device=self.device, dtype=dtype, memory_format=self.fmt)
        self.run.stores[0] = _BandStore(x, 0, self.device)  # every part holds the whole latent
        if self.slots[0].groups is not None:  # the input itself normalised (not in MAISI's nets)
            self.run.stores[0].stats = group_moments(x, self.slots[0].groups)
        self.rows = plan._rows[index]

    def band(self, s: int) -> tuple[int, int]:
        return _band(self.slots[s].spatial[0], self.index, self.parts)

    def compute(self, k: int) -> tuple | None:
        """Op k over this part's band, slab by slab; returns the local GroupNorm statistics of its output, if read."""
        ctx = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx, torch.no_grad():
            op, slot = self.ops[k], self.slots[self.ops[k].dst]
            a, b = self.band(op.dst)
            B = self.run.stores[0].own.shape[0]
            shape = (B, slot.channels, b - a, *slot.spatial[1:])
            where = self.place[op.dst]
            if where == HOST:
                out, buf = _host_band(shape, self.dtype, self.device)
            elif where == GPU:
                out, buf = torch.empty(shape, dtype=self.dtype, device=self.device, memory_format=self.fmt), None
            slabs = []
            self.run.memo.clear()
            if where != RECOMPUTE or slot.groups is not None:  # a recomputed activation: a statistics pass only
                for lo in range(a, b, self.rows[k]):
                    hi = min(lo + self.rows[k], b)
                    y = self.run.slab(k, lo, hi)
                    if where != RECOMPUTE:
                        out[:, :, lo - a : hi - a].copy_(y, non_blocking=True)  # to host: on the compute stream
                    if slot.groups is not None:
                        slabs.append(group_moments(y, slot.groups))
            self.run.memo.clear()
            stats = None if slot.groups is None else _merge(slabs)
            if where == RECOMPUTE:
                self.run.stores[op.dst] = _Recomputed(self.run, k)
            else:
                self.run.stores[op.dst] = _BandStore(out, a, self.device, buf)
            for st in self.run.stores:
                if isinstance(st, _BandStore):
                    st.halo = []
            return stats

    def release_after(self, k: int) -> None:
        for s in range(1, len(self.slots) - 1):  # a recomputed activation keeps its producer's inputs alive
            if self.run.stores[s] is not None and self.last[s] <= k:
                self.run.stores[s].release()
                self.run.stores[s] = None


def _reads(ops, slots, place, k: int, part: int, parts: int) -> dict[int, tuple[int, int]]:
    """Stored activations (slot -> rows [lo, hi)) that `part`'s band of op k reads, through recomputed activations
    (which read their producer's inputs) and fused residual shortcuts; the latent (slot 0) left out."""
    a, b = _band(slots[ops[k].dst].spatial[0], part, parts)
    found: dict[int, tuple[int, int]] = {}

    def walk(op, a: int, b: int) -> None:
        for s, (lo, hi) in ((op.src, _in_rows(op, a, b, slots[op.src].spatial[0])), (op.res, (a, b))):
            if s is None or s == 0:
                continue
            if place[s] == RECOMPUTE:
                walk(ops[s - 1], lo, hi)
            else:
                old = found.get(s, (lo, hi))
                found[s] = (min(old[0], lo), max(old[1], hi))

    if b > a:
        walk(ops[k], a, b)
    return found


def _halo_pieces(ops, slots, place, k: int, parts: int):
    """(slot, sender, receiver, lo, hi) for the rows that op k's band on each part reads from another part's band."""
    pieces = []
    for q in range(parts):
        for s, (lo_q, hi_q) in _reads(ops, slots, place, k, q, parts).items():
            for p in range(parts):
                a, b = _band(slots[s].spatial[0], p, parts)
                lo, hi = max(a, lo_q), min(b, hi_q)
                if p != q and hi > lo:
                    pieces.append((s, p, q, lo, hi))
    return pieces


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A (B, C, r, H, W) slab as one dense (B, r, H, W, C) or (B, C, r, H, W) block, for send/recv."""
    if t.is_cuda:
        return t.permute(0, 2, 3, 4, 1).contiguous()
    return t.contiguous()


def _unwire_empty(like_shape, dtype, device) -> torch.Tensor:
    B, C, r, H, W = like_shape
    if torch.device(device).type == "cuda":
        return torch.empty((B, r, H, W, C), dtype=dtype, device=device)
    return torch.empty((B, C, r, H, W), dtype=dtype, device=device)


def _from_wire(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 4, 1, 2, 3) if t.is_cuda else t


def _run_local(parts: list[_Part], progress: bool):
    """All parts in this process: halos by copies between devices, statistics merged on the first device. Nothing
    here waits for a GPU (kernel launches, copies between devices and the statistics stay asynchronous), so on CUDA
    the host queues one part's slabs after the other's and the devices compute at the same time."""
    ops, slots, P = parts[0].ops, parts[0].slots, len(parts)
    for k, op in enumerate(tqdm(ops, desc="decode (split)", unit="op", leave=False, disable=not progress)):
        for s, p, q, lo, hi in _halo_pieces(ops, slots, parts[0].place, k, P):
            rows = parts[p].run.stores[s].rows(lo, hi)
            parts[q].run.stores[s].halo.append((lo, rows.to(parts[q].device)))
        stats = [part.compute(k) for part in parts]
        if slots[op.dst].groups is not None:
            d0 = parts[0].device
            n, mean, m2 = _merge([(s[0], s[1].to(d0), s[2].to(d0)) if s[1] is not None else s for s in stats])
            for part in parts:
                part.run.stores[op.dst].stats = (n, mean.to(part.device), m2.to(part.device))
        for part in parts:
            part.release_after(k)


def _run_group(part: _Part, group, progress: bool):
    """This process's part of a process group: halos by send/recv, statistics by all_gather."""
    import torch.distributed as dist

    ops, slots, P, me = part.ops, part.slots, part.parts, part.index
    for k, op in enumerate(tqdm(ops, desc="decode (split)", unit="op", leave=False, disable=not progress or me)):
        p2p, recvs = [], []
        for s, p, q, lo, hi in _halo_pieces(ops, slots, part.place, k, P):
            if p == me:
                t = _wire(part.run.stores[s].rows(lo, hi))
                p2p.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, q) if group else q, group))
            elif q == me:
                shape = (part.run.stores[0].own.shape[0], slots[s].channels, hi - lo, *slots[s].spatial[1:])
                t = _unwire_empty(shape, part.dtype, part.device)
                p2p.append(dist.P2POp(dist.irecv, t, dist.get_global_rank(group, p) if group else p, group))
                recvs.append((s, lo, t))
        if p2p:
            for req in dist.batch_isend_irecv(p2p):
                req.wait()
        for s, lo, t in recvs:
            part.run.stores[s].halo.append((lo, _from_wire(t)))
        stats = part.compute(k)
        if slots[op.dst].groups is not None:
            B, G = part.run.stores[0].own.shape[0], slots[op.dst].groups
            mine = torch.zeros((3, B, G), dtype=torch.float64, device=part.device)
            if stats[1] is not None:
                mine[0], mine[1], mine[2] = stats[0], stats[1], stats[2]
            allp = [torch.empty_like(mine) for _ in range(P)]
            dist.all_gather(allp, mine, group=group)
            n, mean, m2 = _merge([(float(t[0, 0, 0]), t[1], t[2]) for t in allp])
            part.run.stores[op.dst].stats = (n, mean, m2)
        part.release_after(k)


def _device_copy(vae, device: torch.device):
    """The VAE on `device` (itself when it is already there)."""
    if next(vae.parameters()).device == device:
        return vae
    return copy.deepcopy(vae).to(device)


@torch.no_grad()
def decode_latent_split(vae, z: torch.Tensor, devices: Sequence[str | torch.device] | None = None, group=None,
                        memory_budget_bytes: int | None = None, out_device: str | torch.device | None = None,
                        return_plan: bool = False, progress: bool = False):
    """Exact `vae.decode(z)` split along D: over `devices` in this process (one band each, in order), or over the
    ranks of the process group `group` (each rank passes the same z and computes its band on the VAE's device; the
    default group when `group` is None and torch.distributed is initialised). `memory_budget_bytes` is per device.
    Returns the whole image (on `out_device`, default the first device / this rank's device) [, the plan]."""
    dtype = next(vae.parameters()).dtype
    if devices:
        devs = [torch.device(d) for d in devices]
        if len({d.type for d in devs}) > 1:
            raise ValueError(f"a split decode runs on devices of one kind, got {', '.join(map(str, devs))}")
        plan = plan_split(z.shape, devs, memory_budget_bytes, dtype, vae)
        parts = [_Part(i, len(devs), _device_copy(vae, d), z, plan, d, dtype) for i, d in enumerate(devs)]
        _run_local(parts, progress)
        target = torch.device(out_device) if out_device is not None else devs[0]
        y = torch.cat([part.run.stores[-1].own.to(target) for part in parts], 2)
    else:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("a split decode needs devices=[...] or an initialised torch.distributed process group")
        P, me = dist.get_world_size(group), dist.get_rank(group)
        dev = next(vae.parameters()).device
        plan = plan_split(z.shape, [dev] * P, memory_budget_bytes, dtype, vae)
        plan.devices = [f"rank {r}" + (f" ({dev})" if r == me else "") for r in range(P)]
        part = _Part(me, P, vae, z, plan, dev, dtype)
        _run_group(part, group, progress)
        own = part.run.stores[-1].own
        width = max(b - a for a, b in plan.bands)
        shape = (own.shape[0], own.shape[1], width, *own.shape[3:])
        buf = _unwire_empty(shape, dtype, dev)
        mine = _wire(own)
        if own.is_cuda:
            buf[:, : own.shape[2]].copy_(mine)
        else:
            buf[:, :, : own.shape[2]].copy_(mine)
        allp = [torch.empty_like(buf) for _ in range(P)]
        dist.all_gather(allp, buf, group=group)
        y = torch.cat([_from_wire(t)[:, :, : b - a] for t, (a, b) in zip(allp, plan.bands)], 2)
        if out_device is not None:
            y = y.to(out_device)
    return (y, plan) if return_plan else y
