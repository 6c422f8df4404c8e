"""Seconds per ControlNet + UNet step (rflow-ct, latent 128^3, fp16, channels-last, random weights, eager): median
and min of 20 after 3 warm-up steps. For A/B runs of two code versions on one machine (run each from its tree).

Run (device tool):  python3 bench/step_time.py [label]
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, "bench")
from bench_nets import CNET_DEF, UNET_DEF, fp16_channels_last, inputs, step_fn  # noqa: E402

torch.manual_seed(0)
unet, cnet = fp16_channels_last(UNET_DEF), fp16_channels_last(CNET_DEF)
step = step_fn(unet, cnet, inputs([128, 128, 128]), torch.channels_last_3d)
try:  # derived weights once, as the pipelines' sampling loops run (absent before the explicit blocks: nothing)
    from fastmaisi.nets.derived import reuse_derived_weights
except ImportError:
    from contextlib import nullcontext as reuse_derived_weights
with torch.no_grad(), reuse_derived_weights(unet, cnet):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
label = sys.argv[1] if len(sys.argv) > 1 else ""
print(f"{label} step median {statistics.median(ts) * 1e3:.2f} ms, min {min(ts) * 1e3:.2f} ms", flush=True)
