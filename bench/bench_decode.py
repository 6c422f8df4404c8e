"""GPU benchmark and check of fastmaisi.decode against the whole-volume network and the MONAI reference (issue 3).

MAISI's image autoencoder (official config), random weights (timings do not depend on them), fp16. One JSON line per
measurement; `$OUT/bench_decode.json` at the end. Sections (`--sections`, default all, in this order):

  exact     tiled vs whole-volume network in fp32 (TF32 off) and fp16 at 256^3: max |ours - whole| / max |whole|
  whole512  512^3 with no budget (the device's free memory), cuDNN autotuning off and on
  budget    512^3 at 12, 16, 20, 24 GiB (3 calls: the first pins host memory), 512x512x768 at 16 GiB
  encode    512x512x256 encode, no budget and 8 GiB
  reference MONAI AutoencoderKlMaisi decode with the reference presets (SlidingWindowInferer, CPU stitching)
  profile   torch.profiler: the CUDA kernels that take the time, whole volume and at 12 GiB

Run (device tool):  python3 bench/bench_decode.py [--sections exact whole512 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fastmaisi.decode import decode_latent, encode_image, free_host_memory
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
from fastmaisi.variants import image_autoencoder_def

GiB = 1 << 30
dev = torch.device("cuda")
results = []
SECTIONS = ["exact", "whole512", "budget", "encode", "reference", "profile"]
# the reference presets at 512^3 (shared/baselines): window (latent voxels), overlap, conv splits
PRESETS = [((80, 80, 80), 0.4, 4), ((64, 64, 48), 0.4, 2)]


def emit(d):
    print(json.dumps(d), flush=True)
    results.append(d)


def rel(a, b):
    a, b = a.float().to(dev), b.float().to(dev)
    return float((a - b).abs().max() / b.abs().max())


def timed(fn, repeats=1):
    """(last output, seconds per call, peak allocated GiB above what was allocated before)."""
    out, times = None, []
    for _ in range(repeats):
        out = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(round(time.perf_counter() - t, 3))
    return out, times, round((torch.cuda.max_memory_allocated() - base) / GiB, 2)


def ours_decode(vae, z, budget, what, repeats=2, **extra):
    (y, plan), times, peak = timed(lambda: decode_latent(vae, z, budget, return_plan=True), repeats)
    emit({"what": what, "latent": list(z.shape[2:]), "budget_GiB": budget and budget / GiB, "s": times,
          "peak_GiB": peak, "plan_peak_GiB": round(plan.peak_bytes / GiB, 2), "slabs": plan.num_slabs,
          "host_GiB": plan.host_bytes / GiB, "est_s": round(plan.est_seconds, 2), "plan": str(plan), **extra})
    return y


def exact(vae32, vae16):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    z = torch.randn(1, 4, 24, 32, 40, device=dev)
    with torch.no_grad():
        ref = vae32.decode(z)
    for budget in (560 << 20, 3 * GiB):  # the smaller: just above the least that holds one slab (~500 MiB)
        (y, plan), _, peak = timed(lambda: decode_latent(vae32, z, budget, return_plan=True))
        emit({"what": "fp32 decode, tiled vs whole-volume network", "latent": list(z.shape[2:]),
              "budget_GiB": budget / GiB, "max_rel_err": rel(y, ref), "slabs": plan.num_slabs,
              "host_GiB": plan.host_bytes / GiB, "peak_GiB": peak})
    x = torch.randn(1, 1, 96, 128, 160, device=dev)
    with torch.no_grad():
        mu_ref, sig_ref = vae32.encode(x)
    ((mu, sig), plan), _, peak = timed(lambda: encode_image(vae32, x, 700 << 20, return_plan=True))
    emit({"what": "fp32 encode, tiled vs whole-volume network", "image": list(x.shape[2:]),
          "max_rel_err_mu": rel(mu, mu_ref), "max_rel_err_sigma": rel(sig, sig_ref), "slabs": plan.num_slabs})
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    z = torch.randn(1, 4, 64, 64, 64, device=dev, dtype=torch.float16)
    with torch.no_grad():
        whole, times, peak = timed(lambda: vae16.decode(z), 2)
    emit({"what": "fp16 whole-volume network 256^3", "s": times, "peak_GiB": peak})
    for budget in (None, 3 * GiB):
        y = ours_decode(vae16, z, budget, "fp16 decode_latent 256^3")
        emit({"what": "fp16 256^3 tiled vs whole-volume network", "budget_GiB": budget and budget / GiB,
              "max_rel_err": rel(y, whole)})


def whole512(vae16):
    z = torch.randn(1, 4, 128, 128, 128, device=dev, dtype=torch.float16)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        y = ours_decode(vae16, z, None, "fp16 decode_latent 512^3, no budget", 3, cudnn_benchmark=bench)
        del y
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False


def budget(vae16):
    z = torch.randn(1, 4, 128, 128, 128, device=dev, dtype=torch.float16)
    outs = {}
    budgets = (12 * GiB, 16 * GiB, 20 * GiB, 24 * GiB)
    for b in budgets:
        outs[b] = ours_decode(vae16, z, b, "fp16 decode_latent 512^3 under a budget", 3).cpu()
        torch.cuda.empty_cache()
    outs[None] = decode_latent(vae16, z).cpu()
    for b in budgets:
        emit({"what": "512^3 budget vs no budget", "budget_GiB": b / GiB, "max_rel_diff": rel(outs[b], outs[None])})
    del outs
    free_host_memory()
    torch.cuda.empty_cache()
    z = torch.randn(1, 4, 128, 128, 192, device=dev, dtype=torch.float16)
    y = ours_decode(vae16, z, 16 * GiB, "fp16 decode_latent 512x512x768 under a budget")
    del y
    free_host_memory()
    torch.cuda.empty_cache()


def encode(vae16):
    x = torch.rand(1, 1, 512, 512, 256, device=dev, dtype=torch.float16)
    outs = {}
    for b in (None, 8 * GiB):
        ((mu, sig), plan), times, peak = timed(lambda: encode_image(vae16, x, b, return_plan=True), 2)
        outs[b] = mu
        emit({"what": "fp16 encode_image 512x512x256", "budget_GiB": b and b / GiB, "s": times, "peak_GiB": peak,
              "plan_peak_GiB": round(plan.peak_bytes / GiB, 2), "slabs": plan.num_slabs,
              "est_s": round(plan.est_seconds, 2), "plan": str(plan)})
    emit({"what": "encode 8 GiB vs no budget", "max_rel_diff": rel(outs[8 * GiB], outs[None])})
    free_host_memory()
    torch.cuda.empty_cache()


def reference(state, kwargs):
    """MONAI's class, fp16 autocast, the preset's window / overlap / splits, stitched on the CPU (as NVIDIA's
    inference script does). First a small warm-up decode."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi as MonaiVAE
    from monai.inferers import SlidingWindowInferer

    ref = MonaiVAE(**kwargs).to(dev).eval()
    ref.load_state_dict(state)
    z = torch.randn(1, 4, 128, 128, 128, device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ref.decode_stage_2_outputs(z[:, :, :32, :32, :32])
        for roi, overlap, splits in PRESETS:
            for m in ref.modules():
                if hasattr(m, "num_splits"):
                    m.num_splits = splits
            inferer = SlidingWindowInferer(roi_size=list(roi), sw_batch_size=1, mode="gaussian", overlap=overlap,
                                           sw_device=dev, device=torch.device("cpu"), progress=False)
            _, times, peak = timed(lambda: inferer(network=ref.decode_stage_2_outputs, inputs=z), 1)
            emit({"what": "reference decode 512^3 (MONAI, sliding window)", "window": list(roi), "overlap": overlap,
                  "splits": splits, "s": times, "peak_GiB": peak})
    del ref
    torch.cuda.empty_cache()


def profile(vae16):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    z = torch.randn(1, 4, 128, 128, 128, device=dev, dtype=torch.float16)
    for b in (None, 12 * GiB):
        decode_latent(vae16, z, b)  # warm (host pool, kernels)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            decode_latent(vae16, z, b)
            torch.cuda.synchronize()
        rows = []
        for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:14]:
            rows.append({"name": e.key[:90], "calls": e.count, "cuda_ms": round(e.device_time_total / 1e3, 1)})
        emit({"what": "profile decode 512^3", "budget_GiB": b and b / GiB, "top_cuda": rows})
    free_host_memory()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    args = ap.parse_args()
    kwargs = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae32 = AutoencoderKlMaisi(**kwargs).to(dev).eval()
    with torch.no_grad():
        for p in vae32.parameters():  # MONAI's init zeroes some convs: perturb everything so no work is skipped
            p.add_(torch.randn_like(p) * 0.01)
    vae16 = AutoencoderKlMaisi(**kwargs).to(dev).eval()
    vae16.load_state_dict(vae32.state_dict())
    vae16.half()
    state = {k: v.cpu() for k, v in vae32.state_dict().items()}
    if "exact" not in args.sections:
        del vae32
        torch.cuda.empty_cache()
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "weights": "random"})
    for name in args.sections:
        t0 = time.perf_counter()
        if name == "exact":
            exact(vae32, vae16)
        elif name == "reference":
            reference(state, kwargs)
        else:
            globals()[name](vae16)
        print(f"# section {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        if name == "exact":
            del vae32
            torch.cuda.empty_cache()


if __name__ == "__main__":
    try:
        main()
    finally:
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as f:
                json.dump(results, f, indent=1)
