"""GPU benchmark: our Triton flash-attention forward (`nets.attention`) against PyTorch's SDPA backends at the
UNet's attention shapes (head size 32; q/k/v as views of one fused QKV projection, as `SelfAttention` makes them).
Error is max |out - fp32 reference| (fp32 SDPA, memory-efficient backend), for ours and for cuDNN.

Run (device tool):  python3 bench/bench_attention.py [--sweep]   -> $OUT/bench_attention.jsonl
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import event_ms
from records import jsonl_log
from fastmaisi.nets import attention as A


def inputs_and_reference(B=1, H=8, N=32768, d=32):
    """Self-attention inputs (default: the 32^3 level; fp16 q, k, v as strided views of one QKV tensor, as the UNet
    makes them), the scale, and the fp32 SDPA output (B, N, H * d) to measure errors against."""
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=torch.float16) * 1.5
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = d ** -0.5
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).transpose(1, 2).flatten(2)
    return q, k, v, scale, ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    emit = jsonl_log("bench_attention")

    for B, H, N in [(1, 8, 32768), (1, 16, 4096), (1, 8, 4913)]:
        d = 32
        q, k, v, scale, ref = inputs_and_reference(B, H, N, d)
        flops = 4 * B * H * N * N * d
        for name, fn in [
            ("sdpa_default", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)),
            ("sdpa_flash", None),
            ("ours", lambda: A.flash_attention(q, k, v, scale)),
        ]:
            if name == "sdpa_flash":
                def fn():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, scale=scale)
            try:
                ms = event_ms(fn)
                o = fn()
                o = o if o.dim() == 3 else o.transpose(1, 2).flatten(2)
                err = (o.float() - ref).abs().max().item()
                rec = {"shape": [B, H, N, d], "impl": name, "ms": round(ms, 3), "TFLOPs": round(flops / ms / 1e9, 1),
                       "max_err": err}
            except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
                rec = {"shape": [B, H, N, d], "impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            emit(rec)
        if args.sweep:
            configs = ([(bm, bn, 4, st, sp) for bm, bn in [(64, 64), (64, 32), (64, 128), (128, 64)]
                        for st in (2, 3, 4) for sp in (1, 2)] + [(128, 64, 8, 3, 1), (128, 64, 8, 3, 2)]
                       if N >= 16384 else [(bm, 64, 4, 3, sp) for bm in (64, 128) for sp in (1, 2)])
            for cfg in configs:
                try:
                    ms = event_ms(lambda: A.flash_attention(q, k, v, scale, config=cfg), reps=10)
                    err = (A.flash_attention(q, k, v, scale, config=cfg).float() - ref).abs().max().item()
                    emit({"shape": [B, H, N, d], "config": list(cfg), "ms": round(ms, 3), "max_err": err})
                except Exception as e:  # noqa: BLE001
                    emit({"shape": [B, H, N, d], "config": list(cfg), "error": f"{type(e).__name__}"})

if __name__ == "__main__":
    main()
