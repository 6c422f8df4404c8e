"""The mask DM's step (64^3 latent, fp16, CUDA graph) in NCDHW and channels-last: time, peak and the difference of
the outputs (fp16 rounding). Random weights.

Run (device tool):  python3 bench/bench_mask_layout.py
"""
import json, time, torch
from fastmaisi.nets import build
from fastmaisi.variants import MASK_DIFFUSION_DEF
from fastmaisi.pipelines.sampling import mask_denoiser
from fastmaisi.nets.graphs import CudaGraphed
dev = "cuda"
torch.manual_seed(0)
net = build(dict(MASK_DIFFUSION_DEF)).to(dev).half().eval()
ctx = torch.rand(1, 1, 10, device=dev, dtype=torch.float16)
x = torch.randn(1, 4, 64, 64, 64, device=dev, dtype=torch.float16)
t = torch.full((1,), 500.0, device=dev)
outs = {}
for rep in range(2):
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        net = net.to(memory_format=fmt)
        den = CudaGraphed(mask_denoiser(net, ctx))
        with torch.no_grad():
            y = den(x, t); y = den(x, t); torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(300):
                y = den(x, t)
            torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / 300
        outs[str(fmt)] = y.float()
        print(json.dumps({"fmt": str(fmt), "step_ms": round(dt * 1e3, 3), "x1000_s": round(dt * 1000, 2),
                          "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
        del den
a, b = outs.values()
print("rel diff CL vs NCDHW", ((a - b).abs().max() / a.abs().max()).item())
