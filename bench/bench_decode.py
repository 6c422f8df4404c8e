"""GPU benchmark and check of fastmaisi.decode: exact tiled decode/encode vs the whole-volume network.

MAISI's image autoencoder (official config), random weights. Reports, one JSON line each: accuracy of the tiled
path against `vae.decode` / `vae.encode` (fp32 with TF32 off, and fp16), time and measured peak GPU memory against
the planner's estimate and the budget, for 256^3 and 512^3 outputs. Writes $OUT/bench_decode.json when OUT is set.

Run (device tool):  python3 bench/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fastmaisi.decode import decode_latent, decode_latent_sliding_window, encode_image
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
from fastmaisi.variants import image_autoencoder_def

GiB = 1 << 30
dev = torch.device("cuda")
results = []


def emit(d):
    print(json.dumps(d), flush=True)
    results.append(d)


def rel(a, b):
    a, b = a.float().to(dev), b.float().to(dev)
    return float((a - b).abs().max() / b.abs().max())


def timed(fn, repeats=1):
    out, times = None, []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, times, (torch.cuda.max_memory_allocated() - base) / GiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-512", action="store_true")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    kwargs = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(**kwargs).to(dev).eval()
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn_benchmark": args.cudnn_benchmark})
    if args.skip_exact:
        return fp16_sections(args, vae, kwargs)

    # 1. exactness in fp32 (TF32 off): tiled with host-resident activations vs the whole-volume network
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    z = torch.randn(1, 4, 24, 32, 40, device=dev)
    with torch.no_grad():
        ref = vae.decode(z)
    for budget in (460 << 20, 700 << 20, 3 * GiB, None):
        (y, plan), times, peak = timed(lambda: decode_latent(vae, z, budget, return_plan=True))
        emit({"what": "fp32 decode exactness", "latent": list(z.shape), "budget_GiB": budget and budget / GiB,
              "rel_err": rel(y, ref), "slabs": plan.num_slabs, "host_GiB": plan.host_bytes / GiB,
              "peak_GiB": peak, "plan_peak_GiB": plan.peak_bytes / GiB, "plan": str(plan)})
    x = torch.randn(1, 1, 96, 128, 160, device=dev)
    with torch.no_grad():
        mu_ref, sig_ref = vae.encode(x)
    ((mu, sig), plan), times, peak = timed(lambda: encode_image(vae, x, 700 << 20, return_plan=True))
    emit({"what": "fp32 encode exactness", "image": list(x.shape), "rel_err_mu": rel(mu, mu_ref),
          "rel_err_sigma": rel(sig, sig_ref), "slabs": plan.num_slabs, "peak_GiB": peak,
          "plan_peak_GiB": plan.peak_bytes / GiB})
    del ref, y, mu_ref, sig_ref
    torch.backends.cudnn.allow_tf32 = True
    fp16_sections(args, vae, kwargs)


def fp16_sections(args, vae, kwargs):

    # 2. fp16, 256^3 output: whole-volume network vs tiled at several budgets
    vae16 = AutoencoderKlMaisi(**kwargs).to(dev).eval()
    vae16.load_state_dict(vae.state_dict())
    vae16.half()
    del vae
    z = torch.randn(1, 4, 64, 64, 64, device=dev, dtype=torch.float16)
    with torch.no_grad():
        ref, times, peak = timed(lambda: vae16.decode(z), 3)
        emit({"what": "fp16 whole-volume vae.decode NCDHW", "latent": [64] * 3, "s": times, "peak_GiB": peak})
        zc = z.contiguous(memory_format=torch.channels_last_3d)
        refc, times, peak = timed(lambda: vae16.decode(zc), 3)
        emit({"what": "fp16 whole-volume vae.decode channels_last_3d", "latent": [64] * 3, "s": times,
              "peak_GiB": peak, "rel_vs_ncdhw": rel(refc, ref)})
        del refc
    for budget in (None, 12 * GiB, 6 * GiB, 3 * GiB):
        (y, plan), times, peak = timed(lambda: decode_latent(vae16, z, budget, return_plan=True), 2)
        emit({"what": "fp16 decode_latent 256^3", "budget_GiB": budget and budget / GiB, "s": times,
              "peak_GiB": peak, "plan_peak_GiB": plan.peak_bytes / GiB, "rel_vs_whole": rel(y, ref),
              "slabs": plan.num_slabs, "tiled": plan.tiled, "est_s": plan.est_seconds, "plan": str(plan)})
        del y
    del ref
    if not args.quick:
        (y, times, peak) = timed(lambda: decode_latent_sliding_window(vae16, z, [48] * 3, overlap=0.25), 1)
        emit({"what": "fp16 sliding-window decode (reference-compatible), roi 48, overlap 0.25", "s": times,
              "peak_GiB": peak})
        del y

    # 3. fp16, 512^3 output
    if not args.skip_512:
        z = torch.randn(1, 4, 128, 128, 128, device=dev, dtype=torch.float16)
        outs = {}
        for budget in (None, 20 * GiB, 8 * GiB):
            torch.cuda.empty_cache()
            (y, plan), times, peak = timed(lambda: decode_latent(vae16, z, budget, return_plan=True), args.repeats)
            emit({"what": "fp16 decode_latent 512^3", "budget_GiB": budget and budget / GiB, "s": times,
                  "peak_GiB": peak, "plan_peak_GiB": plan.peak_bytes / GiB, "slabs": plan.num_slabs,
                  "host_GiB": plan.host_bytes / GiB, "out": plan.output_device, "est_s": plan.est_seconds,
                  "plan": str(plan)})
            outs[budget] = y.to("cpu", non_blocking=False) if y.is_cuda else y
            del y
        a = outs[None]
        for k, v in outs.items():
            emit({"what": "512^3 agreement across budgets", "budget_GiB": k and k / GiB,
                  "rel_vs_default": rel(v, a)})
        del outs, a
        torch.cuda.empty_cache()
        x = torch.randn(1, 1, 512, 512, 256, device=dev, dtype=torch.float16)
        for budget in (None, 8 * GiB):
            ((mu, sig), plan), times, peak = timed(lambda: encode_image(vae16, x, budget, return_plan=True),
                                                   args.repeats)
            emit({"what": "fp16 encode_image 512x512x256", "budget_GiB": budget and budget / GiB, "s": times,
                  "peak_GiB": peak, "plan_peak_GiB": plan.peak_bytes / GiB, "slabs": plan.num_slabs,
                  "est_s": plan.est_seconds, "plan": str(plan)})



if __name__ == "__main__":
    try:
        main()
    finally:
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as f:
                json.dump(results, f, indent=1)
