"""The executor of a decode/encode plan: slab-by-slab passes, host buffers and side-stream copies, recomputed
activations, GroupNorm statistics fused into their producers."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastmaisi.decode.host_memory import _host_buffer, _host_release
from fastmaisi.decode.plan import DecodePlan, GPU, RECOMPUTE, _PAD_OUT, _Planner, _fusable, _fused, _lifetimes
from fastmaisi.decode.program import _Op, _in_rows
from fastmaisi.nets.blocks import add_bias_, add_bias_residual_, group_moments, scale_shift, upsample_trilinear_x2



_RUN_AHEAD = 2  # slabs the host may enqueue ahead of the device in a pass with host copies


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
