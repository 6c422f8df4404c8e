"""Exact, memory-bounded VAE decode/encode, its planner, and MONAI's sliding-window decode for reference runs.

`decode_latent(vae, z)` returns the same tensor as `vae.decode(z)` on the whole volume (whole-volume GroupNorm
statistics, no seams), while the device memory it uses stays under a budget. `encode_image` does the same for
`vae.encode`. `decode_latent_sliding_window` instead reproduces the reference MAISI pipeline (MONAI
`SlidingWindowInferer`, per-window GroupNorm statistics, Gaussian blending), for bit-level comparisons with it.

How the exact path works (the design, and why):
- The network is compiled into a short program of ops, one per conv: `y = conv(act(GN(x))) [+ shortcut(res)]`,
  where the conv is a stride-1 conv, trilinear x2 + conv, a transposed conv, or a pad-end stride-2 conv. A ResBlock
  is two ops.
- Every op computes its output slab by slab along D, the first spatial axis. A slab reads only the input rows it
  needs (one halo row each side for k3 convs; one extra input row each side for trilinear x2, whose clamped end rows
  then come out exactly as align_corners=False gives them; 2r+1 rows for the pad-end stride-2 conv; r/2+1 rows for
  the transposed conv), zero-pads only at the true ends of the volume, and convolves with no padding along D, so
  every cut is exact and no output row is computed twice.
- GroupNorm needs statistics over the whole volume. While an op produces an activation that a GroupNorm reads, it
  accumulates per-(sample, group) count/mean/M2 of each slab (fp32 two-pass within the slab, merged across slabs
  in fp64 with Chan et al.'s parallel formula): the statistics pass is fused into the producer. The consumer then
  normalises each slab with `x * (w * rstd) + (b - mean * w * rstd)`, the expression PyTorch's own GroupNorm kernel
  uses, in fp32. On CUDA the statistics, the normalisation (+SiLU) and the trilinear x2 (only the rows a slab's conv
  reads) are one Triton pass each (`nets.blocks`); on CPU they are plain torch.
- Each activation lives in one preallocated tensor (outputs are written slab by slab into it: no list of tiles, no
  `torch.cat`), in one of three places chosen by the planner: on the device; in page-locked host memory (pageable
  memory registered with CUDA, kept in a pool for reuse); or nowhere: an activation made by an op without residual
  (a ResBlock's hidden state, an upsample's output) can instead be recomputed, slab by slab, whenever it is read,
  at the cost of one extra conv per read and no memory. On CUDA tensors are channels_last_3d, cuDNN's fast layout,
  in which a one-sample slab of D rows is one contiguous block, so host copies are plain memcpys on the compute
  stream (ordered, no syncs).
- The planner starts with everything on the device and, while some op cannot keep 8 rows per slab inside the
  budget, takes the largest activation off the device (recompute if allowed, else host); it also tries host-only
  and keeps the faster plan by its estimate. Low-resolution levels thus stay whole on the device. When tiling is
  needed and B > 1, samples run one at a time (GroupNorm is per sample, so this is exact).

The budget counts the device memory for activations and per-slab temporaries; the network's weights (already
resident) are not counted. On CPU, activations live in RAM either way and the budget bounds the per-slab working
set; with no budget the CPU path runs `vae.decode` / `vae.encode` themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from fastmaisi.nets.autoencoder import (
    AutoencoderKlMaisi,
    Downsample,
    GroupNorm,
    MaisiConv,
    ResBlock,
    Upsample,
)
from fastmaisi.nets.blocks import group_moments, scale_shift, upsample_trilinear_x2

_MiB = 1 << 20
_GiB = 1 << 30
# Rough sustained throughputs for the time estimate (FLOP/s of 3-D convs; host<->device bytes/s).
_FLOPS = {("cuda", 2): 300e12, ("cuda", 4): 40e12, ("cpu", 2): 2e10, ("cpu", 4): 5e10}  # fp16: 512^3 on an H200
_HOST_BW = 40e9  # page-locked host <-> H100 copies measured ~50 GB/s each way
_CUDA_WORKSPACE = 256 * _MiB  # allowance for cuDNN workspaces and allocator rounding per op
_MAX_SLAB_BYTES = 8 * _GiB  # larger slabs buy no speed; a tiled op keeps its per-slab temporaries under this
_MIN_ROWS = 8  # the planner moves activations to the host before it cuts slabs thinner than this


# ----------------------------------------------------------------------------------------------------------------
# 1. The network as a program of ops
# ----------------------------------------------------------------------------------------------------------------


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
    if op.kind == "conv":
        p = op.conv.padding[0]
        return max(a - p, 0), min(b + p, n_in)
    if op.kind == "down":
        return 2 * a, min(2 * b + 1, n_in)
    if op.kind == "upT":
        return a // 2, min(b // 2 + 1, n_in)
    c, d = max(a - 1, 0), min(b + 1, 2 * n_in)  # "up": interpolated rows the conv needs, then input rows
    return max((c - 1) // 2, 0), min((d + 2) // 2, n_in)


# ----------------------------------------------------------------------------------------------------------------
# 2. The planner
# ----------------------------------------------------------------------------------------------------------------

GPU, HOST, RECOMPUTE = "GPU", "host", "recompute"


@dataclass
class DecodePlan:
    """What an exact decode/encode will do: memory, tiling, placement and an expected time.

    `num_slabs` is the largest number of slabs any op uses (the full-resolution ops), `slab_rows` their rows per slab
    along D. `levels` lists, per resolution, where its activations live (GPU, host memory, or recomputed from their
    input when read instead of stored) and the most slabs any of its ops uses.
    """

    task: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    device: str
    dtype: torch.dtype
    memory_budget_bytes: int | None
    peak_bytes: int
    host_bytes: int
    num_slabs: int
    slab_rows: int
    batch_chunk: int
    output_device: str
    est_seconds: float
    tiled: bool
    levels: list[tuple[tuple[int, int, int], str, int]] = field(default_factory=list)
    _rows: list[int] = field(default_factory=list, repr=False)
    _place: list[str] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        gib = lambda n: f"{n / _GiB:.2f} GiB"  # noqa: E731
        budget = "no budget" if self.memory_budget_bytes is None else f"a budget of {gib(self.memory_budget_bytes)}"
        lv = "; ".join(f"{'x'.join(map(str, s))}: {where}, {n} slab{'s' if n > 1 else ''}" for s, where, n in self.levels)
        if not self.tiled:
            how = f"whole volume, one pass per layer ({lv})"
        else:
            how = (f"level by level with whole-volume GroupNorm statistics, {self.num_slabs} slabs of "
                   f"{self.slab_rows} rows along D at full resolution ({lv})")
        if self.batch_chunk < self.input_shape[0]:
            how += ", one sample at a time"
        host = (f" and {gib(self.host_bytes)} of page-locked host memory (about {self.host_bytes / _GiB * 0.5:.0f} s "
                "to set up on first use, then kept for reuse)" if self.host_bytes else "")
        return (
            f"{self.task.capitalize()} {tuple(self.input_shape)} -> {tuple(self.output_shape)} "
            f"({str(self.dtype).replace('torch.', '')}) on {self.device} with {budget}: {how}. "
            f"Estimated peak device memory {gib(self.peak_bytes)}{host}; output on {self.output_device}; "
            f"expected time about {self.est_seconds:.1f} s once warm."
        )

    __str__ = describe


def _max_in_rows(op: _Op, slots: list[_Slot], rows: int) -> int:
    """Most input rows any slab of `rows` output rows reads (the first slab and two interior starts, odd and even)."""
    n_in, n_out = slots[op.src].spatial[0], slots[op.dst].spatial[0]
    starts = {0, min(rows, n_out - 1), min(rows + 1, n_out - 1)}
    return max(hi - lo for lo, hi in (_in_rows(op, a, min(a + rows, n_out), n_in) for a in starts))


def _ws_bytes(op: _Op, slots: list[_Slot], rows: int, B: int, esz: int, src_dev: bool, res_dev: bool) -> int:
    """Per-slab device temporaries of `op` for `rows` output rows (an over-estimate: all temporaries summed)."""
    s, d = slots[op.src], slots[op.dst]
    hw_in, hw_out = s.spatial[1] * s.spatial[2], d.spatial[1] * d.spatial[2]
    x_el = B * s.channels * _max_in_rows(op, slots, rows) * hw_in
    y_el = B * d.channels * rows * hw_out
    total = 0 if src_dev else x_el * esz  # the slab read from the host or recomputed
    if op.norm is not None:
        total += x_el * (4 + esz)  # fp32 normalised slab (eager path) and its compute-dtype copy
    if op.kind == "up":
        total += 2 * (2 * x_el * 4) * esz  # interpolated rows (x2 in D, x4 in-plane) and their padded copy
    elif op.kind == "down":
        total += B * s.channels * (x_el // max(B * s.channels * hw_in, 1) + 1) * (s.spatial[1] + 1) * (
            s.spatial[2] + 1) * esz
    else:
        total += x_el * esz  # padded copy at the volume's ends
    total += y_el * (esz + (8 if d.groups is not None else 0))  # conv output (+ fp32 copies for the statistics)
    if op.res is not None:
        total += B * slots[op.res].channels * rows * hw_out * esz * (1 if res_dev else 2) + y_el * esz
    return int(total)


def _lifetimes(ops: list[_Op], slots: list[_Slot], place: list[str]) -> list[int]:
    """Last op that needs each slot; a recomputed slot keeps its producer's inputs alive as long as itself."""
    last = [s.last_use for s in slots]
    for k in reversed(range(len(ops))):
        if place[ops[k].dst] == RECOMPUTE:
            for s in (ops[k].src, ops[k].res):
                if s is not None:
                    last[s] = max(last[s], last[ops[k].dst])
    return last


def _live(ops: list[_Op], last: list[int], k: int) -> list[int]:
    """Slots allocated while op k runs (the caller's input, slot 0, excluded; the output stays allocated)."""
    n = len(last)
    return [s for s in range(1, n) if s <= ops[k].dst and (last[s] >= k or s == ops[k].dst or s == n - 1)]


def _readers(ops: list[_Op], s: int) -> list[int]:
    """Op indices that read slot s, once per read (an op reading s as input and residual appears twice)."""
    return [k for k, op in enumerate(ops) for t in (op.src, op.res) if t == s]


def _recomputable(ops: list[_Op], slots: list[_Slot], place: list[str], s: int) -> bool:
    """Whether slot s may be recomputed instead of stored: made by an op without residual (ResBlock hidden,
    up/downsample output, conv_in), not the output, and no recompute chains (its producer's inputs and its readers'
    outputs are not recomputed themselves), so each read costs one extra conv at most."""
    if not 0 < s < len(slots) - 1 or ops[s - 1].res is not None:
        return False
    producer_inputs = {ops[s - 1].src, ops[s - 1].res} - {None}
    reader_outputs = {ops[k].dst for k in _readers(ops, s)}
    return all(place[t] != RECOMPUTE for t in producer_inputs | reader_outputs)


class _Planner:
    """Chooses placement (GPU / host / recompute) and slab rows per op under a budget, and estimates cost."""

    def __init__(self, ops, slots, B, chunk, esz, device_type):
        self.ops, self.slots, self.B, self.chunk, self.esz, self.cuda = ops, slots, B, chunk, esz, device_type == "cuda"

    def size(self, s: int, full_batch: bool = False) -> int:
        b = self.B if full_batch or s == len(self.slots) - 1 else self.chunk
        return b * self.slots[s].channels * math.prod(self.slots[s].spatial) * self.esz

    def ws(self, k: int, rows: int, place: list[str]) -> int:
        """Temporaries of one slab of op k, plus those of recomputing its recomputed inputs."""
        op = self.ops[k]
        total = _ws_bytes(op, self.slots, rows, self.chunk, self.esz, place[op.src] == GPU,
                          op.res is None or place[op.res] == GPU)
        if place[op.src] == RECOMPUTE:
            total += self.ws(op.src - 1, _max_in_rows(op, self.slots, rows), place)
        if op.res is not None and place[op.res] == RECOMPUTE:
            total += self.ws(op.res - 1, rows, place)
        return total

    def tile(self, place: list[str], budget: int, cap: bool = True):
        """(rows per op, device peak, host peak) for a placement, or None if some op cannot fit one row."""
        workspace = _CUDA_WORKSPACE + budget // 20 if self.cuda else 0  # cuDNN workspaces, allocator rounding
        last = _lifetimes(self.ops, self.slots, place)
        rows, peak, host_peak = [], 0, 0
        for k, op in enumerate(self.ops):
            live = _live(self.ops, last, k)
            stores = sum(self.size(s) for s in live if place[s] == GPU) if self.cuda else 0
            host_peak = max(host_peak, sum(self.size(s) for s in live if place[s] == HOST))
            n_out = self.slots[op.dst].spatial[0]
            if place[op.dst] == RECOMPUTE and self.slots[op.dst].groups is None:
                rows.append(n_out)  # no pass of its own: computed only inside its readers' slabs
                continue

            def fits(r: int) -> bool:
                ws = self.ws(k, r, place)
                return stores + workspace + ws <= budget and (not cap or ws <= _MAX_SLAB_BYTES or r == 1)

            if not fits(1):
                return None
            lo, hi = 1, n_out  # the largest r that fits (the estimate grows with r)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
            rows.append(lo)
            peak = max(peak, stores + workspace + self.ws(k, lo, place))
        # readers' slabs bound the recomputed ops' peaks too (counted in their ws)
        return rows, peak, host_peak

    def cap_rows(self, k: int, place: list[str]) -> int:
        r, n = 1, self.slots[self.ops[k].dst].spatial[0]
        while r < n and self.ws(k, r + 1, place) <= _MAX_SLAB_BYTES:
            r += 1
        return r

    def runs(self, place: list[str]) -> list[int]:
        """How many times each op runs: once if stored; if recomputed, once per read (+1 for its statistics)."""
        runs = [1] * len(self.ops)
        for k in reversed(range(len(self.ops))):
            d = self.ops[k].dst
            if place[d] == RECOMPUTE:
                runs[k] = int(self.slots[d].groups is not None) + sum(runs[c] for c in _readers(self.ops, d))
        return runs

    def seconds(self, place: list[str], device: torch.device) -> float:
        runs = self.runs(place)
        flops = 0.0
        for k, op in enumerate(self.ops):
            vox = math.prod(self.slots[op.src if op.kind == "upT" else op.dst].spatial)
            flops += runs[k] * 2 * op.conv.in_channels * op.conv.out_channels * math.prod(op.conv.kernel_size) * vox
        t = flops * self.B / _FLOPS.get((device.type, min(self.esz, 4)), 1e10)
        if self.cuda:
            moved = sum(self.size(s) * (1 + sum(runs[c] for c in _readers(self.ops, s)))
                        for s in range(1, len(self.slots)) if place[s] == HOST)
            t += moved * (self.B // self.chunk) / _HOST_BW
        return t


def _make_plan(task, ops, slots, in_shape, out_channels, device, budget, dtype, out_device=None) -> DecodePlan:
    device = torch.device(device)
    esz = torch.empty((), dtype=dtype).element_size()
    B, n = in_shape[0], len(slots)
    _shapes(ops, slots, in_shape[2:])
    out_shape = (B, out_channels, *slots[-1].spatial)
    cuda = device.type == "cuda"
    out_host = out_device is not None and torch.device(out_device).type == "cpu" and cuda

    def finish(pl: _Planner, place, rows, peak, host_peak, tiled):
        by_level: dict[tuple, list] = {}
        for k, op in enumerate(ops):
            sp = slots[op.dst].spatial
            lv = by_level.setdefault(sp, [set(), 1])
            lv[0].add(place[op.dst] if cuda else "in RAM")
            if place[op.dst] != RECOMPUTE or slots[op.dst].groups is not None:
                lv[1] = max(lv[1], -(-sp[0] // rows[k]))
        levels = [(sp, "+".join(sorted(w)), ns) for sp, (w, ns) in by_level.items()]
        num_slabs, slab_rows = max((-(-slots[op.dst].spatial[0] // rows[k]), rows[k]) for k, op in enumerate(ops))
        where_out = str(out_device) if out_device is not None else (str(device) if place[n - 1] == GPU else "cpu")
        return DecodePlan(task, tuple(in_shape), out_shape, str(device), dtype, budget, int(peak), int(host_peak),
                          num_slabs, slab_rows, pl.chunk, where_out, pl.seconds(place, device), tiled, levels, rows,
                          place)

    # Everything on the device, one slab per op: the whole volume in one pass per layer.
    pl = _Planner(ops, slots, B, B, esz, device.type)
    place = [GPU] * n
    whole = pl.tile(place, budget if budget is not None else 1 << 62, cap=False)
    if whole is not None and all(r == slots[op.dst].spatial[0] for r, op in zip(whole[0], ops)) and not out_host:
        return finish(pl, place, *whole, tiled=False)
    if budget is None:  # CPU without a budget: never tile
        return finish(pl, place, [slots[op.dst].spatial[0] for op in ops], whole[1] if whole else 0, 0, tiled=False)

    # Tiled, one sample at a time. Start with every activation on the device; while some op cannot keep
    # `_MIN_ROWS` rows per slab, take the largest activation off the device: recompute it from its input when it is
    # read if it has no residual (cheap: one conv), else keep it in page-locked host memory.
    pl = _Planner(ops, slots, B, 1, esz, device.type)
    order = sorted(range(1, n), key=pl.size, reverse=True)

    def greedy(allow_recompute: bool):
        place = [GPU] * n
        if out_host:
            place[n - 1] = HOST
        found, found_score = None, -1.0
        while True:
            res = pl.tile(place, budget)
            if res is not None:
                target = [min(_MIN_ROWS, pl.cap_rows(k, place)) for k in range(len(ops))]
                score = min(r / t for r, t, op in zip(res[0], target, ops)
                            if place[op.dst] != RECOMPUTE or slots[op.dst].groups is not None)
                if score > found_score:
                    found, found_score = (list(place), res), score
                if score >= 1:
                    break
            movable = [s for s in order if place[s] == GPU] if cuda else []
            if not movable:
                break
            s = movable[0]
            place[s] = RECOMPUTE if allow_recompute and _recomputable(ops, slots, place, s) else HOST
        return found, found_score

    options = [o for o in (greedy(True), greedy(False)) if o[0] is not None]
    best = None
    if options:  # meet the slab target if possible, then the faster one
        best = min(options, key=lambda o: (o[1] < 1, -min(o[1], 1), pl.seconds(o[0][0], device)))[0]
    if best is None:
        need = max(pl.ws(k, 1, [HOST if cuda else GPU] * n) for k in range(len(ops)))
        need = -(-(need + _CUDA_WORKSPACE) * 20 // 19) if cuda else need
        raise ValueError(
            f"memory_budget_bytes={budget} is too small to hold even one slab: {task} of {tuple(in_shape)} needs at "
            f"least {need} bytes ({need / _MiB:.1f} MiB)"
        )
    place, (rows, peak, host_peak) = best
    return finish(pl, place, rows, peak, host_peak, tiled=True)


def _vae_for_plan(vae: AutoencoderKlMaisi | None) -> AutoencoderKlMaisi:
    if vae is not None:
        return vae
    from fastmaisi.variants import image_autoencoder_def

    kwargs = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
    with torch.device("meta"):
        return AutoencoderKlMaisi(**kwargs)


def _default_budget(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free - max(512 * _MiB, 0.05 * free))


def plan_decode(
    latent_shape: Sequence[int],
    device: str | torch.device = "cuda",
    memory_budget_bytes: int | None = None,
    dtype: torch.dtype = torch.float16,
    vae: AutoencoderKlMaisi | None = None,
    out_device: str | torch.device | None = None,
) -> DecodePlan:
    """Plan an exact decode of a (B, C, d, h, w) latent; `vae=None` plans for MAISI's image autoencoder.

    Args:
        memory_budget_bytes: device memory for activations and temporaries (weights not counted). None: on CUDA the
            free device memory minus a margin; on CPU no tiling.
        out_device: where the decoded volume must end up (default: the compute device if it fits, else host).
    """
    vae = _vae_for_plan(vae)
    device = torch.device(device)
    if memory_budget_bytes is None:
        memory_budget_bytes = _default_budget(device)
    ops, slots = _compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)
    return _make_plan("decode", ops, slots, tuple(latent_shape), vae.out_channels, device, memory_budget_bytes, dtype,
                      out_device)


def plan_encode(
    image_shape: Sequence[int],
    device: str | torch.device = "cuda",
    memory_budget_bytes: int | None = None,
    dtype: torch.dtype = torch.float16,
    vae: AutoencoderKlMaisi | None = None,
) -> DecodePlan:
    """Plan an exact encode of a (B, C, D, H, W) image (encoder features; the 1x1 quant convs run on the latent)."""
    vae = _vae_for_plan(vae)
    device = torch.device(device)
    if memory_budget_bytes is None:
        memory_budget_bytes = _default_budget(device)
    ops, slots = _compile(vae.encoder.blocks, vae.in_channels, None)
    return _make_plan("encode", ops, slots, tuple(image_shape), vae.latent_channels, device, memory_budget_bytes,
                      dtype)


# ----------------------------------------------------------------------------------------------------------------
# 3. The executor
# ----------------------------------------------------------------------------------------------------------------

_HOST_POOL: list[torch.Tensor] = []


def _host_buffer(nbytes: int) -> torch.Tensor:
    """A page-locked host byte buffer of at least `nbytes`: pageable memory registered with CUDA (faster to set up
    than cudaHostAlloc, with no power-of-two rounding), reused across calls (best fit); see `free_host_memory`."""
    fits = [i for i, b in enumerate(_HOST_POOL) if nbytes <= b.numel() <= 2 * nbytes]
    if fits:
        return _HOST_POOL.pop(min(fits, key=lambda i: _HOST_POOL[i].numel()))
    buf = torch.empty(nbytes, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)  # on failure the buffer stays pageable
    return buf


def _host_release(buf: torch.Tensor) -> None:
    _HOST_POOL.append(buf)


def free_host_memory() -> int:
    """Unregister and free the page-locked host buffers kept for reuse by earlier tiled runs; returns bytes freed."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    freed = 0
    for buf in _HOST_POOL:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        freed += buf.numel()
    _HOST_POOL.clear()
    return freed


class _Store:
    """One stored activation (B, C, D, H, W) on the device or in page-locked host memory, with GN statistics.

    On CUDA stores are channels_last_3d: cuDNN's fast 3-D conv layout, and for one sample a slab of D rows is one
    contiguous block, so host<->device slab copies are single memcpys. On CPU stores are NCDHW.
    """

    def __init__(self, t: torch.Tensor, device: torch.device, buf: torch.Tensor | None = None):
        self.t, self.device, self.buf, self.stats = t, device, buf, None
        self.on_device = t.device == device

    @classmethod
    def new(cls, shape, dtype, device, on_device: bool, fmt) -> "_Store":
        if on_device or device.type != "cuda":
            return cls(torch.empty(shape, dtype=dtype, device=device, memory_format=fmt), device)
        B, C, D, H, W = shape
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = _host_buffer(nbytes)
        return cls(buf[:nbytes].view(dtype).view(B, D, H, W, C).permute(0, 4, 1, 2, 3), device, buf)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        x = self.t[:, :, lo:hi]
        return x if self.on_device else x.to(self.device, non_blocking=True)

    def write(self, a: int, b: int, y: torch.Tensor) -> None:
        self.t[:, :, a:b].copy_(y, non_blocking=not self.on_device)

    def release(self) -> None:
        if self.buf is not None:
            _host_release(self.buf)
        self.t = self.buf = None

    def accumulate(self, y: torch.Tensor, groups: int) -> None:
        """Merge the (count, mean, M2) of slab y per (sample, group) into the running whole-volume statistics."""
        n_b, mean_b, m2_b = group_moments(y, groups)  # fp32 within the slab, fp64 out
        if self.stats is None:
            self.stats = (n_b, mean_b, m2_b)
            return
        n_a, mean_a, m2_a = self.stats
        n = n_a + n_b
        delta = mean_b - mean_a
        self.stats = (n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n))


class _Recomputed(_Store):
    """An activation that is not stored: reading rows recomputes them from the producer's (stored) inputs."""

    def __init__(self, run: "_Run", k: int):
        self.run, self.k, self.stats, self.buf = run, k, None, None

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.run.slab(self.k, lo, hi)

    def release(self) -> None:
        self.run = None


def _norm_affine(store: _Store, norm: torch.nn.GroupNorm, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) scale and shift so that GN(x) = x * scale + shift (PyTorch's kernel's own form)."""
    n, mean, m2 = store.stats
    rstd = torch.rsqrt(m2 / n + eps)  # biased variance, eps inside the root, in fp64
    rep = norm.num_channels // norm.num_groups
    rstd_c, mean_c = rstd.repeat_interleave(rep, dim=1), mean.repeat_interleave(rep, dim=1)
    scale = rstd_c * norm.weight.detach().double()
    shift = norm.bias.detach().double() - mean_c * scale
    return scale.float(), shift.float()  # (B, C)


class _Run:
    """Executes a program for one batch chunk: op by op, slab by slab, into preallocated stores."""

    def __init__(self, ops, slots, plan: DecodePlan, device, dtype, fmt):
        self.ops, self.slots, self.plan, self.device, self.dtype, self.fmt = ops, slots, plan, device, dtype, fmt
        self.stores: list = [None] * len(slots)
        self.last = _lifetimes(ops, slots, plan._place)
        self.params: dict[int, tuple] = {}

    def _params(self, k: int) -> tuple:
        """Weights in the compute dtype and the GroupNorm scale/shift of op k (once its input's stats exist)."""
        if k not in self.params:
            op, dt = self.ops[k], self.dtype
            w = op.conv.weight.detach().to(dt)
            b = op.conv.bias.detach().to(dt) if op.conv.bias is not None else None
            sc = (op.shortcut.weight.detach().to(dt), op.shortcut.bias.detach().to(dt)) if op.shortcut else None
            aff = _norm_affine(self.stores[op.src], op.norm, self.slots[op.src].eps) if op.norm is not None else None
            self.params[k] = (w, b, sc, aff)
        return self.params[k]

    def slab(self, k: int, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of op k's output, computed from the input rows they need (exact at every cut)."""
        op = self.ops[k]
        w, bias, sc, aff = self._params(k)
        n_in = self.slots[op.src].spatial[0]
        lo, hi = _in_rows(op, a, b, n_in)
        x = self.stores[op.src].read(lo, hi)
        if aff is not None:
            x = scale_shift(x, aff[0], aff[1], op.silu)  # fp32 math, one rounding
        if op.kind == "conv":
            p = op.conv.padding[0]
            front, back = p - (a - lo), p - (hi - b)
            if front == back == p:  # the whole axis: let the conv pad D too
                y = F.conv3d(x, w, bias, padding=op.conv.padding)
            else:
                if front or back:
                    x = F.pad(x, (0, 0, 0, 0, front, back))
                y = F.conv3d(x, w, bias, padding=(0, p, p))
        elif op.kind == "down":
            x = F.pad(x, (0, 1, 0, 1, 0, 2 * b + 1 - hi))  # the pad-end row exists only past the last input row
            y = F.conv3d(x, w, bias, stride=2)
        elif op.kind == "upT":
            y = F.conv_transpose3d(x, w, bias, stride=2, padding=1, output_padding=1)[:, :, a - 2 * lo : b - 2 * lo]
        else:  # "up": trilinear x2 of the slab; rows away from a cut are exact, the true ends clamp as usual
            c, d = max(a - 1, 0), min(b + 1, 2 * n_in)
            u = upsample_trilinear_x2(x, (c - 2 * lo, d - 2 * lo))  # only the interpolated rows the conv reads
            front, back = 1 - (a - c), 1 - (d - b)
            if front or back:
                u = F.pad(u, (0, 0, 0, 0, front, back))
            y = F.conv3d(u, w, bias, padding=(0, 1, 1))
        if op.res is not None:
            r = self.stores[op.res].read(a, b)
            if sc is not None:
                r = F.conv3d(r, sc[0], sc[1])
            y = y.add_(r) if y.is_contiguous(memory_format=self.fmt) else y + r
        return y

    def op(self, k: int, final: torch.Tensor | None) -> None:
        op, slot = self.ops[k], self.slots[self.ops[k].dst]
        where, rows, n_out = self.plan._place[op.dst], self.plan._rows[k], slot.spatial[0]
        if where == RECOMPUTE:
            out = _Recomputed(self, k)
        elif final is not None:
            out = _Store(final, self.device)
        else:
            out = _Store.new((self.B, slot.channels, *slot.spatial), self.dtype, self.device, where == GPU, self.fmt)
        self.stores[op.dst] = out
        if where != RECOMPUTE or slot.groups is not None:
            for a in range(0, n_out, rows):
                y = self.slab(k, a, min(a + rows, n_out))
                if slot.groups is not None:
                    out.accumulate(y, slot.groups)
                if where != RECOMPUTE:
                    out.write(a, min(a + rows, n_out), y)
        for s in {op.src, op.res} - {None}:
            if self.last[s] <= k and s != 0:
                self.stores[s].release()
                self.stores[s] = None


def _execute(ops, slots, plan: DecodePlan, x: torch.Tensor, device, dtype) -> torch.Tensor:
    """Run the program on x (B, C, *spatial), `plan.batch_chunk` samples at a time, into one preallocated output."""
    fmt = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    B, last = x.shape[0], len(slots) - 1
    out_shape = (B, slots[last].channels, *slots[last].spatial)
    on_dev = plan._place[last] == GPU
    final = torch.empty(out_shape, dtype=dtype, device=device if on_dev else "cpu", memory_format=fmt)
    for s0 in range(0, B, plan.batch_chunk):
        run = _Run(ops, slots, plan, device, dtype, fmt)
        xb = x[s0 : s0 + plan.batch_chunk].to(device=device, dtype=dtype, memory_format=fmt)
        run.B = xb.shape[0]
        run.stores[0] = _Store(xb, device)
        if slots[0].groups is not None:  # the input itself is normalised by the first op (not in MAISI's nets)
            run.stores[0].accumulate(xb, slots[0].groups)
        for k, op in enumerate(ops):
            run.op(k, final[s0 : s0 + plan.batch_chunk] if op.dst == last else None)
        for st in run.stores:
            if st is not None and st is not run.stores[0]:
                st.release()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return final


# ----------------------------------------------------------------------------------------------------------------
# 4. Public API
# ----------------------------------------------------------------------------------------------------------------


def _check(vae: AutoencoderKlMaisi, t: torch.Tensor, channels: int, what: str, budget) -> None:
    if not isinstance(vae, AutoencoderKlMaisi):
        raise TypeError(f"vae must be a fastmaisi AutoencoderKlMaisi, got {type(vae).__name__}")
    if t.ndim != 5:
        raise ValueError(f"{what} must be 5-D (B, C, D, H, W), got shape {tuple(t.shape)}")
    if t.shape[1] != channels:
        raise ValueError(f"{what} has {t.shape[1]} channels, expected {channels} (shape {tuple(t.shape)})")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf values")
    if budget is not None and budget <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {budget}")


def _compute(vae, x, budget, plan_fn, whole_fn, program_fn, out_device):
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    for attempt in range(2):
        plan = plan_fn(budget)
        try:
            with torch.no_grad():
                if not plan.tiled and device.type != "cuda":  # CPU, no budget: the network's own forward
                    y = whole_fn(x.to(device=device, dtype=dtype))
                else:
                    ops, slots = program_fn()
                    _shapes(ops, slots, x.shape[2:])
                    y = _execute(ops, slots, plan, x, device, dtype)
            if out_device is not None:
                y = y.to(out_device)
            return y, plan
        except RuntimeError as e:  # torch.OutOfMemoryError, or a failed page-locked host allocation
            if "out of memory" not in str(e).lower():
                raise
            torch.cuda.empty_cache()
            free_host_memory()
            if attempt == 1:
                raise RuntimeError(
                    f"CUDA ran out of memory during the {plan.task} even with half the budget "
                    f"({plan.memory_budget_bytes} bytes); pass a smaller memory_budget_bytes or free device memory. "
                    f"Plan: {plan.describe()}"
                ) from e
            budget = (plan.memory_budget_bytes or _default_budget(device) or 0) // 2


def decode_latent(
    vae: AutoencoderKlMaisi,
    z: torch.Tensor,
    memory_budget_bytes: int | None = None,
    out_device: str | torch.device | None = None,
    return_plan: bool = False,
):
    """Exact `vae.decode(z)` for any (B, latent, d, h, w) latent within a device-memory budget.

    Runs on the VAE's device in its parameter dtype. The result lives on the compute device when it fits, otherwise
    in host memory (channels_last_3d strides; `plan.output_device` says which), unless `out_device` is given.
    On CUDA out-of-memory it retries once with half the budget, then raises RuntimeError.
    Returns the image, or (image, plan) with `return_plan=True`.
    """
    _check(vae, z, vae.latent_channels, "latent z", memory_budget_bytes)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    program = lambda: _compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)  # noqa: E731
    y, plan = _compute(
        vae, z, memory_budget_bytes,
        lambda budget: plan_decode(z.shape, device, budget, dtype, vae, out_device),
        vae.decode, program, out_device,
    )
    return (y, plan) if return_plan else y


def encode_image(
    vae: AutoencoderKlMaisi,
    x: torch.Tensor,
    memory_budget_bytes: int | None = None,
    return_plan: bool = False,
):
    """Exact `vae.encode(x)` -> (z_mu, z_sigma) for a (B, C_in, D, H, W) image within a device-memory budget.

    Deterministic (returns the mean and sigma, like `encode`; sample with `vae.sampling(z_mu, z_sigma)`). The latents
    are returned on the VAE's device. Returns (z_mu, z_sigma), or ((z_mu, z_sigma), plan) with `return_plan=True`.
    """
    _check(vae, x, vae.in_channels, "image x", memory_budget_bytes)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    program = lambda: _compile(vae.encoder.blocks, vae.in_channels, None)  # noqa: E731
    h, plan = _compute(
        vae, x, memory_budget_bytes,
        lambda budget: plan_encode(x.shape, device, budget, dtype, vae),
        vae.encoder, program, None,
    )
    with torch.no_grad():
        z = vae.latent_from_features(h.to(device))
    return (z, plan) if return_plan else z


# ----------------------------------------------------------------------------------------------------------------
# 5. Reference-compatible sliding-window decode (MONAI SlidingWindowInferer semantics)
# ----------------------------------------------------------------------------------------------------------------


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's dense_patch_slices with its scan interval."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    n = 1
    while (n - 1) * interval + roi < size:
        n += 1
    return [min(i * interval, size - roi) for i in range(n)]


def importance_map(patch: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                   device=None) -> torch.Tensor:
    """MONAI's blending weights for a patch: ones, or a separable Gaussian (sigma = sigma_scale * size) clamped
    below at max(min, 1e-3)."""
    if mode == "constant":
        return torch.ones(tuple(patch), device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    scales = [sigma_scale] * len(patch) if isinstance(sigma_scale, (int, float)) else list(sigma_scale)
    m = None
    for i, (n, s) in enumerate(zip(patch, scales)):
        t = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float, device=device)
        g = torch.exp(t**2 / (-2 * (n * s) ** 2))
        m = g if m is None else m.unsqueeze(-1) * g[(None,) * i]
    return m.clamp_(min=max(m.min().item(), 1e-3))


def decode_latent_sliding_window(
    vae: AutoencoderKlMaisi,
    z: torch.Tensor,
    roi_size: int | Sequence[int],
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    cval: float = 0.0,
    out_device: str | torch.device | None = None,
) -> torch.Tensor:
    """The reference pipeline's decode: MONAI `SlidingWindowInferer(roi_size, sw_batch_size, overlap, mode,
    sigma_scale)` with `vae.decode` as predictor (GroupNorm statistics per window), blended on the VAE's device.

    Window positions, the importance map (computed at `roi_size` latent voxels, nearest-exact resized to the decoded
    window) and the weighted average follow MONAI; accumulation is in fp32 and the result has z's dtype.
    `roi_size` is in latent voxels (non-positive entries take the whole axis); latents smaller than the roi are
    zero-padded (`cval`) around, as MONAI does, and the padding is cropped from the output.
    """
    _check(vae, z, vae.latent_channels, "latent z", None)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    B, _, *size = z.shape
    roi = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
    if len(roi) != 3:
        raise ValueError(f"roi_size must have 3 entries, got {roi_size}")
    roi = [r if r and r > 0 else s for r, s in zip(roi, size)]
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size)]
    zp = z
    if any(p for pp in pad for p in pp):
        zp = F.pad(z, [p for pp in reversed(pad) for p in pp], value=cval)
    full = list(zp.shape[2:])
    starts = [_window_starts(n, r, overlap) for n, r in zip(full, roi)]
    windows = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    w_latent = importance_map(roi, mode, sigma_scale, device)[None, None]

    out = cnt = w_out = zoom = None
    jobs = [(b, win) for b in range(B) for win in windows]
    with torch.no_grad():
        for j0 in range(0, len(jobs), sw_batch_size):
            chunk = jobs[j0 : j0 + sw_batch_size]
            patch = torch.cat([
                zp[b : b + 1, :, s0 : s0 + roi[0], s1 : s1 + roi[1], s2 : s2 + roi[2]] for b, (s0, s1, s2) in chunk
            ]).to(device=device, dtype=dtype)
            y = vae.decode(patch).float()
            if out is None:
                zoom = [o / float(r) for o, r in zip(y.shape[2:], roi)]
                w_out = F.interpolate(w_latent, size=y.shape[2:], mode="nearest-exact")
                out = torch.zeros((B, y.shape[1], *[int(n * f) for n, f in zip(full, zoom)]), device=device)
                cnt = torch.zeros((1, 1, *out.shape[2:]), device=device)
                for win in windows:
                    cnt[(..., *_zoomed(win, roi, zoom))] += w_out[0, 0]
            for (b, win), yy in zip(chunk, y):
                out[(b, slice(None), *_zoomed(win, roi, zoom))] += yy * w_out[0]
        out /= cnt
        crop = [slice(int(round(p[0] * f)), int(round((p[0] + n) * f))) for p, n, f in zip(pad, size, zoom)]
        out = out[(slice(None), slice(None), *crop)].to(z.dtype)
    return out.to(out_device) if out_device is not None else out


def _zoomed(start: Sequence[int], roi: Sequence[int], zoom: Sequence[float]) -> tuple[slice, ...]:
    return tuple(slice(int(s * f), int((s + r) * f)) for s, r, f in zip(start, roi, zoom))
