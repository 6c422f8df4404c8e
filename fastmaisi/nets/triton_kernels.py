"""The Triton kernels behind `nets.fused_ops` (GroupNorm statistics and apply, trilinear x2 upsampling, bias adds,
channel concatenation, pooled norm): compiled on first use, `None` where triton is missing or fails to load.

Kernel definitions only; when they run and on which tensors is `fused_ops`'s business.
"""

from __future__ import annotations

# PyTorch's CUDA GroupNorm computes statistics with one thread block per (sample, group): with batch 1 and 32 groups
# only 32 blocks run (~1 ms for a 64 x 128^3 fp16 tensor, a quarter of the GPU at ~0.25 TB/s), and channels-last
# inputs are first copied to NCDHW. These Triton kernels spread the statistics over space and channels:
# 1. per (spatial tile, channel): tile mean and sum of squared deviations in fp32 (NCDHW: two-pass within each tile,
#    merged across a program's tiles; channels-last: a Welford update per register slot, slots merged at the end);
# 2. per (sample, group): exact merge of the tiles (Chan et al.), rstd, per-channel scale/shift in fp32;
# 3. y = x * scale + shift [then SiLU], fp32 math, one rounding to x's dtype; any layout whose (B, C, S) view is
#    NCDHW- or channels-last-strided. Inference only (autograd falls back to `ops.group_norm`).
_TRITON: dict = {}


def _triton_kernels():
    if "stats" in _TRITON or "error" in _TRITON:
        return _TRITON if "stats" in _TRITON else None
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # CPU-only installs
        _TRITON["error"] = e
        return None

    @triton.jit
    def stats(x_ptr, mean_ptr, m2_ptr, S, C, sB, sC, sS, ITERS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # program (ps, pc, b): ITERS consecutive spatial tiles of BLOCK_C channels, merged (Chan et al.) in fp32
        ps, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        base = x_ptr + b.to(tl.int64) * sB + offs_c[None, :].to(tl.int64) * sC
        mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(ITERS):
            start = (ps * ITERS + i) * BLOCK_S
            offs_s = start + tl.arange(0, BLOCK_S)
            mask = (offs_s[:, None] < S) & cmask[None, :]
            x = tl.load(base + offs_s[:, None].to(tl.int64) * sS, mask=mask, other=0.0).to(tl.float32)
            n_a = tl.minimum(tl.maximum(S - ps * ITERS * BLOCK_S, 0), i * BLOCK_S).to(tl.float32)
            n_b = tl.minimum(tl.maximum(S - start, 0), BLOCK_S).to(tl.float32)
            mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
            d = tl.where(mask, x - mean_b[None, :], 0.0)
            m2_b = tl.sum(d * d, axis=0)
            w = n_b / tl.maximum(n_a + n_b, 1.0)
            delta = mean_b - mean_a
            mean_a += delta * w
            m2_a += m2_b + delta * delta * n_a * w
        out = (b.to(tl.int64) * tl.num_programs(0) + ps) * C + offs_c
        tl.store(mean_ptr + out, mean_a, mask=cmask)
        tl.store(m2_ptr + out, m2_a, mask=cmask)

    @triton.jit
    def stats_cl(x_ptr, mean_ptr, m2_ptr, S, C, sB, ITERS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # channels-last (sC == 1, sS == C): the same (ps, pc, b) outputs as `stats`, but each register slot keeps its
        # own Welford mean/M2 over the ITERS tiles (no cross-thread reduction inside the loop); rows merge at the end
        ps, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        base = x_ptr + b.to(tl.int64) * sB + offs_c[None, :]
        mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        n = tl.zeros([BLOCK_S], dtype=tl.float32)
        for i in range(ITERS):
            offs_s = (ps * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
            valid = offs_s < S
            mask = valid[:, None] & (offs_c < C)[None, :]
            x = tl.load(base + offs_s[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32)
            n += valid.to(tl.float32)
            inv = tl.where(valid, 1.0 / tl.maximum(n, 1.0), 0.0)
            delta = tl.where(valid[:, None], x - mean, 0.0)
            mean += delta * inv[:, None]
            m2 += delta * (x - mean)
        total = tl.maximum(tl.sum(n, axis=0), 1.0)
        mean_c = tl.sum(mean * n[:, None], axis=0) / total
        d = mean - mean_c[None, :]
        m2_c = tl.sum(m2 + d * d * n[:, None], axis=0)
        out = (b.to(tl.int64) * tl.num_programs(0) + ps) * C + offs_c
        cmask = offs_c < C
        tl.store(mean_ptr + out, mean_c, mask=cmask)
        tl.store(m2_ptr + out, m2_c, mask=cmask)

    @triton.jit
    def finalize(mean_ptr, m2_ptr, w_ptr, bias_ptr, pre_ptr, scale_ptr, shift_ptr, T, C, S, G, SPAN, eps,
                 CG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr, PRE: tl.constexpr):
        # program (b, g): merge the T partials of the group's CG channels, then per-channel scale and shift;
        # PRE: the input is x + pre[b, c] (a per-channel shift moves the channel means, not the M2 terms)
        pid = tl.program_id(0)
        b, g = pid // G, pid % G
        offs_c = g * CG + tl.arange(0, BLOCK_CG)
        cmask = tl.arange(0, BLOCK_CG) < CG
        total = S * 1.0 * CG
        if PRE:
            pre = tl.load(pre_ptr + b * C + offs_c, mask=cmask, other=0.0)
        else:
            pre = tl.zeros([BLOCK_CG], dtype=tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t[:, None] < T) & cmask[None, :]
            n_t = tl.minimum(tl.maximum(S - offs_t * SPAN, 0), SPAN).to(tl.float32)
            m = tl.load(mean_ptr + (b * T + offs_t[:, None]).to(tl.int64) * C + offs_c[None, :], mask=mask,
                        other=0.0) + pre[None, :]
            acc += tl.where(mask, m * n_t[:, None], 0.0)
        mean_g = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros([BLOCK_T, BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t[:, None] < T) & cmask[None, :]
            n_t = tl.minimum(tl.maximum(S - offs_t * SPAN, 0), SPAN).to(tl.float32)
            idx = (b * T + offs_t[:, None]).to(tl.int64) * C + offs_c[None, :]
            m = tl.load(mean_ptr + idx, mask=mask, other=0.0) + pre[None, :]
            m2 = tl.load(m2_ptr + idx, mask=mask, other=0.0)
            acc += tl.where(mask, m2 + n_t[:, None] * (m - mean_g) * (m - mean_g), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps)
        w = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        scale = w * rstd
        tl.store(scale_ptr + b * C + offs_c, scale, mask=cmask)
        tl.store(shift_ptr + b * C + offs_c, bias + (pre - mean_g) * scale, mask=cmask)

    @triton.jit
    def apply(x_ptr, y_ptr, scale_ptr, shift_ptr, S, C, sB, sC, sS, SILU: tl.constexpr, BLOCK_S: tl.constexpr,
              BLOCK_C: tl.constexpr):
        ps, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_s = ps * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        mask = (offs_s[:, None] < S) & cmask[None, :]
        off = b.to(tl.int64) * sB + offs_s[:, None].to(tl.int64) * sS + offs_c[None, :].to(tl.int64) * sC
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * C + offs_c, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + b * C + offs_c, mask=cmask, other=0.0)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _source(o, n):
        # align_corners=False source coordinate of output o (x2), clamped at 0 as PyTorch: (i0, i1, weight of i1)
        src = tl.maximum(o.to(tl.float32) * 0.5 - 0.25, 0.0)
        i0 = src.to(tl.int64)
        return i0, tl.minimum(i0 + 1, n - 1), src - i0.to(tl.float32)

    globals()["_source"] = _source  # Triton's CPU interpreter resolves a kernel's helpers among module globals only

    @triton.jit
    def up2(x_ptr, y_ptr, C, D, H, W, R, row0, sxb, sxc, sxd, sxh, sxw, syb, syc, syd, syh, syw,
            BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        # y[b, c, r, oh, ow] = trilinear_x2(x)[b, c, row0 + r, oh, ow]; fp32 math in PyTorch's nesting order
        pv, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        v = pv.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        OH, OW = 2 * H, 2 * W
        ow, oh, r = v % OW, (v // OW) % OH, v // (OW * OH)
        mask = (r < R)[:, None] & (c < C)[None, :]
        d0, d1, ld = _source(r + row0, D)
        h0, h1, lh = _source(oh, H)
        w0, w1, lw = _source(ow, W)
        base = x_ptr + b.to(tl.int64) * sxb + c[None, :].to(tl.int64) * sxc
        off_d0, off_d1 = (d0 * sxd)[:, None], (d1 * sxd)[:, None]
        off_h0, off_h1 = (h0 * sxh)[:, None], (h1 * sxh)[:, None]
        off_w0, off_w1 = (w0 * sxw)[:, None], (w1 * sxw)[:, None]
        lw1, lh1, ld1 = lw[:, None], lh[:, None], ld[:, None]
        lw0, lh0, ld0 = 1.0 - lw1, 1.0 - lh1, 1.0 - ld1
        x000 = tl.load(base + off_d0 + off_h0 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x001 = tl.load(base + off_d0 + off_h0 + off_w1, mask=mask, other=0.0).to(tl.float32)
        x010 = tl.load(base + off_d0 + off_h1 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x011 = tl.load(base + off_d0 + off_h1 + off_w1, mask=mask, other=0.0).to(tl.float32)
        x100 = tl.load(base + off_d1 + off_h0 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x101 = tl.load(base + off_d1 + off_h0 + off_w1, mask=mask, other=0.0).to(tl.float32)
        x110 = tl.load(base + off_d1 + off_h1 + off_w0, mask=mask, other=0.0).to(tl.float32)
        x111 = tl.load(base + off_d1 + off_h1 + off_w1, mask=mask, other=0.0).to(tl.float32)
        val = (ld0 * (lh0 * (lw0 * x000 + lw1 * x001) + lh1 * (lw0 * x010 + lw1 * x011))
               + ld1 * (lh0 * (lw0 * x100 + lw1 * x101) + lh1 * (lw0 * x110 + lw1 * x111)))
        out = (y_ptr + b.to(tl.int64) * syb + c[None, :].to(tl.int64) * syc + (r * syd)[:, None]
               + (oh * syh)[:, None] + (ow * syw)[:, None])
        tl.store(out, val.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bias_add(h_ptr, r_ptr, b_ptr, N, C, INNER, RES: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
        # h[i] = h[i] + bias[c(i)] (+ r[i]) [then SiLU] in fp32, one rounding; c(i) = (i // INNER) % C over the flat
        # storage
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        y = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(b_ptr + (offs // INNER) % C, mask=mask, other=0.0).to(tl.float32)
        if RES:
            y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(h_ptr + offs, y.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _voxel(t, W, H, D):
        # flat index over (B, D, H, W), W fastest -> (b, d, h, w)
        w = t % W
        t = t // W
        h = t % H
        t = t // H
        return t // D, t % D, h, w

    globals()["_voxel"] = _voxel  # Triton's CPU interpreter resolves a kernel's helpers among module globals only

    @triton.jit
    def up_add(h_ptr, x_ptr, N, C, W2, H2, D2, sxb, sxc, sxd, sxh, sxw, BLOCK: tl.constexpr):
        # h += nearest_x2(x), h channels-last (B, 2D, 2H, 2W, C) in storage order; x any strides; fp32, one rounding
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        c = offs % C
        b, d, hh, w = _voxel(offs // C, W2, H2, D2)
        xo = b * sxb + c * sxc + (d // 2) * sxd + (hh // 2) * sxh + (w // 2) * sxw
        y = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, y.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def cat2(a_ptr, b_ptr, r_ptr, y_ptr, N, CA, CB, ADD: tl.constexpr, BLOCK: tl.constexpr):
        # y = cat([a, b (+ r)], channels) for channels-last a, b, r, y: y's storage is (positions, CA + CB); b + r in
        # fp32, one rounding (as PyTorch's half add)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        C = CA + CB
        c = offs % C
        pos = offs // C
        in_a = c < CA
        va = tl.load(a_ptr + pos * CA + c, mask=mask & in_a, other=0.0)
        vb = tl.load(b_ptr + pos * CB + (c - CA), mask=mask & (c >= CA), other=0.0)
        if ADD:
            vr = tl.load(r_ptr + pos * CB + (c - CA), mask=mask & (c >= CA), other=0.0)
            vb = (vb.to(tl.float32) + vr.to(tl.float32)).to(vb.dtype)
        tl.store(y_ptr + offs, tl.where(in_a, va, vb), mask=mask)

    @triton.jit
    def pool_norm(x_ptr, xp_ptr, hp_ptr, scale_ptr, shift_ptr, NV, C, D2, H2, W2, BLOCK_V: tl.constexpr,
                  BLOCK_C: tl.constexpr):
        # channels-last x (B, D, H, W, C) -> xp = avg_pool_x2(x), hp = avg_pool_x2(silu(x * scale + shift)), both
        # (B, D/2, H/2, W/2, C); fp32 sums of the 8 voxels, one rounding each
        v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (v < NV)[:, None] & (c < C)[None, :]
        b, d, h, w = _voxel(v, W2, H2, D2)
        H, W = 2 * H2, 2 * W2
        corner = (((b * 2 * D2 + 2 * d) * H + 2 * h) * W + 2 * w) * C
        aff = b[:, None] * C + c[None, :]
        scale = tl.load(scale_ptr + aff, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + aff, mask=mask, other=0.0)
        acc_x = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        acc_h = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(8):
            off = corner + (((i // 4) * H + (i // 2) % 2) * W + i % 2) * C
            x = tl.load(x_ptr + off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            acc_x += x
            y = x * scale + shift
            acc_h += y * tl.sigmoid(y)
        out = v[:, None] * C + c[None, :]
        tl.store(xp_ptr + out, (acc_x * 0.125).to(xp_ptr.dtype.element_ty), mask=mask)
        tl.store(hp_ptr + out, (acc_h * 0.125).to(hp_ptr.dtype.element_ty), mask=mask)

    _TRITON.update(stats=stats, stats_cl=stats_cl, finalize=finalize, apply=apply, up2=up2, bias_add=bias_add,
                   up_add=up_add, cat2=cat2, pool_norm=pool_norm, cdiv=triton.cdiv, next_pow2=triton.next_power_of_2)
    return _TRITON
