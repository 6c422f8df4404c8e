"""GPU benchmark of NVIDIA's v2 mask generator (rflow-mask) in one run, random weights:

  mask_stage   100 guided rectified-flow steps x batch 2 at latent 64^3, mask VAE decode to 256^3, argmax,
               132-label remap, post-processing (ours on the GPU, checked equal to our host path, both timed):
               ours (fastmaisi.pipelines.paired_v2: our AdaGN UNet fp16
               channels-last + CUDA graphs, our exact decode) against the reference loop (MONAI's MAISI UNet with
               the AdaGN additions, bench/adagn_oracle.py, fp32 weights under fp16 autocast as NVIDIA's script; MONAI's
               RFlowScheduler; MONAI's mask VAE decode of the whole latent + softmax + argmax). NVIDIA's
               post-processing needs their scripts, so the reference column has none (ours is timed apart).
               Also: the two final latents' relative difference and the label agreement.
  paired       (--paired) the whole paired workflow at --paired-size^3 through `fastmaisi generate` (all five networks
               with random weights in NVIDIA's checkpoint layouts, v2 mask generator, 30 image steps, exact decode,
               write), and the reference's lower bound: its mask stage above + 30 steps of MONAI's ControlNet + UNet
               at the image latent under autocast (its decode not included).

Time: wall clock around CUDA-synchronised calls, the best of --repeats after a warm-up; peak: torch.cuda
max_memory_allocated per part. Writes one JSON to --out.

    python3 bench/bench_mask_v2.py --out $OUT/bench_mask_v2.json --paired
    python3 bench/bench_mask_v2.py --out /tmp/smoke.json --tiny --device cpu --steps 2 --paired   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adagn_oracle import monai_adagn_unet  # noqa: E402

from fastmaisi import mask_conditions as mc  # noqa: E402
from fastmaisi.variants import MASK_AUTOENCODER_DEF, MASK_DIFFUSION_V2_DEF  # noqa: E402

TINY_V2 = dict(MASK_DIFFUSION_V2_DEF, num_channels=[8, 8, 16, 16], num_head_channels=[0, 0, 8, 8], num_res_blocks=1,
               norm_num_groups=8, adagn_context_embed_dim=32)
TINY_MASK_AE = dict(MASK_AUTOENCODER_DEF, num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4,
                    use_checkpointing=False, norm_float16=False, num_splits=1)
CONDITION = mc.condition_vector({"bone lesion": 0.3}, {"age": 60, "sex": "F"})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured(fn, device, repeats: int) -> tuple[object, dict]:
    """fn() after one warm-up: (last result, {"s": best seconds, "peak_GiB": peak allocated of the last call})."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, {"s": round(best, 3), "peak_GiB": None if peak is None else round(peak, 2)}


def networks(tiny: bool):
    from fastmaisi.nets import build

    torch.manual_seed(0)
    unet_def, ae_def = (TINY_V2, TINY_MASK_AE) if tiny else (MASK_DIFFUSION_V2_DEF, MASK_AUTOENCODER_DEF)
    ours_unet, ours_ae = build(dict(unet_def)), build(dict(ae_def))
    with torch.no_grad():
        for p in ours_unet.parameters():
            p.add_(0.01 * torch.randn_like(p))  # zero-initialised layers would hide differences
    return unet_def, ae_def, ours_unet, ours_ae


def ours_mask_stage(ours_unet, ours_ae, device, dtype, latent, steps, repeats, result):
    from fastmaisi.pipelines.models import Models
    from fastmaisi.pipelines import paired, paired_v2
    from fastmaisi.demo import DEMO_VARIANT

    fmt = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    unet = ours_unet.to(device=device, dtype=dtype).eval().requires_grad_(False).to(memory_format=fmt)
    ae = ours_ae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    models = Models(variant=DEMO_VARIANT, autoencoder=ae, diffusion_unet=unet, scheduler_def={},
                    mask_autoencoder=ae, mask_diffusion=unet, mask_scale_factor=1.0056, dtype=dtype)
    shape = (4, latent, latent, latent)
    z, t_loop = measured(lambda: paired_v2.sample_mask_latent_v2(models, CONDITION, seed=0, latent_shape=shape,
                                                                 steps=steps, progress=False), device, repeats)
    label, t_dec = measured(lambda: paired.decode_mask(models, z), device, repeats)
    on_device = device.type == "cuda"
    decoded, t_dec_dev = measured(lambda: paired.decode_mask(models, z, on_device=on_device), device, repeats)
    host_clean, t_post_host = measured(lambda: paired_v2.postprocess_v2(label, CONDITION), device, 1)
    clean, t_post = measured(lambda: paired_v2.postprocess_v2(decoded, CONDITION), device, repeats)
    clean = clean.cpu().numpy() if hasattr(clean, "cpu") else clean

    def whole_stage():  # as `generate` runs it: loop, decode where it ran, clean-up there
        latent = paired_v2.sample_mask_latent_v2(models, CONDITION, seed=0, latent_shape=shape, steps=steps,
                                                 progress=False)
        return paired_v2.postprocess_v2(paired.decode_mask(models, latent, on_device=on_device), CONDITION)

    _, t_stage = measured(whole_stage, device, repeats)
    result["ours"] = {"loop": t_loop, "decode_argmax_remap": t_dec_dev, "decode_argmax_remap_to_host": t_dec,
                      "postprocess": t_post, "postprocess_host": t_post_host,
                      "postprocess_device_equals_host": bool((clean == host_clean).all()),
                      "changed_by_postprocess": float((host_clean != label).mean()),
                      "stage_s_sum_of_parts": round(t_loop["s"] + t_dec_dev["s"] + t_post["s"], 3),
                      "stage": t_stage, "stage_s": t_stage["s"]}
    return z.float().cpu(), label


def reference_mask_stage(state, ae_state, unet_def, ae_def, device, latent, steps, repeats, result):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.schedulers import RFlowScheduler

    from fastmaisi.labels import remap_mask_labels
    from fastmaisi.pipelines.common import latent_noise

    kw = {k: v for k, v in unet_def.items() if k != "_target_"}
    kw["use_flash_attention"] = kw.get("use_flash_attention", False) and device.type == "cuda"
    net = monai_adagn_unet(**kw)
    net.load_state_dict(state, strict=True)
    net = net.to(device).eval()
    ae = AutoencoderKlMaisi(**{k: v for k, v in ae_def.items() if k != "_target_"})
    ae.load_state_dict(ae_state, strict=True)
    ae = ae.to(device).eval()
    half = torch.float16 if device.type == "cuda" else torch.float32
    cond = torch.tensor(CONDITION, device=device).view(1, 1, -1).to(half)
    uncond = torch.full_like(cond, -1.0)
    spacing = (torch.tensor([1.5, 1.5, 1.5], device=device).view(1, 3) * 100).to(half)

    def loop():
        sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                               sample_method="uniform", scale=1.0)
        with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=device.type == "cuda"):
            x = latent_noise(0, (1, 4, latent, latent, latent), device, half)
            sched.set_timesteps(num_inference_steps=steps, input_img_size_numel=torch.tensor(latent**3))
            ts = sched.timesteps
            for i, t in enumerate(ts):
                t_in = t.unsqueeze(0).to(device).expand(2)
                v = net(x=torch.cat([x, x]), timesteps=t_in, context=torch.cat([cond, uncond]),
                        spacing_tensor=torch.cat([spacing, spacing]))
                vc, vu = v.chunk(2)
                v = vu + 2.0 * (vc - vu)
                x = sched.step(v, t, x, next_timestep=ts[i + 1] if i + 1 < len(ts) else None)[0]
        return x

    def decode():
        with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=device.type == "cuda"):
            logits = ae.decode_stage_2_outputs(z / 1.0056)
            raw = torch.argmax(torch.softmax(logits, dim=1), dim=1)[0]
        return remap_mask_labels(raw.to(torch.int16).cpu().numpy())

    z, t_loop = measured(loop, device, repeats)
    label, t_dec = measured(decode, device, repeats)
    result["reference"] = {"loop": t_loop, "decode_softmax_argmax_remap": t_dec,
                           "stage_s_without_postprocess": round(t_loop["s"] + t_dec["s"], 3)}
    return z.float().cpu(), label


def mask_stage(args, device, result):
    unet_def, ae_def, ours_unet, ours_ae = networks(args.tiny)
    state = {k: v.clone() for k, v in ours_unet.state_dict().items()}
    ae_state = {k: v.clone() for k, v in ours_ae.state_dict().items()}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    z_ours, label_ours = ours_mask_stage(ours_unet, ours_ae, device, dtype, args.latent, args.steps, args.repeats,
                                         result)
    del ours_unet, ours_ae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    z_ref, label_ref = reference_mask_stage(state, ae_state, unet_def, ae_def, device, args.latent, args.steps,
                                            args.repeats, result)
    result["agreement"] = {"latent_rel_diff": float(f"{float((z_ours - z_ref).norm() / z_ref.norm()):.3g}"),
                           "label_voxels_equal": float(f"{float((label_ours == label_ref).mean()):.6f}")}
    r = result["reference"]["stage_s_without_postprocess"]
    result["speedup_loop_and_decode"] = round(r / (result["ours"]["loop"]["s"] + result["ours"]["decode_argmax_remap"]
                                                   ["s"]), 2)


def write_random_weights(folder: Path, tiny: bool) -> dict:
    """All five networks with random weights in NVIDIA's layouts; returns the network config used."""
    from fastmaisi import variants
    from fastmaisi.nets import build

    torch.manual_seed(1)
    if tiny:
        from fastmaisi.tiny import TINY_NETWORK_CONFIG

        config = dict(TINY_NETWORK_CONFIG, mask_generation_diffusion_def=dict(TINY_V2))
    else:
        v = variants.VARIANTS["rflow-ct"]
        defs = v.with_mask_generator("v2").definitions()
        config = {variants.ROLE_CONFIG_KEYS[r]: d for r, d in defs.items()}
        config["mask_generation_latent_shape"] = [4, 64, 64, 64]
    from fastmaisi.config import resolve_network_definition

    files = {"autoencoder_def": ("autoencoder_v1.pt", None), "diffusion_unet_def": ("diff_unet_3d_rflow-ct.pt", "u"),
             "controlnet_def": ("controlnet_3d_rflow-ct.pt", "c"),
             "mask_generation_autoencoder_def": ("mask_generation_autoencoder.pt", None),
             "mask_generation_diffusion_def": ("mask_generation_diffusion_unet_v2.pt", "u")}
    for key, (name, layout) in files.items():
        net = build(resolve_network_definition(config, key))
        sd = net.state_dict()
        obj = {"u": {"unet_state_dict": sd, "scale_factor": torch.tensor(1.0)},
               "c": {"controlnet_state_dict": sd}}.get(layout, sd)
        torch.save(obj, folder / name)
    (folder / "config_network.json").write_text(json.dumps(config))
    return config


def paired(args, device, result):
    from fastmaisi.pipelines.generate import GenerateRequest, generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "w").mkdir()
        write_random_weights(tmp / "w", args.tiny)
        size = (args.paired_size,) * 3
        spacing = (1.0, 1.0, 1.0) if args.paired_size >= 256 else (10.0, 10.0, 10.0)

        def run(k):
            request = GenerateRequest(output_dir=str(tmp / f"out{k}"), weights=str(tmp / "w"),
                                      network_config=str(tmp / "w" / "config_network.json"), size=size,
                                      spacing=spacing, organ_sizes={"bone lesion": 0.3}, mask_generator="v2",
                                      mask_steps=args.steps, steps=args.image_steps, max_retries=0,
                                      device=str(device))
            return generate(request, progress=False)

        k = iter(range(100))
        out, t = measured(lambda: run(next(k)), device, max(1, args.repeats - 1))
        timings = out[0]["record"]["attempts"][-1]["timings"]
        result["ours"] = {"end_to_end": t, "size": list(size), "mask_steps": args.steps,
                          "image_steps": args.image_steps, "stage_timings_last_run": timings}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="JSON results file")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=100, help="mask steps (NVIDIA: 100)")
    ap.add_argument("--latent", type=int, default=64, help="mask latent edge (NVIDIA: 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paired", action="store_true", help="also the paired workflow end to end")
    ap.add_argument("--paired-size", type=int, default=512)
    ap.add_argument("--image-steps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="tiny networks (CPU smoke test of this script)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "condition": CONDITION}
    sections = [("mask_stage", mask_stage)] + ([("paired", paired)] if args.paired else [])
    for name, fn in sections:
        results[name] = {}
        try:
            fn(args, device, results[name])
        except Exception as err:  # one failing section must not lose the others' numbers
            results[name]["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        print(json.dumps({name: results[name]}), flush=True)
    if args.paired and "reference" in results["mask_stage"]:
        results["paired"]["reference_note"] = ("the reference paired time is at least its mask stage "
                                               "(mask_stage.reference) + its 30-step image loop; see "
                                               "bench/bench_nets.py --image-stage for the image-stage reference")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
