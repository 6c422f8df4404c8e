"""GPU benchmark of the weight-derived tensors (upsample transposed-conv weights, thin_conv packs, the ControlNet's
condition embedding), for the code of the tree it runs from, beside NVIDIA's reference (MONAI's MAISI classes, fp16
autocast) in the same run. Run it from the tree before the change (fd0918a: implicit caches) and after (explicit
`reuse_derived_weights` blocks) on one machine; it works on both.

  step   rflow-ct ControlNet + UNet step at a 128^3 latent (fp16, channels-last, condition embedded once as
         `image_denoiser` does): ours eager, ours from a CUDA graph, ours eager outside any block (derived weights per
         call; after the change only), reference (embeds the condition every step, as NVIDIA's loop does); and the
         mask DM step at 64^3: ours eager / graph, reference.
  stage  the 512^3 image stage: 30-step loop + decode. Ours: `sampling.sample` + the exact `decode_latent` under a
         budget. Reference: the same 30 steps with MONAI's classes + MONAI's sliding-window decode (80^3 latent
         window, overlap 0.4, 4 splits, stitched on the CPU: NVIDIA's 80 GB preset).

Peak memory is torch.cuda.max_memory_allocated per measurement. Random weights (timings do not depend on them).

Run:  python3 bench/bench_derived_weights.py OUT.json [--sections step stage] [--repeats 20] [--budget 12]
CPU smoke test (tiny sizes, fp32):  python3 bench/bench_derived_weights.py /tmp/x.json --device cpu --latent 8 8 8
      --mask-latent 8 8 8 --repeats 1 --stage-repeats 1 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nets import CNET_DEF, UNET_DEF  # noqa: E402

from fastmaisi.nets import build  # noqa: E402

results: list[dict] = []


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    results.append(row)


def block(*nets):
    """The explicit reuse block where the tree has one (after the change), else nothing (implicit caches before)."""
    try:
        from fastmaisi.nets.derived import reuse_derived_weights
    except ImportError:
        return contextlib.nullcontext()
    return reuse_derived_weights(*nets)


def has_blocks() -> bool:
    try:
        import fastmaisi.nets.derived  # noqa: F401
    except ImportError:
        return False
    return True


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, dev, repeats, warmup=2):
    """Median and min seconds of `repeats` calls after `warmup`, and the peak over all of them."""
    reset_peak(dev)
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times), peak_gib(dev)


def perturbed(net, scale=0.02):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


def image_nets(dev, dtype):
    """MONAI's ControlNet + UNet (fp32, autocast at run time) and ours with the same weights (dtype, channels-last
    on CUDA, as `pipelines.models` loads them)."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    def kw(d):  # (MONAI's flash attention needs CUDA: off for a CPU smoke run)
        return {k: v for k, v in d.items() if k != "_target_"} | {"use_flash_attention": dev.type == "cuda"}

    torch.manual_seed(0)
    ref_unet = perturbed(DiffusionModelUNetMaisi(**kw(UNET_DEF))).to(dev).eval()
    ref_cnet = perturbed(ControlNetMaisi(**kw(CNET_DEF))).to(dev).eval()
    fmt = torch.channels_last_3d if dev.type == "cuda" else torch.contiguous_format
    unet, cnet = build(UNET_DEF), build(CNET_DEF)
    unet.load_state_dict(ref_unet.state_dict())
    cnet.load_state_dict(ref_cnet.state_dict())
    unet = unet.to(dev, dtype).eval().requires_grad_(False).to(memory_format=fmt)
    cnet = cnet.to(dev, dtype).eval().requires_grad_(False).to(memory_format=fmt)
    return ref_unet, ref_cnet, unet, cnet, fmt


def image_inputs(lat, dev, dtype, fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *lat, generator=g)
    label = torch.randint(0, 133, (1, 1, *[4 * s for s in lat]), generator=g, dtype=torch.uint8)
    return dict(x=x.to(dev, dtype).contiguous(memory_format=fmt), x32=x.to(dev), label=label.to(dev),
                t=torch.tensor([500.0], device=dev), spacing=torch.tensor([[100.0, 100.0, 100.0]], device=dev),
                cls=torch.tensor([1], device=dev))


def reference_denoiser(ref_unet, ref_cnet, inp, dev):
    """NVIDIA's step: ControlNet on the 8 bit-channels (embedded every step), then the UNet, fp16 autocast."""
    from fastmaisi.labels import binarize_labels

    cond = binarize_labels(inp["label"], dtype=torch.float32)

    def step(x, t):
        with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            down, mid = ref_cnet(x=x, timesteps=t, controlnet_cond=cond, class_labels=inp["cls"])
            return ref_unet(x=x, timesteps=t, spacing_tensor=inp["spacing"], class_labels=inp["cls"],
                            down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return step


def our_denoiser(unet, cnet, inp, dtype):
    from fastmaisi.pipelines.sampling import image_denoiser

    return image_denoiser(unet, cnet, spacing=inp["spacing"].to(dtype), class_labels=inp["cls"],
                          condition=inp["label"])


def graphed(fn, dev):
    if dev.type != "cuda":
        return fn
    from fastmaisi.nets.graphs import CudaGraphed

    return CudaGraphed(fn)


def section_step(args, dev, dtype):
    ref_unet, ref_cnet, unet, cnet, fmt = image_nets(dev, dtype)
    inp = image_inputs(args.latent, dev, dtype, fmt)
    x, t = inp["x"], inp["t"]
    with torch.no_grad():
        ref = reference_denoiser(ref_unet, ref_cnet, inp, dev)
        want, med, best, peak = timed(lambda: ref(inp["x32"], t), dev, args.repeats)
        emit({"what": "dm_step", "latent": args.latent, "mode": "reference (MONAI, fp16 autocast)",
              "ms_median": round(med * 1e3, 2), "ms_min": round(best * 1e3, 2), "peak_alloc_GiB": peak})
        modes = [("ours eager, in block", False, True), ("ours cuda graph, in block", True, True)]
        if has_blocks():
            modes.append(("ours eager, no block (derived per call)", False, False))
        for name, use_graph, in_block in modes:
            with block(unet, cnet) if in_block else contextlib.nullcontext():
                denoise = our_denoiser(unet, cnet, inp, dtype)
                fn = graphed(denoise, dev) if use_graph else denoise
                out, med, best, peak = timed(lambda: fn(x, t), dev, args.repeats)
            emit({"what": "dm_step", "latent": args.latent, "mode": name, "ms_median": round(med * 1e3, 2),
                  "ms_min": round(best * 1e3, 2), "peak_alloc_GiB": peak,
                  "rel_diff_vs_reference": float((out.float() - want.float()).abs().max() / want.float().abs().max())})
            del denoise, fn
    del ref_unet, ref_cnet, unet, cnet
    mask_step(args, dev, dtype)


def mask_step(args, dev, dtype):
    from monai.networks.nets import DiffusionModelUNet as MonaiUNet

    from fastmaisi.variants import MASK_DIFFUSION_DEF

    kw = {k: v for k, v in MASK_DIFFUSION_DEF.items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = perturbed(MonaiUNet(**kw)).to(dev).eval()
    ours = build(MASK_DIFFUSION_DEF)
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(dev, dtype).eval().requires_grad_(False)
    if dev.type == "cuda":
        ours = ours.to(memory_format=torch.channels_last_3d)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, *args.mask_latent, generator=g).to(dev)
    ctx = torch.rand(1, 1, 10, generator=g).to(dev)
    t = torch.tensor([500.0], device=dev)
    with torch.no_grad():
        def reference():
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                return ref(x=x, timesteps=t, context=ctx)

        want, med, best, peak = timed(reference, dev, args.repeats)
        emit({"what": "mask_dm_step", "latent": args.mask_latent, "mode": "reference (MONAI, fp16 autocast)",
              "ms_median": round(med * 1e3, 3), "ms_min": round(best * 1e3, 3), "peak_alloc_GiB": peak})
        xd, cd = x.to(dtype), ctx.to(dtype)
        for name, use_graph in [("ours eager, in block", False), ("ours cuda graph, in block", True)]:
            with block(ours):
                fn = graphed(lambda a, b: ours(x=a, timesteps=b, context=cd), dev) if use_graph else (
                    lambda a, b: ours(x=a, timesteps=b, context=cd))
                out, med, best, peak = timed(lambda: fn(xd, t), dev, max(args.repeats, 20))
            emit({"what": "mask_dm_step", "latent": args.mask_latent, "mode": name, "ms_median": round(med * 1e3, 3),
                  "ms_min": round(best * 1e3, 3), "peak_alloc_GiB": peak,
                  "rel_diff_vs_reference": float((out.float() - want.float()).abs().max() / want.float().abs().max())})


def image_vae(dev, dtype):
    from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
    from fastmaisi.variants import image_autoencoder_def

    kwargs = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = perturbed(AutoencoderKlMaisi(**kwargs), 0.01).eval()
    return vae.to(dev, dtype).requires_grad_(False), kwargs, {k: v.float().cpu() for k, v in vae.state_dict().items()}


def section_stage(args, dev, dtype):
    from fastmaisi.decode import decode_latent
    from fastmaisi.pipelines.sampling import sample
    from fastmaisi.schedulers import build as build_scheduler
    from fastmaisi.variants import RFLOW_SCHEDULER_DEF

    ref_unet, ref_cnet, unet, cnet, fmt = image_nets(dev, dtype)
    vae, vae_kwargs, vae_state = image_vae(dev, dtype)
    inp = image_inputs(args.latent, dev, dtype, fmt)
    budget = args.budget << 30 if dev.type == "cuda" else None
    with torch.no_grad():
        for call in range(args.stage_repeats):
            reset_peak(dev)
            t0 = time.perf_counter()
            with block(unet, cnet):
                z = sample(our_denoiser(unet, cnet, inp, dtype), build_scheduler(RFLOW_SCHEDULER_DEF), inp["x"],
                           args.steps, disable=True, cuda_graph=True)
            sync(dev)
            t1 = time.perf_counter()
            with block(vae):
                y = decode_latent(vae, z, budget)
            sync(dev)
            t2 = time.perf_counter()
            emit({"what": "image_stage", "mode": "ours", "call": call, "latent": args.latent, "steps": args.steps,
                  "loop_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3), "s": round(t2 - t0, 3),
                  "peak_alloc_GiB": peak_gib(dev), "output": list(y.shape)})
            del z, y
        del unet, cnet, vae
        if args.no_reference_stage:
            return
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi as MonaiVAE
        from monai.inferers import SlidingWindowInferer

        # (its fp16 GroupNorm needs autocast, i.e. CUDA: off for a CPU smoke run)
        ref_vae = MonaiVAE(**vae_kwargs | ({} if dev.type == "cuda" else {"norm_float16": False})).to(dev).eval()
        ref_vae.load_state_dict(vae_state)
        for m in ref_vae.modules():
            if hasattr(m, "num_splits"):
                m.num_splits = 4 if min(args.latent) >= 64 else 1  # (a tiny CPU smoke latent cannot be split)
        roi = [min(80, s) for s in args.latent]
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, mode="gaussian", overlap=0.4, sw_device=dev,
                                       device=torch.device("cpu"), progress=False)
        ref = reference_denoiser(ref_unet, ref_cnet, inp, dev)
        reset_peak(dev)
        t0 = time.perf_counter()
        z = sample(ref, build_scheduler(RFLOW_SCHEDULER_DEF), inp["x32"], args.steps, disable=True)
        sync(dev)
        t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            y = inferer(network=ref_vae.decode_stage_2_outputs, inputs=z)
        sync(dev)
        t2 = time.perf_counter()
        emit({"what": "image_stage", "mode": "reference (MONAI classes, sliding-window decode 80^3/0.4/4 splits)",
              "latent": args.latent, "steps": args.steps, "loop_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3),
              "s": round(t2 - t0, 3), "peak_alloc_GiB": peak_gib(dev), "output": list(y.shape)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--sections", nargs="+", choices=["step", "stage"], default=["step", "stage"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--latent", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--mask-latent", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stage-repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=12, help="decode budget, GiB")
    ap.add_argument("--no-reference-stage", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    emit({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
          "commit": commit, "explicit_blocks": has_blocks(), "args": vars(args)})
    try:
        for name in args.sections:
            {"step": section_step, "stage": section_stage}[name](args, dev, dtype)
    finally:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
