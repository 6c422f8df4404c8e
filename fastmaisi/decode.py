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
  reads) are one Triton pass each (`nets.blocks`), and convs run without their bias, which goes in afterwards with
  one Triton pass (together with the residual when there is one; cuDNN adds a bias with a broadcast kernel at about
  a quarter of the memory bandwidth); on CPU they are plain torch.
- Each activation lives in one preallocated tensor (outputs are written slab by slab into it: no list of tiles, no
  `torch.cat`), placed by the planner: on the device; in page-locked host memory (pageable memory faulted in on all
  threads, then registered with CUDA, kept in a pool for reuse), with its first rows on the device when the budget
  has room; or nowhere: recomputed, slab by slab, from its producer's inputs whenever it is read. Recomputations
  chain (an activation recomputed from another recomputed one) and are memoised through the pass, so an activation
  read as input and as residual is computed once, and the next slab computes only the rows past the previous one's
  (the convs' halo rows are kept, not recomputed). A residual's 1x1 shortcut applied to a recomputed, linear
  producer (MAISI's upsample output) is folded into that producer's conv: one conv with fewer output channels
  instead of two. On CUDA tensors are channels_last_3d, cuDNN's fast layout, in which a one-sample slab of D rows is
  one contiguous block; host copies run on two side streams (`_Copier`): the next slab's host rows are fetched
  while the current one computes (only the rows past the current slab's: its halo rows are copied on the device, so
  each host row crosses PCIe once per pass), written rows go back while the next computes, and the host stays at
  most two slabs ahead of the device.
- The planner prices a placement with rates measured on an H200 (`bench/bench_primitives.py`: conv FLOP/s by
  channel count and slab size, ~48 GB/s each way for page-locked copies, elementwise bandwidth), each pass costing
  the slower of its convs and its copies, plus a fixed cost per op and slab. It starts from a few simple placements
  (everything on the device; the largest activations moved off one by one, recomputed or to the host) and, from
  each of the three best, changes one activation, or the cap on slab size (2-16 M voxels), at a time while the
  estimate falls; host slots then get
  device rows from the budget left over, and each pass's slabs widen into what is still free at its op. Plans whose
  host stores would page-lock more than the host can spare (4/5 of its available memory) are left out. Low-
  resolution levels thus stay whole on the device. When tiling is needed and B > 1, samples run one at a time
  (GroupNorm is per sample, so this is exact). Plans are remembered per network, shape and budget (the search takes
  0.3-0.9 s at 512^3). On CUDA it fills 95 % of the budget (`bench/trace_decode.py` compares each op's measured peak
  and time with its estimate; cuDNN took no workspace for these convs on an H200).

The budget counts the device memory for activations and per-slab temporaries; the network's weights (already
resident) are not counted. On CPU, activations live in RAM either way and the budget bounds the per-slab working
set; with no budget the CPU path runs `vae.decode` / `vae.encode` themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastmaisi.nets.autoencoder import (
    AutoencoderKlMaisi,
    Downsample,
    GroupNorm,
    MaisiConv,
    ResBlock,
    Upsample,
)
from fastmaisi.nets.blocks import add_bias_, add_bias_residual_, group_moments, scale_shift, upsample_trilinear_x2

_MiB = 1 << 20
_GiB = 1 << 30
# Rough sustained throughputs for the time estimate (FLOP/s of 3-D convs; host<->device bytes/s).
_CUDA_WORKSPACE = 256 * _MiB  # allowance for cuDNN workspaces and allocator rounding per op


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


# ----------------------------------------------------------------------------------------------------------------
# 2. The planner
# ----------------------------------------------------------------------------------------------------------------

GPU, HOST, RECOMPUTE = "GPU", "host", "recompute"


@dataclass
class DecodePlan:
    """What an exact decode/encode will do: memory, tiling, placement and an expected time.

    `num_slabs` is the largest number of slabs any op uses (the full-resolution ops), `slab_rows` their rows per slab
    along D. `levels` lists, per resolution, where its activations live (GPU; host memory, whose first rows may stay
    on the device; or recomputed from their inputs when read instead of stored) and the most slabs any of its ops
    uses.
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
    _gpu_rows: list[int] = field(default_factory=list, repr=False)  # per slot: rows [0, g) of a host slot on device
    _peaks: list[int] = field(default_factory=list, repr=False)  # per op: estimated device peak, host slots' rows aside
    _host_total: int = 0  # every host slot's host rows (`_Planner.host_bytes`): the most the run may page-lock
    _host_limit: int | None = None  # the host memory the plan was made to fit (`_host_available`), if that limit
    # turned candidates away (else None: more host memory would give the same plan)
    _host_bound: bool = False  # the search rejected some candidate for needing more than the host limit
    setup_seconds: float = 0.0  # part of est_seconds: page-locking host memory not yet set up by earlier runs

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
        host = (f" and {gib(self.host_bytes)} of page-locked host memory (kept for reuse by later runs)"
                if self.host_bytes else "")
        setup = f", of which {self.setup_seconds:.1f} s to set up host memory" if self.setup_seconds >= 0.05 else ""
        return (
            f"{self.task.capitalize()} {tuple(self.input_shape)} -> {tuple(self.output_shape)} "
            f"({str(self.dtype).replace('torch.', '')}) on {self.device} with {budget}: {how}. "
            f"Estimated peak device memory {gib(self.peak_bytes)}{host}; output on {self.output_device}; "
            f"expected time about {format_seconds(self.est_seconds)}{setup}."
        )

    __str__ = describe


def format_seconds(s: float) -> str:
    """Seconds as a person reads them: 2.4 s, 12 min, 2.5 h."""
    if s >= 5400:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.0f} min" if s >= 120 else f"{s:.1f} s"


def _new_rows(op: _Op, rows: int) -> int:
    """Input rows a slab of `rows` output rows adds to those the previous slab read (its overlap is kept)."""
    return max(1, round(rows / op.scale))


def _max_in_rows(op: _Op, slots: list[_Slot], rows: int) -> int:
    """Most input rows any slab of `rows` output rows reads (the first slab and two interior starts, odd and even)."""
    return _max_in_rows_of(op.kind, op.conv.padding[0], slots[op.src].spatial[0], slots[op.dst].spatial[0], rows)


@functools.lru_cache(maxsize=1 << 16)  # the planner's search asks for the same few thousand
def _max_in_rows_of(kind: str, p: int, n_in: int, n_out: int, rows: int) -> int:
    starts = {0, min(rows, n_out - 1), min(rows + 1, n_out - 1)}
    return max(hi - lo for lo, hi in (_in_rows_of(kind, p, a, min(a + rows, n_out), n_in) for a in starts))


def _plane(slot: _Slot) -> int:
    return slot.spatial[1] * slot.spatial[2]


def _fusable(ops: list[_Op], op: _Op) -> bool:
    """Whether op's residual shortcut can be folded into the residual's producer (one conv instead of two): the
    producer is linear after its prologue (no residual of its own) and the shortcut is a 1x1 conv."""
    return op.res is not None and op.shortcut is not None and op.res > 0 and ops[op.res - 1].res is None


def _fused(ops: list[_Op], op: _Op, dtype: torch.dtype | None) -> _Op:
    """The residual's producer with op's shortcut folded into its conv (`_FusedConv`; dtype None: planning only)."""
    p = ops[op.res - 1]
    return _Op(p.kind, p.src, p.dst, _FusedConv(p.conv, op.shortcut, dtype), p.norm, p.silu)


def _ws_bytes(op: _Op, slots: list[_Slot], rows: int, B: int, esz: int, src_dev: bool, res_dev: bool, cuda: bool,
              dst_host: bool = False) -> int:
    """Per-slab device temporaries of `op` for `rows` output rows (all temporaries summed: an upper bound)."""
    s, d = slots[op.src], slots[op.dst]
    x_el = B * s.channels * _max_in_rows(op, slots, rows) * _plane(s)
    y_el = B * d.channels * rows * _plane(d)
    # the slab read (CUDA: + the next one in flight, + the joined copy of a read across a split host store)
    total = 0 if src_dev else x_el * esz * (3 if cuda else 1)
    if cuda and op.kind != "upT":
        total += x_el * esz  # cuDNN workspace (measured up to about one input slab for k3 convs on large slabs)
    if op.norm is not None:
        total += x_el * (esz if cuda else 4 + esz)  # normalised slab (CUDA: one kernel; CPU: fp32 then a copy)
    if op.kind == "up":
        total += 2 * B * s.channels * (rows + 2) * _plane(d) * esz  # interpolated rows and their padded copy
    elif op.kind == "down":
        total += B * s.channels * (x_el // max(B * s.channels * _plane(s), 1) + 1) * (s.spatial[1] + 1) * (
            s.spatial[2] + 1) * esz
    else:
        total += x_el * esz  # padded copy at the volume's ends
    total += y_el * (esz + (0 if cuda or d.groups is None else 8))  # conv output (+ CPU fp32 copies for statistics)
    if cuda and s.channels == 1:
        total += y_el * esz  # a 1-channel input reads as NCDHW: cuDNN's output comes in NCDHW, then a layout copy
    if op.res is not None:
        total += B * slots[op.res].channels * rows * _plane(d) * esz * (0 if res_dev else 1) + y_el * esz
    if dst_host and cuda:
        total += 2 * y_el * esz  # earlier slabs, still being copied to the host (`_RUN_AHEAD`)
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


# Sustained rates on an H200 (bench/bench_primitives.py, fp16 channels_last_3d): cuDNN 3-D convs by their smaller
# channel count (FLOP/s), page-locked host<->device copies (bytes/s each way, both ways at once), elementwise passes.
_CONV_RATE = ((128, 690e12), (32, 550e12), (8, 200e12), (0, 7e12))  # at 16M output voxels per conv; thinner slabs
# run slower (64->64 at 512^2: 348 / 438 / 465 / 552 TFLOP/s at 8 / 16 / 32 / 64 rows): `_conv_seconds`
_CPU_RATE = {2: 2e10, 4: 5e10}
_HOST_BW = 48e9
_ELEMENTWISE_BW = 2.5e12
_SLAB_VOXELS = 16 << 20  # output voxels per slab beyond which bigger slabs buy no conv speed
_SLAB_CAPS = (2 << 20, 4 << 20, 8 << 20, _SLAB_VOXELS)  # slab sizes the CUDA planner tries
_PAD_OUT = 8  # CUDA: convs with fewer output channels run with zero-padded weights (cuDNN is slow at 1 channel)
_OP_OVERHEAD = 0.25e-3  # seconds per op and slab beyond the kernels' own time (launches, Python): thin slabs pay it
_PLAN_FRACTION = 0.95  # of a CUDA budget that the planner fills (see `_make_plan`)
_PIN_SECONDS_PER_BYTE = 0.06 / _GiB  # page-locking new host memory (first use; then pooled): 8 GiB in 0.47 s


def _conv_seconds(conv, vox: int, cuda: bool, esz: int) -> float:
    cin, cout = conv.in_channels, conv.out_channels
    if cuda and esz <= 2:
        cout_run = max(cout, _PAD_OUT)
        rate = next(r for c, r in _CONV_RATE if min(cin, cout_run) >= c) * min(1.0, 0.55 + 0.45 * vox / _SLAB_VOXELS)
        return 2 * cin * cout_run * math.prod(conv.kernel_size) * vox / rate
    return 2 * cin * cout * math.prod(conv.kernel_size) * vox / (40e12 if cuda else _CPU_RATE[min(esz, 4)])


class _Planner:
    """Chooses placement (GPU / host / recompute), rows per slab and device rows of host slots under a budget."""

    def __init__(self, ops, slots, B, chunk, esz, device_type):
        self.ops, self.slots, self.B, self.chunk, self.esz, self.cuda = ops, slots, B, chunk, esz, device_type == "cuda"
        self._ws: dict[tuple, int] = {}
        self._max_rows: dict[int, int] = {}
        self.host_bound = False  # `evaluate` turned a candidate away for the host limit

    def size(self, s: int, full_batch: bool = False) -> int:
        b = self.B if full_batch or s == len(self.slots) - 1 else self.chunk
        return b * self.slots[s].channels * math.prod(self.slots[s].spatial) * self.esz

    def row_bytes(self, s: int) -> int:
        return self.size(s) // max(self.slots[s].spatial[0], 1)

    def ws(self, k: int, rows: int, place: list[str]) -> int:
        """Device temporaries of one slab of op k: the recomputed activations it reads stay held (memoised, with their
        overlap kept for the next slab), and the largest working set of any one of the ops involved on top."""
        key = (k, rows, tuple(place))
        if key not in self._ws:  # the search asks for the same (op, rows, placement) many times
            self._ws[key] = sum(self._chain(k, rows, place))
        return self._ws[key]

    def _chain(self, k: int, rows: int, place: list[str]) -> tuple[int, int]:
        op = self.ops[k]
        work = _ws_bytes(op, self.slots, rows, self.chunk, self.esz, place[op.src] != HOST,
                         op.res is None or place[op.res] != HOST, self.cuda, place[op.dst] == HOST)
        held = 0
        reads = [(op.src, _max_in_rows(op, self.slots, rows))]
        if op.res is not None and op.res != op.src:
            reads.append((op.res, rows))
        for s, r in reads:
            if place[s] == RECOMPUTE:
                h, w = self._chain(s - 1, r, place)
                held += h + r * self.row_bytes(s)  # its memoised rows (the input slab of op k)
                work = max(work, w)
        return held, work

    def passes(self, place: list[str]) -> list[int]:
        """Ops that make a pass over the volume: those whose output is stored, and the statistics passes of
        recomputed activations that a GroupNorm reads."""
        return [k for k, op in enumerate(self.ops) if place[op.dst] != RECOMPUTE or self.slots[op.dst].groups]

    def tile(self, place: list[str], budget: int, cap: int | None = _SLAB_VOXELS):
        """(rows per op, device peak per op, host peak) for a placement, or None if some op cannot fit one row.
        Slabs stop growing at `cap` output voxels (the rest of the budget can hold host rows)."""
        workspace = _CUDA_WORKSPACE + budget // 32 if self.cuda else 0  # cuDNN workspaces, allocator rounding
        last = _lifetimes(self.ops, self.slots, place)
        passes = set(self.passes(place))
        rows, peaks, host_peak = [], [], 0
        for k, op in enumerate(self.ops):
            live = _live(self.ops, last, k)
            stores = sum(self.size(s) for s in live if place[s] == GPU) if self.cuda else 0
            host_peak = max(host_peak, sum(self.size(s) for s in live if place[s] == HOST))
            n_out = self.slots[op.dst].spatial[0]
            if k not in passes:
                rows.append(n_out)  # no pass of its own: computed only inside its readers' slabs
                peaks.append(stores + workspace)
                continue
            if stores + workspace + self.ws(k, 1, place) > budget:
                return None
            r = self._widest(k, 1, self.top_rows(k, cap), stores + workspace, budget, place)
            rows.append(r)
            peaks.append(stores + workspace + self.ws(k, r, place))
        return rows, peaks, host_peak

    def _slab_cost(self, k: int, r: int, place, gpu, acc: dict, seen: set, op: _Op | None = None) -> None:
        """Add one slab of r output rows of op k (and what it recomputes) to acc: conv seconds, host bytes read per
        slot, elementwise bytes. `seen`: activations already recomputed in this slab (memoised by the executor)."""
        op = op or self.ops[k]
        s, d = self.slots[op.src], self.slots[op.dst]
        vox = r * _plane(d) * self.chunk if op.kind != "upT" else -(-r // 2) * _plane(s) * self.chunk
        acc["conv"] += _conv_seconds(op.conv, vox, self.cuda, self.esz) + _OP_OVERHEAD * self.cuda
        rin = _max_in_rows(op, self.slots, r)
        acc["ew"] += self.chunk * s.channels * rin * _plane(s) * self.esz * (2 if op.norm is not None else 0)
        if op.kind == "up":
            acc["ew"] += 2 * self.chunk * s.channels * (r + 2) * _plane(d) * self.esz
        if d.groups is not None:
            acc["ew"] += self.chunk * d.channels * r * _plane(d) * self.esz
        self._read_cost(op.src, rin, place, gpu, acc, seen, _new_rows(op, r))
        if op.res is not None:
            if place[op.res] == RECOMPUTE and op.res not in seen and _fusable(self.ops, op):
                self._slab_cost(op.res - 1, r, place, gpu, acc, seen, _fused(self.ops, op, None))
            else:
                self._read_cost(op.res, r, place, gpu, acc, seen)
                if op.shortcut is not None:
                    acc["conv"] += _conv_seconds(op.shortcut, r * _plane(d) * self.chunk, self.cuda, self.esz)
        if place[op.dst] == HOST:
            n = d.spatial[0]
            acc["d2h"] += r * self.row_bytes(op.dst) * (n - gpu[op.dst]) / n

    def _read_cost(self, s: int, rows: int, place, gpu, acc: dict, seen: set, new_rows: int | None = None) -> None:
        """Cost of reading `rows` rows of slot s in one slab, of which only `new_rows` are new (the rest, the halo, were
        read by the previous slab): a recomputed slot computes only those, a host slot fetches only those
        (`_Copier.fetch` copies the halo on the device)."""
        if place[s] == HOST:
            n = self.slots[s].spatial[0]
            new = rows if new_rows is None else new_rows
            # one fetch per slot and slab covers every read of it (input, residual, inside recomputations)
            acc["h2d"][s] = max(acc["h2d"].get(s, 0), new * self.row_bytes(s) * (n - gpu[s]) / n)
        elif place[s] == RECOMPUTE and s not in seen:
            seen.add(s)
            self._slab_cost(s - 1, rows if new_rows is None else new_rows, place, gpu, acc, seen)

    def costs(self, place: list[str], rows: list[int], gpu: list[int]) -> tuple[float, dict]:
        """(expected seconds, host bytes read per slot over the whole run). Per pass: the slower of the convs and
        each copy direction (copies overlap compute), plus the elementwise passes."""
        total, reads = 0.0, {}
        for k in self.passes(place):
            secs, acc, n_slabs = self.pass_cost(k, place, rows, gpu)
            total += secs
            for s, b in acc["h2d"].items():
                reads[s] = reads.get(s, 0) + n_slabs * b
        return total * (self.B // self.chunk), reads

    def pass_cost(self, k: int, place: list[str], rows: list[int], gpu: list[int]) -> tuple[float, dict, int]:
        """(expected seconds, one slab's costs as `_slab_cost` adds them, number of slabs) of op k's pass."""
        acc = {"conv": 0.0, "ew": 0.0, "d2h": 0.0, "h2d": {}}
        n_slabs = -(-self.slots[self.ops[k].dst].spatial[0] // rows[k])
        self._slab_cost(k, rows[k], place, gpu, acc, set())
        bw = _HOST_BW if self.cuda else float("inf")
        secs = max(acc["conv"], sum(acc["h2d"].values()) / bw, acc["d2h"] / bw) + acc["ew"] / _ELEMENTWISE_BW
        return n_slabs * secs, acc, n_slabs

    def host_bytes(self, place: list[str], gpu: list[int]) -> int:
        """Page-locked host memory a run may take: every host slot's rows beyond its device rows (each store takes
        its buffer once; the pool's reuse can only lower this)."""
        return sum(self.size(s) * (self.slots[s].spatial[0] - gpu[s]) // max(self.slots[s].spatial[0], 1)
                   for s in range(1, len(self.slots)) if place[s] == HOST)

    def _widest(self, k: int, lo: int, hi: int, base: int, budget: int, place: list[str]) -> int:
        """The most rows in [lo, hi] whose slab of op k fits `budget` on top of `base` (lo fits; the estimate grows
        with the rows)."""
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if base + self.ws(k, mid, place) <= budget else (lo, mid - 1)
        return lo

    def top_rows(self, k: int, cap: int | None) -> int:
        """Rows per slab of op k beyond which nothing is gained or allowed: `cap` output voxels (None: no cap), the
        whole axis, `max_rows`."""
        n_out = self.slots[self.ops[k].dst].spatial[0]
        top = min(n_out, -(-cap // max(_plane(self.slots[self.ops[k].dst]), 1))) if cap else n_out
        return min(top, self.max_rows(k))

    def max_rows(self, k: int) -> int:
        """Most output rows per slab that keep op k's input and output slabs under 2^31 elements (cuDNN's fast 3-D
        kernels index with 32 bits: past that PyTorch falls back to a 10x slower path)."""
        if k not in self._max_rows:
            op, s, d = self.ops[k], self.slots[self.ops[k].src], self.slots[self.ops[k].dst]
            lim = (1 << 31) - 1
            r = max(1, lim // max(self.chunk * max(d.channels, _PAD_OUT) * _plane(d), 1))
            while r > 1 and self.chunk * s.channels * _max_in_rows(op, self.slots, r) * _plane(s) > lim:
                r -= 1
            self._max_rows[k] = r
        return self._max_rows[k]

    def grow(self, place: list[str], rows: list[int], peaks: list[int], gpu: list[int], budget: int) -> None:
        """Widen each pass's slabs into the budget still free at its op once host slots hold their device rows, up to
        `_SLAB_VOXELS` (in place: rows and peaks). Passes with no host slot live thus get the larger, faster slabs."""
        last = _lifetimes(self.ops, self.slots, place)
        for k in self.passes(place):
            n_out = self.slots[self.ops[k].dst].spatial[0]
            if rows[k] >= n_out:
                continue
            base = peaks[k] - self.ws(k, rows[k], place) + sum(
                gpu[s] * self.row_bytes(s) for s in _live(self.ops, last, k) if place[s] == HOST)
            r = self._widest(k, rows[k], max(rows[k], self.top_rows(k, _SLAB_VOXELS)), base, budget, place)
            peaks[k] += self.ws(k, r, place) - self.ws(k, rows[k], place)
            rows[k] = r

    def evaluate(self, place: list[str], cap: int | None, budget: int, host_limit: int | None = None):
        """One candidate of `_make_plan`'s search: `place` with slabs capped at `cap` output voxels, filling `budget`
        -> ((short, seconds), place, rows, peaks, host peak, device rows of host slots, cap), ranked by the first
        item (`short`: some pass can only run one-row slabs); None if it does not fit the device, or would page-lock
        more than `host_limit`."""
        res = self.tile(place, budget, cap)
        if res is None:
            return None
        rows, peaks, host_peak = res
        short = any(rows[k] < min(2, self.slots[self.ops[k].dst].spatial[0]) for k in self.passes(place))
        gpu = self.fill(place, rows, peaks, budget)
        if host_limit is not None and self.host_bytes(place, gpu) > host_limit:
            self.host_bound = True
            return None
        self.grow(place, rows, peaks, gpu, budget)
        secs = self.costs(place, rows, gpu)[0]
        return (short, secs), list(place), rows, peaks, host_peak, gpu, cap

    def fill(self, place: list[str], rows: list[int], peaks: list[int], budget: int) -> list[int]:
        """Device rows for host slots: the budget left over at every op of a slot's lifetime holds its first rows,
        the slots read most from the host first."""
        n = len(self.slots)
        gpu = [self.slots[s].spatial[0] if place[s] == GPU else 0 for s in range(n)]
        if not self.cuda:
            return gpu
        _, reads = self.costs(place, rows, gpu)
        last = _lifetimes(self.ops, self.slots, place)
        slack = [budget - p for p in peaks]
        for s in sorted((s for s in range(1, n - 1) if place[s] == HOST), key=lambda s: -reads.get(s, 0)):
            span = range(s - 1, max(last[s], s - 1) + 1)
            free = min(slack[k] for k in span)
            g = min(self.slots[s].spatial[0], max(free, 0) // max(self.row_bytes(s), 1))
            gpu[s] = g
            for k in span:
                slack[k] -= g * self.row_bytes(s)
        return gpu


class _FusedConv:
    """shortcut(conv(x)) as one conv: the 1x1 shortcut's weights folded into the producer's (both linear)."""

    def __init__(self, conv, shortcut, dtype):
        self.kernel_size, self.padding, self.stride = conv.kernel_size, conv.padding, conv.stride
        self.in_channels, self.out_channels = conv.in_channels, shortcut.out_channels
        if dtype is None:  # planning only
            self.weight = self.bias = None
            return
        s = shortcut.weight.detach().double().flatten(1)  # (out, mid)
        w, b = conv.weight.detach().double(), conv.bias
        eq = "om,imdhw->iodhw" if isinstance(conv, torch.nn.ConvTranspose3d) else "om,midhw->oidhw"
        self.weight = torch.einsum(eq, s, w).to(dtype)
        bias = shortcut.bias.detach().double() if shortcut.bias is not None else torch.zeros(s.shape[0], dtype=s.dtype)
        if b is not None:
            bias = bias + s @ b.detach().double()
        self.bias = bias.to(dtype)


def _make_plan(task, ops, slots, in_shape, out_channels, device, budget, dtype, out_device=None,
               host_limit: int | None = None) -> DecodePlan:
    device = torch.device(device)
    esz = torch.empty((), dtype=dtype).element_size()
    B, n = in_shape[0], len(slots)
    _shapes(ops, slots, in_shape[2:])
    out_shape = (B, out_channels, *slots[-1].spatial)
    cuda = device.type == "cuda"
    out_host = out_device is not None and torch.device(out_device).type == "cpu" and cuda

    def finish(pl: _Planner, place, rows, peak, host_peak, tiled, gpu=None, secs=None, peaks=()):
        gpu = gpu or [slots[s].spatial[0] if place[s] == GPU else 0 for s in range(n)]
        by_level: dict[tuple, list] = {}
        for k, op in enumerate(ops):
            sp = slots[op.dst].spatial
            lv = by_level.setdefault(sp, [set(), 1])
            where = place[op.dst] if cuda else "in RAM"
            if where == HOST and gpu[op.dst]:
                where = f"host ({gpu[op.dst]}/{sp[0]} rows on {device.type})"
            lv[0].add(where)
            if place[op.dst] != RECOMPUTE or slots[op.dst].groups is not None:
                lv[1] = max(lv[1], -(-sp[0] // rows[k]))
        levels = [(sp, "+".join(sorted(w)), ns) for sp, (w, ns) in by_level.items()]
        num_slabs, slab_rows = max((-(-slots[op.dst].spatial[0] // rows[k]), rows[k]) for k, op in enumerate(ops))
        where_out = str(out_device) if out_device is not None else (str(device) if place[n - 1] == GPU else "cpu")
        host_total = pl.host_bytes(place, gpu)
        return DecodePlan(task, tuple(in_shape), out_shape, str(device), dtype, budget, int(peak),
                          int(min(host_peak, host_total)) if cuda else 0, num_slabs, slab_rows, pl.chunk, where_out,
                          pl.costs(place, rows, gpu)[0] if secs is None else secs, tiled, levels, rows, place, gpu,
                          list(peaks), host_total if cuda else 0, _host_bound=pl.host_bound)

    # Everything on the device, one slab per op: the whole volume in one pass per layer.
    pl = _Planner(ops, slots, B, B, esz, device.type)
    place = [GPU] * n
    if budget is None and not cuda:  # CPU without a budget: never tile; the peak of whole-volume passes (`tile`'s
        # rows stop growing at large volumes, so its peak made 1024^3 read below 512^3)
        full = [slots[op.dst].spatial[0] for op in ops]
        peak = max(pl.ws(k, full[k], place) for k in range(len(ops)))
        return finish(pl, place, full, peak, 0, tiled=False)
    whole = pl.tile(place, budget if budget is not None else 1 << 62, cap=None)
    if whole is not None and all(r == slots[op.dst].spatial[0] for r, op in zip(whole[0], ops)) and not out_host:
        return finish(pl, place, whole[0], max(whole[1]), whole[2], tiled=False)
    if budget is None:  # CPU without a budget: never tile
        return finish(pl, place, [slots[op.dst].spatial[0] for op in ops], max(whole[1]) if whole else 0, 0,
                      tiled=False)

    # Tiled, one sample at a time. On CUDA plan for `_PLAN_FRACTION` of the budget (allocator rounding, cuDNN
    # handles and kernels' small buffers are outside the estimate).
    fill_to = int(budget * _PLAN_FRACTION) if cuda else budget
    # On CUDA, search placements of the large activations (device, host, recomputed when read): start from a few
    # simple placements, then change one activation at a time while the estimated time falls (thin slabs are priced
    # by `_conv_seconds`; one-row slabs only if nothing else fits). On CPU everything stays in RAM.
    pl = _Planner(ops, slots, B, 1, esz, device.type)
    fixed = [GPU] * n
    if out_host:
        fixed[n - 1] = HOST
    movable = [s for s in range(1, n - 1) if cuda and pl.size(s) * 64 >= fill_to]

    def evaluate(place, cap, limit=host_limit):
        return pl.evaluate(place, cap, fill_to, limit)

    starts = [list(fixed)]
    for mode in (RECOMPUTE, HOST):  # the largest activations off the device first (one, two, ... of them)
        place = list(fixed)
        for s in sorted(movable, key=pl.size, reverse=True):  # any activation but the input and the output
            place[s] = mode
            starts.append(list(place))
    # Slab caps: thinner slabs run slower convs but leave more of the budget for host stores' device rows.
    caps = _SLAB_CAPS if movable else (_SLAB_VOXELS,)
    found = [e for e in (evaluate(p, _SLAB_VOXELS) for p in starts) if e is not None]  # other caps: below
    if not found and host_limit is not None:
        unlimited = [e for e in (evaluate(p, _SLAB_VOXELS, None) for p in starts) if e is not None]
        if unlimited:
            need = min(pl.host_bytes(e[1], e[5]) for e in unlimited)
            raise ValueError(
                f"{task} of {tuple(in_shape)} under memory_budget_bytes={budget}: the plans that fit the device need "
                f"{need / _GiB:.1f} GiB or more of page-locked host memory, and {host_limit / _GiB:.1f} GiB is "
                f"available; free host memory, or pass a larger memory_budget_bytes so that more stays on the device"
            )
    if not found:
        need = max(pl.ws(k, 1, [HOST if cuda else GPU] * n) for k in range(len(ops)))
        need = int(-(-(need + _CUDA_WORKSPACE) * 32 // 31) / _PLAN_FRACTION) + 1 if cuda else need
        raise ValueError(
            f"memory_budget_bytes={budget} is too small to hold even one slab: {task} of {tuple(in_shape)} needs at "
            f"least {need} bytes ({need / _MiB:.1f} MiB)"
        )

    def descend(best):
        for _ in range(6):
            improved = False
            for s in movable:
                for where in (GPU, HOST, RECOMPUTE):
                    if where == best[1][s]:
                        continue
                    cand = evaluate(best[1][:s] + [where] + best[1][s + 1:], best[6])
                    if cand is not None and cand[0] < best[0]:
                        best, improved = cand, True
            for cap in caps:
                cand = evaluate(best[1], cap) if cap != best[6] else None
                if cand is not None and cand[0] < best[0]:
                    best, improved = cand, True
            if not improved:
                return best
        return best

    # From the three best starts: one descent can stop in a poor local minimum (512^3 under 24 GiB: 2.34 s estimated
    # from the best start alone, 2.15 s from the third, the best of an exhaustive search over the large activations)
    best = min((descend(e) for e in sorted(found, key=lambda e: e[0])[:3]), key=lambda e: e[0])
    (_, secs), place, rows, peaks, host_peak, gpu, _ = best
    peak = max(p + sum(gpu[s] * pl.row_bytes(s) for s in _live(ops, _lifetimes(ops, slots, place), k)
                       if place[s] == HOST) for k, p in enumerate(peaks))
    return finish(pl, place, rows, peak, host_peak, tiled=True, gpu=gpu, secs=secs, peaks=peaks)


_PLANS: dict[tuple, DecodePlan] = {}  # the search takes 0.3-0.9 s at 512^3: plans are kept per network, shape, budget


def _cached_plan(task, ops, slots, in_shape, out_channels, device, budget, dtype, out_device=None) -> DecodePlan:
    """`_make_plan`, remembered; each call gets its own copy, with the time to page-lock the host memory that the
    pool does not hold yet (first use only) added to its estimate."""
    program = tuple((op.kind, op.src, op.res, op.conv.in_channels, op.conv.out_channels, tuple(op.conv.kernel_size),
                     op.norm.num_groups if op.norm is not None else 0, op.silu, op.shortcut is not None) for op in ops)
    host_limit = _host_available() if torch.device(device).type == "cuda" else None
    key = (task, program, tuple(in_shape), out_channels, str(device), budget, dtype, str(out_device))
    plan = _PLANS.get(key)
    # Re-plan when the host can no longer page-lock what the plan needs, or when a plan that the host limit held
    # back could use 4 GiB more (not on every small move of the host's free memory: a search takes up to a second;
    # and not when the limit turned nothing away, as after the first call has page-locked its buffers: the same plan)
    if (plan is None or (host_limit is not None and plan._host_total > host_limit)
            or (plan._host_limit is not None and (host_limit is None or host_limit >= plan._host_limit + (4 << 30)))):
        if key not in _PLANS and len(_PLANS) >= 64:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _make_plan(task, ops, slots, in_shape, out_channels, device, budget, dtype, out_device, host_limit)
        plan._host_limit = host_limit if plan._host_bound else None
        _PLANS[key] = plan
    setup = max(plan.host_bytes - sum(b.numel() for b in _HOST_POOL), 0) * _PIN_SECONDS_PER_BYTE
    return dataclasses.replace(plan, levels=list(plan.levels), _rows=list(plan._rows), _place=list(plan._place),
                               _gpu_rows=list(plan._gpu_rows), _peaks=list(plan._peaks), setup_seconds=setup,
                               est_seconds=plan.est_seconds + setup)


def _host_available() -> int | None:
    """Host memory a plan may page-lock: four fifths of what Linux reports available plus the page-locked pool this
    process already holds (the rest is left to the process and the system). The pool is counted as available
    memory would be, so the limit does not move when a first call page-locks its buffers (it grew by a fifth of
    them, 7 GiB at 512^3, and the second call searched again). None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError):
        return None
    return None if avail is None else int((avail + sum(b.numel() for b in _HOST_POOL)) * 0.8)


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
    return _cached_plan("decode", ops, slots, tuple(latent_shape), vae.out_channels, device, memory_budget_bytes,
                        dtype, out_device)


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
    return _cached_plan("encode", ops, slots, tuple(image_shape), vae.latent_channels, device, memory_budget_bytes,
                        dtype)


# ----------------------------------------------------------------------------------------------------------------
# 3. The executor
# ----------------------------------------------------------------------------------------------------------------

_HOST_POOL: list[torch.Tensor] = []
_RUN_AHEAD = 2  # slabs the host may enqueue ahead of the device in a pass with host copies


def _host_buffer(nbytes: int) -> torch.Tensor:
    """A page-locked host byte buffer of at least `nbytes`: pageable memory registered with CUDA (faster to set up
    than cudaHostAlloc, with no power-of-two rounding), reused across calls (best fit); see `free_host_memory`."""
    fits = [i for i, b in enumerate(_HOST_POOL) if nbytes <= b.numel() <= 2 * nbytes]
    if fits:
        return _HOST_POOL.pop(min(fits, key=lambda i: _HOST_POOL[i].numel()))
    buf = _pageable(nbytes)
    buf.zero_()  # fault the pages in on all threads first: 8 GiB register in 0.47 s instead of 1.5 s (H200 host)
    torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)  # on failure the buffer stays pageable
    return buf


def _pageable(nbytes: int) -> torch.Tensor:
    """Pageable host bytes, on transparent huge pages where Linux offers them: faulting in and page-locking 2 MiB
    pages is faster than 4 KiB ones (8 GiB: 0.47 s instead of 0.75 s on the H200 host)."""
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):  # not Linux, or no transparent huge pages
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the mapping alive; freed with it


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


_COPY_STREAMS: dict[int, tuple] = {}


def _copy_streams(device: torch.device) -> tuple:
    """The copier's two side streams for `device`, the same ones in every call: the caching allocator keeps freed
    blocks per stream, so fresh streams (torch hands out the next of its pooled ones) would leave the last call's
    fetched slabs cached on streams no longer used, and allocate (cudaMalloc) anew in every call, with the reserved
    memory growing call after call."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = (torch.cuda.Stream(index), torch.cuda.Stream(index))
    return _COPY_STREAMS[index]


class _Copier:
    """Host<->device copies on two side streams, so that they overlap the convolutions: rows a later slab will read
    are fetched while the current slab computes; rows written to the host go while the next slab computes.
    Fetched slabs are allocated on the copy stream and handed to the compute stream with an event."""

    def __init__(self, device: torch.device):
        self.h2d, self.d2h = _copy_streams(device)
        cur = torch.cuda.current_stream(device)
        self.h2d.wait_stream(cur)  # (the streams outlive the call: order this call's copies after what came before)
        self.d2h.wait_stream(cur)
        self.fetched: dict[int, list] = {}  # id(store) -> [(lo, hi, tensor, event)]

    def new_pass(self) -> None:
        """Drop the slabs fetched for the previous pass (each pass reads its own rows); order this pass's reads after
        earlier passes' host writes, and host writes after earlier reads (buffers are reused)."""
        self.fetched.clear()
        self.h2d.wait_stream(self.d2h)
        self.d2h.wait_stream(self.h2d)

    def fetch(self, store: "_Store", lo: int, hi: int) -> None:
        """Start copying host rows [lo, hi) to the device. Rows the previous fetch of this store already brought (a
        slab's halo: the next slab along D starts inside it) are copied on the device instead of over the bus."""
        entries = self.fetched.setdefault(id(store), [])
        if any(a <= lo and hi <= b for a, b, _, _ in entries):
            return
        prev = entries[-1] if entries else None
        with torch.cuda.stream(self.h2d):
            if prev is not None and prev[0] <= lo < prev[1] < hi:
                a, b, src, _ = prev
                host = store.host_rows(b, hi)
                t = torch.empty((host.shape[0], host.shape[1], hi - lo, *host.shape[3:]), dtype=host.dtype,
                                device=store.device, memory_format=torch.channels_last_3d)  # as CUDA stores
                t[:, :, : b - lo].copy_(src[:, :, lo - a :])  # on src's own stream: ordered after its copy
                t[:, :, b - lo :].copy_(host, non_blocking=True)
            else:
                t = store.host_rows(lo, hi).to(store.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.h2d)
        entries.append((lo, hi, t, ev))
        del entries[:-2]  # the slab being computed and the next one

    def take(self, store: "_Store", lo: int, hi: int) -> torch.Tensor | None:
        for a, b, t, ev in self.fetched.get(id(store), []):
            if a <= lo and hi <= b:
                cur = torch.cuda.current_stream(store.device)
                cur.wait_event(ev)
                t.record_stream(cur)
                return t[:, :, lo - a : hi - a]
        return None

    def put(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        self.d2h.wait_stream(torch.cuda.current_stream(y.device))
        with torch.cuda.stream(self.d2h):
            dst.copy_(y, non_blocking=True)
        y.record_stream(self.d2h)

    def mark(self) -> tuple:
        """Events at the current ends of the compute and host-write streams."""
        evs = (torch.cuda.Event(), torch.cuda.Event())
        evs[0].record(torch.cuda.current_stream(self.d2h.device))
        evs[1].record(self.d2h)
        return evs

    def finish(self, device: torch.device) -> None:
        cur = torch.cuda.current_stream(device)
        cur.wait_stream(self.d2h)
        cur.wait_stream(self.h2d)
        self.fetched.clear()


class _Store:
    """One stored activation (B, C, D, H, W): rows [0, g) on the device, rows [g, D) in page-locked host memory
    (g = D: all on the device), with its GroupNorm statistics.

    On CUDA stores are channels_last_3d: cuDNN's fast 3-D conv layout, and for one sample a slab of D rows is one
    contiguous block, so host<->device slab copies are single memcpys. On CPU both parts are plain NCDHW tensors.
    """

    def __init__(self, dev: torch.Tensor | None, host: torch.Tensor | None, g: int, device: torch.device,
                 buf: torch.Tensor | None = None, copier: _Copier | None = None):
        self.dev, self.host, self.g, self.device, self.buf, self.copier = dev, host, g, device, buf, copier
        self.stats = None

    @classmethod
    def wrap(cls, t: torch.Tensor, device: torch.device) -> "_Store":
        if t.device == device:
            return cls(t, None, t.shape[2], device)
        return cls(None, t, 0, device)

    @classmethod
    def new(cls, shape, dtype, device, gpu_rows: int, fmt, copier) -> "_Store":
        B, C, D, H, W = shape
        g = min(gpu_rows, D)
        dev = torch.empty((B, C, g, H, W), dtype=dtype, device=device, memory_format=fmt) if g else None
        if g == D:
            return cls(dev, None, g, device)
        if device.type != "cuda":
            return cls(dev, torch.empty((B, C, D - g, H, W), dtype=dtype), g, device)
        nbytes = B * C * (D - g) * H * W * torch.empty((), dtype=dtype).element_size()
        buf = _host_buffer(nbytes)
        host = buf[:nbytes].view(dtype).view(B, D - g, H, W, C).permute(0, 4, 1, 2, 3)
        return cls(dev, host, g, device, buf, copier)

    def host_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Host rows [lo, hi) to be read (copied to the device)."""
        return self.host[:, :, lo - self.g : hi - self.g]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        parts = []
        if lo < self.g:
            parts.append(self.dev[:, :, lo : min(hi, self.g)])
        if hi > self.g:
            a = max(lo, self.g)
            t = self.copier.take(self, a, hi) if self.copier is not None else None
            if t is None:  # not fetched ahead: copy on the compute stream, after this store's pending host writes
                if self.copier is not None:
                    torch.cuda.current_stream(self.device).wait_stream(self.copier.d2h)
                t = self.host_rows(a, hi).to(self.device, non_blocking=True)
            parts.append(t)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    def write(self, a: int, b: int, y: torch.Tensor) -> None:
        if a < self.g:
            self.dev[:, :, a : min(b, self.g)].copy_(y[:, :, : min(b, self.g) - a])
        if b > self.g:
            lo = max(a, self.g)
            src, dst = y[:, :, lo - a :], self.host[:, :, lo - self.g : b - self.g]
            if self.copier is not None:
                self.copier.put(dst, src)
            else:
                dst.copy_(src)

    def release(self) -> None:
        if self.copier is not None:
            self.copier.fetched.pop(id(self), None)
        if self.buf is not None:
            _host_release(self.buf)
        self.dev = self.host = self.buf = None

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


def _to_compute(held: tuple[int, int] | None, lo: int, hi: int) -> tuple[int, int] | None:
    """Rows of [lo, hi) a recomputed activation must compute when rows `held` are memoised: none if they are all
    held; the rows past the held ones when [lo, hi) starts inside them (the next slab of a pass along D); else all."""
    if held is not None and held[0] <= lo and hi <= held[1]:
        return None
    if held is not None and held[0] <= lo < held[1]:
        return held[1], hi
    return lo, hi


class _Recomputed(_Store):
    """An activation that is not stored: reading rows recomputes them from the producer's inputs. The rows last read
    stay memoised for the rest of the pass (`_Run.memo`): a second reader in the same slab takes them as they are,
    and the next slab, which overlaps them by the convs' halo, computes only the rows past them."""

    def __init__(self, run: "_Run", k: int):
        self.run, self.k, self.stats, self.buf = run, k, None, None

    def read(self, lo: int, hi: int) -> torch.Tensor:
        s, memo = self.k + 1, self.run.memo
        held = memo.get(s)
        todo = _to_compute(held and held[:2], lo, hi)
        if todo is None:
            return held[2][:, :, lo - held[0] : hi - held[0]]
        if todo[0] == lo:
            memo.pop(s, None)
            y = self.run.slab(self.k, lo, hi)
        else:  # keep a copy of the overlap only, so that the old slab is freed before the new rows are computed
            keep = held[2][:, :, lo - held[0] :].clone()
            del memo[s], held
            y = torch.cat([keep, self.run.slab(self.k, *todo)], 2)
        memo[s] = (lo, hi, y)
        return y

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
        self.params: dict = {}
        self.memo: dict[int, tuple[int, int, torch.Tensor]] = {}  # slot -> rows recomputed last in this pass
        self.fused: dict[int, _Op] = {}
        self.copier = _Copier(device) if device.type == "cuda" else None
        self._walked: dict[int, tuple[int, int]] = {}  # `_prefetch`'s copy of the memoised rows
        self.bar = tqdm(disable=True)  # `_execute` gives it the run's progress bar

    def _fuses(self, op: _Op, a: int, b: int, held) -> bool:
        """Whether op's residual rows [a, b) come from the fused shortcut conv (`_fusable`), not memoised rows."""
        return (op.res is not None and self.plan._place[op.res] == RECOMPUTE and _fusable(self.ops, op)
                and (held is None or not (held[0] <= a and b <= held[1])))

    def _params(self, k, op: _Op) -> tuple:
        """Weights in the compute dtype and the GroupNorm scale/shift of op (once its input's stats exist)."""
        if k not in self.params:
            dt = self.dtype
            w = op.conv.weight.detach().to(dt)
            b = op.conv.bias.detach().to(dt) if op.conv.bias is not None else None
            cout = w.shape[1] if op.kind == "upT" else w.shape[0]
            if self.device.type == "cuda" and op.kind != "upT" and cout < _PAD_OUT:  # cuDNN: 1 channel is slow
                w = F.pad(w, (0, 0, 0, 0, 0, 0, 0, 0, 0, _PAD_OUT - cout))
                b = F.pad(b, (0, _PAD_OUT - cout)) if b is not None else None
            if self.fmt is torch.channels_last_3d:
                w = w.contiguous(memory_format=self.fmt)
            sc = (op.shortcut.weight.detach().to(dt), op.shortcut.bias.detach().to(dt)) if op.shortcut else None
            aff = _norm_affine(self.stores[op.src], op.norm, self.slots[op.src].eps) if op.norm is not None else None
            self.params[k] = (w, b, sc, aff, cout)
        return self.params[k]

    def _fused_op(self, k: int) -> _Op:
        """Op k's residual shortcut folded into the residual's producer (see `_fusable`)."""
        if k not in self.fused:
            self.fused[k] = _fused(self.ops, self.ops[k], torch.float32)
        return self.fused[k]

    def slab(self, k: int, a: int, b: int, op: _Op | None = None, key=None) -> torch.Tensor:
        """Rows [a, b) of op k's output, computed from the input rows they need (exact at every cut)."""
        op = op or self.ops[k]
        w, bias, sc, aff, cout = self._params(k if key is None else key, op)
        n_in = self.slots[op.src].spatial[0]
        lo, hi = _in_rows(op, a, b, n_in)
        x = self.stores[op.src].read(lo, hi)
        late_bias = bias if x.is_cuda and op.kind != "upT" else None  # cuDNN's own bias pass is ~4x slower
        if late_bias is not None:
            bias = None
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
        if late_bias is not None and op.res is None:
            y = add_bias_(y, late_bias)
        if y.shape[1] != cout:
            y = y[:, :cout]
        if op.res is not None:
            if self._fuses(op, a, b, self.memo.get(op.res)):
                r = self.slab(k, a, b, self._fused_op(k), key=("fused", k))  # shortcut(producer(x)) in one conv
            else:
                r = self.stores[op.res].read(a, b)
                if sc is not None:
                    r = F.conv3d(r, sc[0], sc[1])
            if late_bias is not None:
                return add_bias_residual_(y, late_bias[:cout], r)  # one pass: y + bias + r
            y = y.add_(r) if y.is_contiguous(memory_format=self.fmt) else y + r
        return y

    def _prefetch(self, k: int, a: int, b: int) -> None:
        """Start copying to the device the host rows that rows [a, b) of op k will read (through recomputed
        activations too)."""
        need: dict[int, tuple[int, int]] = {}
        held = self._walked  # the rows `_Recomputed.read` will hold, slab after slab (it sees the same reads)

        def walk(op: _Op, a: int, b: int) -> None:
            lo, hi = _in_rows(op, a, b, self.slots[op.src].spatial[0])
            for s, (s_lo, s_hi) in ((op.src, (lo, hi)), (op.res, (a, b))):
                if s is None:
                    continue
                if s == op.res and self._fuses(op, s_lo, s_hi, held.get(s)):
                    walk(self.ops[s - 1], s_lo, s_hi)  # the fused conv reads the producer's inputs; s is not held
                elif self.plan._place[s] == RECOMPUTE:
                    todo = _to_compute(held.get(s), s_lo, s_hi)
                    if todo is not None:
                        held[s] = (s_lo, s_hi)
                        walk(self.ops[s - 1], *todo)
                elif isinstance(self.stores[s], _Store) and self.stores[s].host is not None:
                    old = need.get(s, (s_lo, s_hi))
                    need[s] = (min(old[0], s_lo), max(old[1], s_hi))

        walk(self.ops[k], a, b)
        for s, (lo, hi) in need.items():
            st = self.stores[s]
            if hi > st.g:
                self.copier.fetch(st, max(lo, st.g), hi)

    def op(self, k: int, final: torch.Tensor | None) -> None:
        op, slot = self.ops[k], self.slots[self.ops[k].dst]
        where, rows, n_out = self.plan._place[op.dst], self.plan._rows[k], slot.spatial[0]
        if where == RECOMPUTE:
            out = _Recomputed(self, k)
        elif final is not None:
            out = _Store.wrap(final, self.device)
            if out.host is not None:
                out.copier = self.copier
        else:
            g = self.plan._gpu_rows[op.dst] if self.plan._gpu_rows else (n_out if where == GPU else 0)
            out = _Store.new((self.B, slot.channels, *slot.spatial), self.dtype, self.device, g, self.fmt,
                             self.copier)
        self.stores[op.dst] = out
        if where != RECOMPUTE or slot.groups is not None:
            if self.copier is not None:
                self.copier.new_pass()
            starts = list(range(0, n_out, rows))
            self.memo.clear()
            self._walked = {}
            pending: list[tuple] = []
            for i, a in enumerate(starts):
                b = min(a + rows, n_out)
                if self.copier is not None:
                    if i == 0:
                        self._prefetch(k, a, b)
                    if i + 1 < len(starts):
                        self._prefetch(k, starts[i + 1], min(starts[i + 1] + rows, n_out))
                y = self.slab(k, a, b)
                self.bar.update()
                if slot.groups is not None:
                    out.accumulate(y, slot.groups)
                if where != RECOMPUTE:
                    out.write(a, b, y)
                if TRACE is not None and self.device.type == "cuda":
                    TRACE.append(("slab", k, a, torch.cuda.memory_allocated(self.device)))
                if self.copier is not None:  # keep the host at most _RUN_AHEAD slabs ahead of the device, so that
                    # slabs in flight (fetched, or being written to the host) stay within the plan's memory
                    pending.append(self.copier.mark())
                    if len(pending) > _RUN_AHEAD:
                        for ev in pending.pop(0):
                            ev.synchronize()
            self.memo.clear()
        for s in range(1, len(self.stores)):  # every activation whose last reader (directly, or through a
            # recomputed activation that reads it) has run: not only this op's own inputs
            if self.stores[s] is not None and self.last[s] <= k and s != len(self.stores) - 1:
                self.stores[s].release()
                self.stores[s] = None


TRACE: list | None = None  # set to [] to record (op, kind, placement, rows, peak bytes, seconds) per op (benchmarks)


def _execute(ops, slots, plan: DecodePlan, x: torch.Tensor, device, dtype, progress: bool = False) -> torch.Tensor:
    """Run the program on x (B, C, *spatial), `plan.batch_chunk` samples at a time, into one preallocated output;
    with `progress`, a bar counts the slabs of every pass."""
    fmt = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    B, last = x.shape[0], len(slots) - 1
    passes = _Planner(ops, slots, B, plan.batch_chunk, 1, device.type).passes(plan._place)
    slabs = sum(-(-slots[ops[k].dst].spatial[0] // plan._rows[k]) for k in passes) * -(-B // plan.batch_chunk)
    bar = tqdm(total=slabs, desc=plan.task, unit="slab", leave=False, disable=not progress)
    out_shape = (B, slots[last].channels, *slots[last].spatial)
    on_dev = plan._place[last] == GPU
    final = torch.empty(out_shape, dtype=dtype, device=device if on_dev else "cpu", memory_format=fmt,
                        pin_memory=not on_dev and device.type == "cuda")
    for s0 in range(0, B, plan.batch_chunk):
        run = _Run(ops, slots, plan, device, dtype, fmt)
        run.bar = bar
        xb = x[s0 : s0 + plan.batch_chunk].to(device=device, dtype=dtype, memory_format=fmt)
        run.B = xb.shape[0]
        run.stores[0] = _Store.wrap(xb, device)
        if slots[0].groups is not None:  # the input itself is normalised by the first op (not in MAISI's nets)
            run.stores[0].accumulate(xb, slots[0].groups)
        for k, op in enumerate(ops):
            if TRACE is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
            run.op(k, final[s0 : s0 + plan.batch_chunk] if op.dst == last else None)
            if TRACE is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
                TRACE.append((k, op.kind, plan._place[op.dst], plan._rows[k], torch.cuda.max_memory_allocated(device),
                              time.perf_counter() - t0))
        if run.copier is not None:
            run.copier.finish(device)
        for st in run.stores:
            if st is not None and st is not run.stores[0]:
                st.release()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    bar.close()
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


def _compute(vae, x, budget, plan_fn, whole_fn, program_fn, out_device, progress=False):
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
                    y = _execute(ops, slots, plan, x, device, dtype, progress)
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
    progress: bool = False,
):
    """Exact `vae.decode(z)` for any (B, latent, d, h, w) latent within a device-memory budget.

    Runs on the VAE's device in its parameter dtype. The result lives on the compute device when it fits, otherwise
    in host memory (channels_last_3d strides; `plan.output_device` says which), unless `out_device` is given.
    On CUDA out-of-memory it retries once with half the budget, then raises RuntimeError.
    Returns the image, or (image, plan) with `return_plan=True`. `progress`: a bar over the slabs (tiled runs).
    """
    _check(vae, z, vae.latent_channels, "latent z", memory_budget_bytes)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    program = lambda: _compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)  # noqa: E731
    y, plan = _compute(
        vae, z, memory_budget_bytes,
        lambda budget: plan_decode(z.shape, device, budget, dtype, vae, out_device),
        vae.decode, program, out_device, progress,
    )
    return (y, plan) if return_plan else y


def encode_image(
    vae: AutoencoderKlMaisi,
    x: torch.Tensor,
    memory_budget_bytes: int | None = None,
    return_plan: bool = False,
    progress: bool = False,
):
    """Exact `vae.encode(x)` -> (z_mu, z_sigma) for a (B, C_in, D, H, W) image within a device-memory budget.

    Deterministic (returns the mean and sigma, like `encode`; sample with `vae.sampling(z_mu, z_sigma)`). The latents
    are returned on the VAE's device. Returns (z_mu, z_sigma), or ((z_mu, z_sigma), plan) with `return_plan=True`.
    `progress`: a bar over the slabs (tiled runs).
    """
    _check(vae, x, vae.in_channels, "image x", memory_budget_bytes)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    program = lambda: _compile(vae.encoder.blocks, vae.in_channels, None)  # noqa: E731
    h, plan = _compute(
        vae, x, memory_budget_bytes,
        lambda budget: plan_encode(x.shape, device, budget, dtype, vae),
        vae.encoder, program, None, progress,
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
