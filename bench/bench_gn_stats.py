"""GroupNorm statistics on channels-last fp16 tensors: the tiled two-pass `stats` kernel against the per-slot Welford
`stats_cl` kernel (with a sweep of its tiling), next to a copy of the tensor and the `apply` pass as bandwidth
yardsticks; the error of each against an fp64 reference. One JSON line per measurement; $OUT/bench_gn_stats.jsonl.

Times are GPU time per call from CUDA-graph replays (`graph_ms`).

Run (device tool):  python3 bench/bench_gn_stats.py [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import event_ms  # noqa: E402
from records import jsonl_log  # noqa: E402

from fastmaisi.nets import fused_ops  # noqa: E402

SHAPES = [  # the UNet's GroupNorm inputs at a 128^3 latent (all levels), and decode slabs at 512^2
    (1, 64, 128, 128, 128), (1, 128, 128, 128, 128), (1, 192, 128, 128, 128), (1, 128, 64, 64, 64),
    (1, 384, 64, 64, 64), (1, 256, 32, 32, 32), (1, 768, 32, 32, 32), (1, 512, 16, 16, 16), (1, 1024, 16, 16, 16),
    (1, 64, 32, 512, 512), (1, 128, 16, 512, 512),
]


def graph_ms(fn, reps: int = 10) -> float:
    """GPU milliseconds per call of fn: `reps` calls captured in one CUDA graph and replayed, so that small kernels
    are timed without the host's launch overhead (which the UNet's eager loop hides behind the large kernels)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return event_ms(g.replay, 5) / reps


def merged(mean, m2, T, span, S):
    """Per-channel (mean, M2) in fp64 from the per-tile partials."""
    n_t = (S - torch.arange(T, device=mean.device, dtype=torch.float64) * span).clamp(0, span).view(1, T, 1)
    mean, m2 = mean.double(), m2.double()
    mean_c = (mean * n_t).sum(1) / S
    return mean_c, (m2 + n_t * (mean - mean_c[:, None]).square()).sum(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep the stats_cl tiling")
    args = ap.parse_args()
    log = jsonl_log("bench_gn_stats")
    k = fused_ops._triton_kernels()
    default = fused_ops._stats_cl_config
    configs = [None]
    if args.sweep:
        configs += [dict(block_c=c, block_s=s, num_warps=w, programs=p)
                    for c, s, w, p in itertools.product((64,), (32, 64), (4, 8), (1056, 2112))]
        configs = [configs[0]] + [dict(cfg, min_iters=i) for cfg in configs[1:] for i in (1, 2, 4, 8)]
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.float16).mul_(3).add_(1.5)
        x = x.to(memory_format=torch.channels_last_3d)
        B, C = shape[:2]
        ref = x.double().transpose(0, 1).reshape(C, -1)
        ref_mean = ref.mean(1)
        ref_m2 = (ref - ref_mean[:, None]).square().sum(1)
        del ref
        gb = x.numel() * 2 / 1e9
        row = {"shape": shape, "GB": round(gb, 3), "copy_ms": round(graph_ms(lambda: x.clone()), 4)}
        scale = torch.rand(B, C, device="cuda") + 0.5
        shift = torch.randn(B, C, device="cuda")
        row["apply_ms"] = round(graph_ms(lambda: fused_ops.scale_shift(x, scale, shift, True)), 4)

        def old():  # the two-pass kernel, which channels-last tensors used before
            return fused_ops._stats_two_pass(x, k)

        def errs(out):
            mean_c, m2_c = merged(*out)
            return (float((mean_c[0] - ref_mean).abs().max()), float(((m2_c[0] - ref_m2) / ref_m2).abs().max()))

        row["old_ms"] = round(graph_ms(old), 4)
        row["old_mean_err"], row["old_m2_relerr"] = errs(old())
        log(row)
        for cfg in configs:
            fused_ops._stats_cl_config = default if cfg is None else (lambda n, cfg=cfg: cfg)
            chosen, cfg = cfg is None, cfg or default(x.numel())
            try:
                ms = graph_ms(lambda: fused_ops._stats_tiles(x, k))
                e = errs(fused_ops._stats_tiles(x, k))
            except Exception as err:  # a tiling that does not compile (registers, shared memory)
                log({"shape": shape, **cfg, "error": str(err)[:200]})
                continue
            log({"shape": shape, "chosen": chosen, **cfg, "new_ms": round(ms, 4), "TBps": round(gb / ms, 2), "vs_old": round(row["old_ms"] / ms, 2),
                 "mean_err": e[0], "m2_relerr": e[1]})
        fused_ops._stats_cl_config = default


if __name__ == "__main__":
    main()
