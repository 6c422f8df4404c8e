"""The planner of the exact decode/encode: where each activation lives (device, host, recomputed), slab sizes, and
the estimated peak memory and time of a placement; `plan_decode` / `plan_encode` and the plan cache."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fastmaisi.decode.host_memory import _HOST_POOL
from fastmaisi.decode.program import _CUDA_WORKSPACE, _GiB, _MiB, _Op, _Slot, _compile, _in_rows_of, _shapes
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi



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
