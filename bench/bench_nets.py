"""GPU benchmark: one ControlNet+UNet step, ours vs MONAI's MAISI classes in the same process (issue 2).

Random weights (MONAI's init, then every parameter perturbed so no zero-init conv hides work), copied strictly into
ours. Reference = MONAI under fp16 autocast, as NVIDIA's pipeline runs it. Ours = the same weights in our classes,
several execution modes. Also reports accuracy of each against an fp32 run of the reference at a smaller latent.
Prints one JSON line per measurement and a table; writes $OUT/bench_nets.json.

Run (device tool):  python3 bench/bench_nets.py [--latent 128 128 128] [--repeats 10] [--image-stage 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastmaisi.nets import build

UNET_DEF = dict(_target_="DiffusionModelUNetMaisi", spatial_dims=3, in_channels=4, out_channels=4,
                num_channels=[64, 128, 256, 512], attention_levels=[False, False, True, True],
                num_head_channels=[0, 0, 32, 32], num_res_blocks=2, use_flash_attention=True,
                include_top_region_index_input=False, include_bottom_region_index_input=False,
                include_spacing_input=True, num_class_embeds=128, resblock_updown=True, include_fc=True)
CNET_DEF = dict(_target_="ControlNetMaisi", spatial_dims=3, in_channels=4, num_channels=[64, 128, 256, 512],
                attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
                use_flash_attention=True, conditioning_embedding_in_channels=8,
                conditioning_embedding_num_channels=[8, 32, 64], num_class_embeds=128, resblock_updown=True,
                include_fc=True)

dev = torch.device("cuda")
results = []


def emit(d):
    print(json.dumps(d), flush=True)
    results.append(d)


def monai_nets():
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    kw = lambda d: {k: v for k, v in d.items() if k != "_target_"}
    torch.manual_seed(0)
    unet = DiffusionModelUNetMaisi(**kw(UNET_DEF))
    cnet = ControlNetMaisi(**kw(CNET_DEF))
    with torch.no_grad():
        for p in list(unet.parameters()) + list(cnet.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    return unet.to(dev).eval(), cnet.to(dev).eval()


def ours_from(ref_unet, ref_cnet):
    unet, cnet = build(UNET_DEF), build(CNET_DEF)
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    cnet.load_state_dict(ref_cnet.state_dict(), strict=True)
    return unet.to(dev).eval(), cnet.to(dev).eval()


def fp16_channels_last(defn):
    """One of our networks from its definition (random weights), on CUDA, fp16, eval, channels-last: as `generate`
    holds the image DM and its ControlNet."""
    return build(defn).to(dev).half().eval().to(memory_format=torch.channels_last_3d)


def fp16_image_vae():
    """MAISI's image VAE with random weights (a small perturbation of the initialisation), on CUDA, fp16, eval."""
    from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
    from fastmaisi.variants import image_autoencoder_def

    vae = AutoencoderKlMaisi(**{k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")})
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return vae.to(dev).half().eval()


def label_map(shape):
    """A random uint8 label map in host memory (numpy), what `from_mask` starts from."""
    return torch.randint(0, 256, tuple(shape), dtype=torch.uint8).numpy()


def inputs(lat, dtype=torch.float16, seed=1):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(1, 4, *lat, device=dev, generator=g).to(dtype)
    cond = (torch.rand(1, 8, *[4 * s for s in lat], device=dev, generator=g) > 0.5).to(dtype)
    return dict(x=x, cond=cond, t=torch.tensor([500.0], device=dev),
                spacing=torch.tensor([[100.0, 100.0, 100.0]], device=dev, dtype=dtype),
                cls=torch.tensor([1], device=dev))


def step_fn(unet, cnet, inp, memory_format=None):
    x, cond = inp["x"], inp["cond"]
    if memory_format is not None:
        x, cond = x.contiguous(memory_format=memory_format), cond.contiguous(memory_format=memory_format)

    with torch.no_grad():  # the condition embedded once, as `image_denoiser` does (the ControlNet caches nothing)
        emb = cnet.embed_condition(cond)

    def step():
        down, mid = cnet(x=x, timesteps=inp["t"], controlnet_cond=None, controlnet_cond_embedding=emb,
                         class_labels=inp["cls"])
        return unet(x=x, timesteps=inp["t"], spacing_tensor=inp["spacing"], class_labels=inp["cls"],
                    down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return step


def graphed(step):
    """The step replayed from a CUDA graph (fastmaisi.nets.graphs.CudaGraphed; its first call is the capture)."""
    from fastmaisi.nets.graphs import CudaGraphed

    runner = CudaGraphed(lambda _x: step())
    dummy = torch.zeros(1, device=dev)
    return lambda: runner(dummy)


def timed(step, repeats, autocast):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        for _ in range(2):
            out = step()
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times), (max(times) - min(times)), torch.cuda.max_memory_allocated() / 2**30


def profile_step(step):
    """Where one ControlNet + UNet step of ours spends its GPU time: the top kernels by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
    events = sorted(p.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    emit({"what": "profile dm step (ours fp16)", "total_cuda_ms": round(total / 1e3, 1),
          "top": [{"name": e.key[:80], "calls": e.count, "cuda_ms": round(e.device_time_total / 1e3, 2)}
                  for e in events[:12]]})


def loop30(unet, cnet, inp, fmt):
    """The rflow-ct image stage's sampling loop (30 steps, ControlNet + UNet) through `pipelines.sampling.sample`,
    with and without CUDA-graph replay; the same final latent either way."""
    from fastmaisi.pipelines.sampling import image_denoiser, sample
    from fastmaisi.schedulers import build as build_scheduler
    from fastmaisi.variants import RFLOW_SCHEDULER_DEF

    unet, cnet = unet.to(memory_format=fmt), cnet.to(memory_format=fmt)
    cond = inp["cond"].contiguous(memory_format=fmt)
    finals = {}
    for graphs in (False, True, True):
        denoise = image_denoiser(unet, cnet, spacing=inp["spacing"], class_labels=inp["cls"], condition=cond)
        x = inp["x"].contiguous(memory_format=fmt)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        finals[graphs] = sample(denoise, build_scheduler(RFLOW_SCHEDULER_DEF), x, 30, disable=True, cuda_graph=graphs)
        torch.cuda.synchronize()
        emit({"what": "rflow_30_step_loop", "latent": list(x.shape[2:]), "cuda_graphs": graphs,
              "channels_last": fmt == torch.channels_last_3d, "s": round(time.perf_counter() - t0, 3),
              "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
    emit({"what": "rflow_30_step_loop graph vs eager", "max_abs_diff": float(
        (finals[True].float() - finals[False].float()).abs().max())})


def image_stage(unet, cnet, inp, budget_gib: int, repeats: int = 3, condition: str = "labels",
                empty_cache: bool = True):
    """The rflow-ct image stage end to end in one process, as `generate` runs it: the 30-step loop (networks
    channels-last; `sample` records CUDA graphs only for small latents, so eager at 128^3), then the exact decode under
    a budget; with cuDNN's autotuner off (as `generate` leaves it), then on. Peak = everything allocated during the
    stage (the three networks' weights, the 8-channel 512^3 condition until its embedding is computed, the loop's
    graphs if any, the decode); the first call also page-locks the decode's host memory. condition: "labels" (the
    uint8 map goes to the device and the ControlNet embeds it, as `from_mask` does) or "bits" (the 8-channel fp16
    condition is built first, as before `nets.label_conv`). empty_cache: give the caching allocator's blocks back to
    CUDA after each call, so every call allocates afresh (`generate` does not between samples)."""
    from fastmaisi.decode import execute as decode_executor, host_memory
    from fastmaisi.decode import decode_latent
    from fastmaisi.nets.blocks import _is_channels_last
    from fastmaisi.pipelines.from_mask import bit_channels, label_ids
    from fastmaisi.pipelines.sampling import image_denoiser, sample
    from fastmaisi.schedulers import build as build_scheduler
    from fastmaisi.variants import RFLOW_SCHEDULER_DEF

    vae = fp16_image_vae()
    cl = _is_channels_last(next(w for w in unet.parameters() if w.dim() == 5))
    inp.pop("cond")  # the stage starts, as `from_mask` does, from a uint8 label map in host memory
    label = label_map([4 * s for s in inp["x"].shape[2:]])
    pageable, new_host = host_memory._pageable, []

    def counting_pageable(nbytes):  # host buffers the decode had to allocate and page-lock in this call
        new_host.append(nbytes)
        return pageable(nbytes)

    host_memory._pageable = counting_pageable
    host_buffer, handed = decode_executor._host_buffer, []

    def recording_host_buffer(nbytes):  # which pooled buffer each host-stored activation gets, in order
        buf = host_buffer(nbytes)
        handed.append((round(nbytes / 2**30, 2), buf.data_ptr() % 2**32))
        return buf

    decode_executor._host_buffer = recording_host_buffer
    counters = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    for i, autotune in [(i, False) for i in range(repeats)] + [(i, True) for i in range(repeats, repeats + 2)]:
        torch.backends.cudnn.benchmark = autotune
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        cond = label_ids(label, dev) if condition == "labels" else bit_channels(label, dev, torch.float16)
        denoise = image_denoiser(unet, cnet, spacing=inp["spacing"], class_labels=inp["cls"], condition=cond)
        del cond  # as in `from_mask`: the denoiser keeps only the condition's embedding
        z = sample(denoise, build_scheduler(RFLOW_SCHEDULER_DEF), inp["x"], 30, disable=True, cuda_graph=True)
        del denoise  # the loop's CUDA graphs and the condition embedding: not needed by the decode
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loop_peak, before_decode = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        new_host.clear()
        handed.clear()
        before = torch.cuda.memory_stats()
        y = decode_latent(vae, z, budget_gib << 30)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        decode_peak = torch.cuda.max_memory_allocated()
        emit({"what": "rflow-ct image stage (30-step loop + exact decode)", "call": i, "condition": condition,
              "cudnn_benchmark": autotune, "empty_cache_between_calls": empty_cache,
              "channels_last": cl, "latent": list(z.shape[2:]),
              "decode_budget_GiB": budget_gib, "loop_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3),
              "s": round(t2 - t0, 3), "peak_alloc_GiB": round(max(loop_peak, decode_peak) / 2**30, 2),
              "loop_peak_GiB": round(loop_peak / 2**30, 2),
              "allocated_before_decode_GiB": round(before_decode / 2**30, 2), "decode_peak_GiB": round(decode_peak / 2**30, 2),
              "host_buffers_pinned_in_call": [round(n / 2**30, 2) for n in new_host], "output": list(y.shape),
              "decode_host_buffers_GiB_and_address": handed,
              "decode_allocator_counts": {c: torch.cuda.memory_stats().get(c, 0) - before.get(c, 0) for c in counters}})
        del z, y
        if empty_cache:
            torch.cuda.empty_cache()
    host_memory._pageable = pageable
    decode_executor._host_buffer = host_buffer


def mask_stage(repeats):
    """Mask DM (MONAI DiffusionModelUNet, 64^3 latent, one-token cross-attention): one step of the reference (fp16
    autocast) vs ours (fp16, eager / CUDA graph), and the 1000-step DDPM stage through `paired.sample_mask_latent`."""
    from monai.networks.nets import DiffusionModelUNet as MonaiUNet

    from fastmaisi.pipelines import paired
    from fastmaisi.pipelines.models import Models
    from fastmaisi.variants import MASK_DIFFUSION_DEF, MASK_LATENT_SHAPE

    kw = {k: v for k, v in MASK_DIFFUSION_DEF.items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = MonaiUNet(**kw).to(dev).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = build(MASK_DIFFUSION_DEF)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.to(dev).half().eval()
    g = torch.Generator(device=dev).manual_seed(3)
    x = torch.randn(1, *MASK_LATENT_SHAPE, device=dev, generator=g).half()
    ctx = torch.rand(1, 1, 10, device=dev, generator=g).half()
    t = torch.tensor([500.0], device=dev)
    results_by_mode = {}
    for name, make, autocast in [
        ("reference", lambda: (lambda: ref(x=x, timesteps=t, context=ctx)), True),
        ("ours_half", lambda: (lambda: ours(x=x, timesteps=t, context=ctx)), False),
        ("ours_half_graph", lambda: graphed(lambda: ours(x=x, timesteps=t, context=ctx)), False),
    ]:
        out, med, spread, peak = timed(make(), max(repeats, 20), autocast)
        results_by_mode[name] = out.float()
        row = {"what": "mask_dm_step", "mode": name, "s_median": round(med, 5), "s_spread": round(spread, 5),
               "peak_alloc_GiB": round(peak, 2), "ddpm1000_s": round(1000 * med, 1)}
        if name != "reference":
            row["rel_diff_vs_reference"] = rel(out, results_by_mode["reference"])
        emit(row)
    emit({"what": "mask_dm_graph_equals_eager", "max_abs_diff": float(
        (results_by_mode["ours_half_graph"] - results_by_mode["ours_half"]).abs().max())})
    models = Models(variant=None, autoencoder=None, diffusion_unet=ours, scheduler_def={}, mask_diffusion=ours,
                    dtype=torch.float16)
    anatomy = [0.1, 0.02, 0.005, 0.01, 0.03, -1, -1, -1, -1, -1]
    latents = {}
    for graphs in (True, False):
        models.cuda_graphs = graphs
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        latents[graphs] = paired.sample_mask_latent(models, anatomy, seed=7, latent_shape=MASK_LATENT_SHAPE,
                                                    steps=1000, progress=False)
        torch.cuda.synchronize()
        emit({"what": "mask_stage_1000_ddpm_steps", "cuda_graphs": graphs,
              "s": round(time.perf_counter() - t0, 2), "peak_alloc_GiB": round(torch.cuda.max_memory_allocated()
                                                                               / 2**30, 2)})
    emit({"what": "mask_stage_graph_equals_eager", "max_abs_diff": float(
        (latents[True].float() - latents[False].float()).abs().max())})


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--accuracy-latent", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--modes", nargs="*", default=["reference", "ours_autocast", "ours_half", "ours_half_cl",
                                                   "ours_half_graph", "ours_half_cl_graph"])
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of one step of ours (fp16)")
    ap.add_argument("--mask", action="store_true", help="also the mask DM: one step eager / graph vs reference, and "
                                                        "the 1000-step mask stage through the pipeline function")
    ap.add_argument("--image-stage", type=int, metavar="GIB",
                    help="also the rflow-ct image stage end to end: the loop, then the decode under GIB GiB")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    ref_unet, ref_cnet = monai_nets()
    our_unet, our_cnet = ours_from(ref_unet, ref_cnet)
    our_unet_h, our_cnet_h = ours_from(ref_unet, ref_cnet)
    our_unet_h.half(), our_cnet_h.half()

    # accuracy at a smaller latent against the reference run in fp32
    inp32 = inputs(args.accuracy_latent, torch.float32)
    inp16 = {k: (v.half() if v.is_floating_point() and k != "t" else v) for k, v in inp32.items()}
    with torch.no_grad():
        truth = step_fn(ref_unet, ref_cnet, inp32)().float()
        ours32 = step_fn(our_unet, our_cnet, inp32)()
        with torch.autocast("cuda", dtype=torch.float16):
            ref16 = step_fn(ref_unet, ref_cnet, inp16)()
            ours_ac = step_fn(our_unet, our_cnet, inp16)()
        ours_h = step_fn(our_unet_h, our_cnet_h, inp16)()
    emit({"what": "accuracy_vs_reference_fp32", "latent": args.accuracy_latent,
          "ours_fp32": rel(ours32, truth), "reference_fp16_autocast": rel(ref16, truth),
          "ours_fp16_autocast": rel(ours_ac, truth), "ours_half": rel(ours_h, truth)})
    del truth, ours32, ref16, ours_ac, ours_h

    inp = inputs(args.latent)
    modes = {
        "reference": (lambda: step_fn(ref_unet, ref_cnet, inp), True),
        "ours_autocast": (lambda: step_fn(our_unet, our_cnet, inp), True),
        "ours_half": (lambda: step_fn(our_unet_h, our_cnet_h, inp), False),
        "ours_half_cl": (lambda: step_fn(our_unet_h.to(memory_format=torch.channels_last_3d),
                                         our_cnet_h.to(memory_format=torch.channels_last_3d), inp,
                                         torch.channels_last_3d), False),
        "ours_half_graph": (lambda: graphed(step_fn(our_unet_h.to(memory_format=torch.contiguous_format),
                                                    our_cnet_h.to(memory_format=torch.contiguous_format), inp)),
                            False),
        "ours_half_cl_graph": (lambda: graphed(step_fn(our_unet_h.to(memory_format=torch.channels_last_3d),
                                                       our_cnet_h.to(memory_format=torch.channels_last_3d), inp,
                                                       torch.channels_last_3d)), False),
    }
    ref_time = None
    outs = {}
    for name in args.modes:
        make, autocast = modes[name]
        try:
            out, med, spread, peak = timed(make(), args.repeats, autocast)
        except torch.cuda.OutOfMemoryError:
            emit({"what": "dm_step", "mode": name, "error": "OOM"})
            continue
        outs[name] = out.float().cpu()
        if name == "reference":
            ref_time = med
        row = {"what": "dm_step_controlnet_unet", "mode": name, "latent": args.latent, "s_median": round(med, 4),
               "s_spread": round(spread, 4), "peak_alloc_GiB": round(peak, 2)}
        if ref_time:
            row["speedup_vs_reference"] = round(ref_time / med, 2)
        if "reference" in outs and name != "reference":
            row["rel_diff_vs_reference"] = rel(outs[name], outs["reference"])
        emit(row)
    if args.profile:
        profile_step(step_fn(our_unet_h.to(memory_format=torch.contiguous_format),
                             our_cnet_h.to(memory_format=torch.contiguous_format), inp))
    for cl in (False, True):
        loop30(our_unet_h, our_cnet_h, inp, torch.channels_last_3d if cl else torch.contiguous_format)
    if args.image_stage:
        for m in (ref_unet, ref_cnet, our_unet, our_cnet):  # only the networks the stage runs stay on the device
            m.cpu()
        torch.cuda.empty_cache()
        image_stage(our_unet_h.to(memory_format=torch.channels_last_3d),  # as `pipelines.models` loads them
                    our_cnet_h.to(memory_format=torch.channels_last_3d), inp, args.image_stage)
    del ref_unet, ref_cnet, our_unet, our_cnet, our_unet_h, our_cnet_h, outs
    torch.cuda.empty_cache()
    if args.mask:
        mask_stage(args.repeats)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "bench_nets.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
    print("\n| mode | s/step | peak GiB | speedup |")
    print("|---|---|---|---|")
    for r in results:
        if r.get("what") == "dm_step_controlnet_unet":
            print(f"| {r['mode']} | {r['s_median']} | {r['peak_alloc_GiB']} | {r.get('speedup_vs_reference', 1.0)} |")


if __name__ == "__main__":
    main()
