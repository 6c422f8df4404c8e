"""Softmax attention for the UNets' spatial transformers: SDPA, or on CUDA a Triton flash-attention forward tuned
for MAISI's head size 32.

At the 32^3 level of a 128^3 latent, attention is 8 heads of 32 channels over 32,768 tokens (8.6e9 scores a call);
with d = 32 the matmuls are small and the softmax's arithmetic dominates. On an H200 cuDNN's SDPA takes 4.44 ms for
that call, PyTorch's flash backend 5.06 ms, this kernel 3.60 ms (two 64-key sub-tiles per step; 3.77 ms with one),
with the same max error against an fp32 reference (1.3e-3; `bench/bench_attention.py`). It is the textbook
online-softmax forward (Dao et al.): scores and running max/sum in fp32, exp2 with the scale folded into one
multiply-add, P rounded to q's dtype for the P @ V matmul as every flash kernel does. Inference only (no autograd,
no dropout), fp16/bf16, head size 16-128 (a power of 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmaisi.nets.kernel_device import kernels_run_on

_KERNEL: dict = {}


def _kernel():
    if "fwd" in _KERNEL or "error" in _KERNEL:
        return _KERNEL.get("fwd")
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # CPU-only installs: SDPA everywhere
        _KERNEL["error"] = e
        return None

    @triton.jit
    def scores(q, k_ptrs, v_ptrs, start, offs_n, N, skn, svn, EVEN: tl.constexpr):
        # the key tile at `start`: unscaled scores q @ k (BLOCK_M, BLOCK_N) fp32, -inf past N, and its values
        if EVEN:
            k = tl.load(k_ptrs + start * skn)
            v = tl.load(v_ptrs + start * svn)
        else:
            k = tl.load(k_ptrs + start * skn, mask=(start + offs_n)[None, :] < N, other=0.0)
            v = tl.load(v_ptrs + start * svn, mask=(start + offs_n)[:, None] < N, other=0.0)
        s = tl.dot(q, k)
        if not EVEN:
            s = tl.where((start + offs_n)[None, :] < N, s, float("-inf"))
        return s, v

    globals()["scores"] = scores  # Triton's CPU interpreter resolves a kernel's helpers among module globals only

    @triton.jit
    def fwd(Q, K, V, O, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, H, N, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, EVEN: tl.constexpr,
            SPLIT: tl.constexpr):
        # SPLIT = 2: each step takes 2 * BLOCK_N keys as two sub-tiles (two smaller dots, one running-max update)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
        k_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None]  # (D, BLOCK_N)
        v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]  # (BLOCK_N, D)
        if EVEN:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(0, N, SPLIT * BLOCK_N):
            s, v = scores(q, k_ptrs, v_ptrs, start, offs_n, N, skn, svn, EVEN)
            if SPLIT == 2:
                s2, v2 = scores(q, k_ptrs, v_ptrs, start + BLOCK_N, offs_n, N, skn, svn, EVEN)
                m_new = tl.maximum(m_i, tl.maximum(tl.max(s, 1), tl.max(s2, 1)) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            if SPLIT == 2:
                p2 = tl.math.exp2(s2 * qk_scale - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1) + tl.sum(p2, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                acc = tl.dot(p2.to(v2.dtype), v2, acc)
            else:
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        o_ptrs = O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :]
        if EVEN:
            tl.store(o_ptrs, acc.to(O.dtype.element_ty))
        else:
            tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < N)

    _KERNEL.update(fwd=fwd, cdiv=triton.cdiv)
    return fwd


# (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT) for long and short sequences, chosen on an H200
# (bench/bench_attention.py --sweep)
LONG, SHORT = (64, 64, 4, 3, 2), (128, 64, 4, 3, 1)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    config: tuple | None = None) -> torch.Tensor:
    """q, k, v (B, heads, N, d), any strides with d contiguous -> output (B, N, heads * d), contiguous.
    One program per (BLOCK_M queries, sample, head); keys and values stream through in BLOCK_N tiles."""
    fwd = _kernel()
    B, H, N, D = q.shape
    o = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    bm, bn, warps, stages, split = config or (LONG if N >= 16384 else SHORT)
    grid = (_KERNEL["cdiv"](N, bm), B * H)
    fwd[grid](q, k, v, o, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(2), o.stride(1), H, N,
              scale * 1.4426950408889634, BLOCK_M=bm, BLOCK_N=bn, D=D, EVEN=N % bm == 0 and N % (split * bn) == 0,
              SPLIT=split, num_warps=warps, num_stages=stages)
    return o.flatten(2)


def uses_flash_kernel(q: torch.Tensor, dropout: float) -> bool:
    """Whether `attention` runs our kernel: CUDA, fp16/bf16, no autograd, no dropout, head size 16-128 (power of 2)."""
    d = q.shape[-1]
    return (kernels_run_on(q) and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
            and d in (16, 32, 64, 128) and not (torch.is_grad_enabled() and q.requires_grad) and q.stride(-1) == 1
            and _kernel() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention, q (B, heads, N, d), k/v (B, heads, M, d) -> (B, N, heads * d). Our kernel takes self-attention
    shapes (M == N); cross-attention to another sequence length goes to SDPA."""
    if (uses_flash_kernel(q, dropout) and k.shape == q.shape and v.shape == q.shape and k.stride(-1) == 1
            and v.stride(-1) == 1):
        return flash_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale).transpose(1, 2).flatten(2)
