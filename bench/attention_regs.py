"""Experiment: does capping registers (Triton's `maxnreg`) raise the occupancy of our flash-attention kernel enough
to speed it up at the 32^3 level ([1, 8, 32768, 32], fp16)? Prints registers, spills, time and max error against
fp32 SDPA per (config, maxnreg).

Run (device tool):  python3 bench/attention_regs.py   -> $OUT/attention_regs.jsonl
"""

import torch

from bench_attention import inputs_and_reference
from cuda_timing import event_ms
from records import jsonl_log
from fastmaisi.nets import attention as A


def launch(q, k, v, scale, cfg, maxnreg):
    bm, bn, warps, stages, split = cfg
    B, H, N, D = q.shape
    o = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    kernel = A._kernel()[(N // bm, B * H)](
        q, k, v, o, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(2), o.stride(1), H, N,
        scale * 1.4426950408889634, BLOCK_M=bm, BLOCK_N=bn, D=D, EVEN=True, SPLIT=split, num_warps=warps,
        num_stages=stages, **extra)
    return o.flatten(2), kernel


def main():
    emit = jsonl_log("attention_regs")
    q, k, v, scale, ref = inputs_and_reference()
    for cfg in [A.LONG, (64, 64, 4, 2, 2), (64, 128, 4, 3, 1), (128, 64, 8, 3, 2)]:
        for maxnreg in (None, 168, 128, 96):
            try:
                out, kern = launch(q, k, v, scale, cfg, maxnreg)
                ms = event_ms(lambda: launch(q, k, v, scale, cfg, maxnreg), 20)
                emit({"config": cfg, "maxnreg": maxnreg, "ms": round(ms, 3), "n_regs": getattr(kern, "n_regs", None),
                      "n_spills": getattr(kern, "n_spills", None), "max_err": (out.float() - ref).abs().max().item()})
            except Exception as e:  # noqa: BLE001 - an experiment reports and goes on
                emit({"config": cfg, "maxnreg": maxnreg, "error": f"{type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    main()
