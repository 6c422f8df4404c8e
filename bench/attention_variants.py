"""Experiment: is the head-size-32 flash-attention forward bound by the exp2 unit (MUFU)? Variants of the kernel in
`fastmaisi.nets.attention`: each key tile is split in two sub-tiles (BN1 keys with hardware exp2, BN2 keys with a
polynomial exp2 on the FMA units, as FlashAttention-4 does), a diagnostic variant with no exp at all (wrong
results; only its time matters), and (session 9) exp2 of the fp16-rounded exponent on packed halves
(`ex2.approx.f16x2`: two exps an instruction, P comes out in fp16 for the P @ V matmul), its row sums by fp32
reductions or by a matmul with ones. Times and max error against fp32 SDPA at [1, 8, 32768, 32].

Run (device tool):  python3 bench/attention_variants.py   -> $OUT/attention_variants.jsonl
"""

import itertools

import torch
import triton
import triton.language as tl

from bench_attention import inputs_and_reference
from cuda_timing import event_ms
from records import jsonl_log
from fastmaisi.nets import attention as A


@triton.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA units: 2^floor(x) by exponent-bit arithmetic times a cubic for 2^frac (rel. err 1.5e-4)."""
    x = tl.maximum(x, -126.0)
    xi = tl.floor(x)
    f = x - xi
    p = 0.07802334 * f + 0.22606642  # near-minimax cubic for 2^f on [0, 1): relative error 7.5e-5
    p = p * f + 0.69583512
    p = p * f + 0.99992492
    bits = p.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_f16x2(x):
    """2^x for fp16 x, two at a time on the MUFU unit (ex2.approx.f16x2), result fp16."""
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=True,
                                     pack=2)


@triton.jit
def fwd_split(Q, K, V, O, sqh, sqn, skh, skn, svh, svn, soh, son, N, qk_scale,
              BLOCK_M: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    o1 = tl.arange(0, BN1)
    o2 = tl.arange(0, BN2)
    q = tl.load(Q + h * sqh + offs_m[:, None] * sqn + offs_d[None, :])
    k1p = K + h * skh + o1[None, :] * skn + offs_d[:, None]
    v1p = V + h * svh + o1[:, None] * svn + offs_d[None, :]
    k2p = K + h * skh + (BN1 + o2)[None, :] * skn + offs_d[:, None]
    v2p = V + h * svh + (BN1 + o2)[:, None] * svn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc_l = tl.zeros([BLOCK_M, 16], tl.float32)
    ones1 = tl.full([BN1, 16], 1.0, tl.float16)
    ones2 = tl.full([BN2, 16], 1.0, tl.float16)
    for start in range(0, N, BN):
        k1 = tl.load(k1p + start * skn)
        v1 = tl.load(v1p + start * svn)
        k2 = tl.load(k2p + start * skn)
        v2 = tl.load(v2p + start * svn)
        s1 = tl.dot(q, k1)
        s2 = tl.dot(q, k2)
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s1, 1), tl.max(s2, 1)) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        if MODE >= 3:  # fp16 exponents, packed-half exp2, P in fp16
            p1h = _exp2_f16x2((s1 * qk_scale - m_new[:, None]).to(tl.float16))
            p2h = _exp2_f16x2((s2 * qk_scale - m_new[:, None]).to(tl.float16))
            if MODE == 3:
                l_i = l_i * alpha + tl.sum(p1h.to(tl.float32), 1) + tl.sum(p2h.to(tl.float32), 1)
            else:  # row sums on the tensor cores: P @ ones into a (BLOCK_M, 16) accumulator
                acc_l = tl.dot(p2h, ones2, tl.dot(p1h, ones1, acc_l * alpha[:, None]))
            acc = acc * alpha[:, None] + tl.dot(p1h, v1)
            acc = tl.dot(p2h, v2, acc)
        else:
            if MODE == 1:  # diagnostic: no exp at all
                p1 = s1 * qk_scale - m_new[:, None]
                p2 = s2 * qk_scale - m_new[:, None]
            else:
                p1 = tl.math.exp2(s1 * qk_scale - m_new[:, None])
                if MODE == 2:
                    p2 = _exp2_poly(s2 * qk_scale - m_new[:, None])
                else:
                    p2 = tl.math.exp2(s2 * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
            acc = acc * alpha[:, None] + tl.dot(p1.to(v1.dtype), v1)
            acc = tl.dot(p2.to(v2.dtype), v2, acc)
        m_i = m_new
    if MODE == 4:
        l_i = tl.max(acc_l, 1)
    acc = acc / l_i[:, None]
    tl.store(O + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty))


def run_split(q, k, v, scale, bm, bn1, bn2, warps, stages, mode):
    B, H, N, D = q.shape
    o = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    fwd_split[(N // bm, H)](q, k, v, o, q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
                            o.stride(2), o.stride(1), N, scale * 1.4426950408889634, BLOCK_M=bm, BN1=bn1, BN2=bn2, BN=bn1 + bn2,
                            D=D, MODE=mode, num_warps=warps, num_stages=stages)
    return o.flatten(2)


MODES = (0, 3, 4)  # session 8 ran (0, 1, 2)


def main():
    emit = jsonl_log("attention_variants")
    q, k, v, scale, ref = inputs_and_reference()
    ms = event_ms(lambda: A.flash_attention(q, k, v, scale))
    emit({"impl": "ours (nets.attention)", "ms": round(ms, 3),
          "max_err": (A.flash_attention(q, k, v, scale).float() - ref).abs().max().item()})
    for mode, (bm, bn1, bn2), (w, s) in itertools.product(
            MODES, [(64, 32, 32), (64, 64, 32), (64, 64, 64), (128, 64, 32), (128, 32, 32), (128, 64, 64)],
            [(4, 3), (4, 4), (8, 3)]):
        try:
            fn = lambda: run_split(q, k, v, scale, bm, bn1, bn2, w, s, mode)  # noqa: E731
            ms = event_ms(fn, 10)
            err = (fn().float() - ref).abs().max().item()
            emit({"mode": ["exp2", "no-exp (diagnostic)", "poly for BN2", "f16x2 exp2", "f16x2 exp2, sums by dot"][mode], "config": [bm, bn1, bn2, w, s],
                  "ms": round(ms, 3), "max_err": err})
        except Exception as e:  # noqa: BLE001 - an experiment reports and goes on
            emit({"mode": mode, "config": [bm, bn1, bn2, w, s], "error": f"{type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    main()
