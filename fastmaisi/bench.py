"""`fastmaisi bench`: the reference's time-and-memory table, ours and MONAI's MAISI classes side by side, same process.

Random weights (stated in the output): timings do not depend on weight values. Per row of the seed table: the DM
stage (ControlNet + UNet step, timed; 30 rectified-flow steps and 1000 DDPM steps extrapolated), and the VAE decode
(ours: exact whole-volume; reference: MONAI sliding window with the row's window, overlap and splits). Plus the
paired pipeline's mask stage. Warm-up excluded, median and spread of repeats, peak allocated memory per stage.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fastmaisi import variants
from fastmaisi.argtypes import OneLineParser

# the seed table (NV-Generate-CTMR docs/performance.md): output size, decode window (latent voxels), overlap, splits
SEED_ROWS = [((256, 256, 128), (96, 96, 96), 0.25, 2), ((256, 256, 256), (48, 48, 64), 0.6666, 4),
             ((512, 512, 128), (64, 64, 32), 0.5, 2), ((256, 256, 256), (64, 64, 64), 0.25, 4),
             ((512, 512, 128), (80, 80, 32), 0.4, 2), ((512, 512, 512), (64, 64, 48), 0.4, 2),
             ((512, 512, 512), (80, 80, 48), 0.4, 4), ((512, 512, 512), (80, 80, 80), 0.4, 4),
             ((512, 512, 768), (80, 80, 96), 0.4, 4)]
# DM training rows (latent sizes of the seed's training table), batch 1; ours under each activation-checkpointing mode
TRAIN_LATENTS = [(64, 64, 32), (64, 64, 64), (128, 128, 32), (128, 128, 64), (128, 128, 128)]
CHECKPOINTING = {"full": True, "selective": "selective", "outer": "outer", "none": False}
# VAE training rows: patch sizes of the reference's two training phases (64^3 on 16 GB, 128^3 on 32 GB GPUs)
VAE_PATCHES = [(64, 64, 64), (128, 128, 128)]
# a tiny configuration for tests on a CPU: same code paths, small networks and sizes
TINY = dict(rows=[((32, 32, 32), (4, 4, 4), 0.25, 1)], train=[(8, 8, 8)], vae_patches=[(16, 16, 16)],
            mask_latent=(4, 8, 8, 8),
            ae=dict(num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4, num_splits=1),
            unet=dict(num_channels=[8, 16, 16, 32], num_head_channels=[0, 0, 8, 8], norm_num_groups=8,
                      num_res_blocks=1),
            cond=[8, 8, 8], mask=dict(channels=[8, 8, 16, 16], num_head_channels=[0, 0, 8, 8], norm_num_groups=8,
                                      num_res_blocks=1), mask_ae=dict(num_channels=[8, 8, 16], norm_num_groups=4))


def definitions(tiny: bool) -> dict:
    """Network kwargs by role (no `_target_`), full MAISI rflow-ct sizes or the tiny test sizes."""
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    defs = {"autoencoder": strip(variants.image_autoencoder_def()), "unet": strip(variants.diffusion_unet_def(False)),
            "controlnet": strip(variants.controlnet_def(False)), "mask": strip(variants.MASK_DIFFUSION_DEF),
            "mask_autoencoder": strip(variants.MASK_AUTOENCODER_DEF)}
    if tiny:
        defs["autoencoder"].update(TINY["ae"])
        defs["unet"].update(TINY["unet"])
        defs["controlnet"].update(TINY["unet"], conditioning_embedding_num_channels=TINY["cond"])
        defs["mask"].update(TINY["mask"])
        defs["mask_autoencoder"].update(TINY["mask_ae"])
    return defs


def _networks(defs: dict, reference: bool, device):
    """(ae, unet, controlnet, mask_unet) as ours, or as MONAI's classes; same random weights either way."""
    torch.manual_seed(0)
    if reference:
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
        from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
        from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
        from monai.networks.nets import DiffusionModelUNet

        flash = device.type == "cuda"  # MONAI's Maisi classes refuse flash attention without CUDA
        classes = (AutoencoderKlMaisi, DiffusionModelUNetMaisi, ControlNetMaisi, DiffusionModelUNet)
        ae_kw = defs["autoencoder"] | ({} if flash else {"norm_float16": False})  # MONAI's fp16 GN needs CUDA
        kw = [ae_kw, defs["unet"] | {"use_flash_attention": flash},
              defs["controlnet"] | {"use_flash_attention": flash}, defs["mask"] | {"use_flash_attention": flash}]
    else:
        from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
        from fastmaisi.nets.controlnet import ControlNetMaisi
        from fastmaisi.nets.unet import DiffusionModelUNet, DiffusionModelUNetMaisi

        classes = (AutoencoderKlMaisi, DiffusionModelUNetMaisi, ControlNetMaisi, DiffusionModelUNet)
        kw = [defs["autoencoder"], defs["unet"], defs["controlnet"], defs["mask"]]
    nets = [cls(**k).to(device).eval().requires_grad_(False) for cls, k in zip(classes, kw)]
    dtype = torch.float16 if (device.type == "cuda" and not reference) else None
    return [n.to(dtype) if dtype else n for n in nets]


def _time(fn, repeats: int, device) -> dict:
    """Median/spread seconds of `fn` after two warm-up calls, and the peak memory allocated during the calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: cuDNN/Triton pick and compile kernels per new shape on the first calls
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"s": statistics.median(times), "spread_s": max(times) - min(times), "peak_GiB": peak}


def _dm_step(unet, cnet, latent, device, dtype):
    x = torch.randn(1, 4, *latent, device=device, dtype=dtype)
    cond = (torch.rand(1, 8, *[4 * s for s in latent], device=device) > 0.5).to(dtype)
    t, cls = torch.tensor([500.0], device=device), torch.tensor([1], device=device)
    spacing = torch.full((1, 3), 100.0, device=device, dtype=dtype)

    def step():
        down, mid = cnet(x=x, timesteps=t, controlnet_cond=cond, class_labels=cls)
        return unet(x=x, timesteps=t, spacing_tensor=spacing, class_labels=cls,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return step


def _train_step(impl: str, defs: dict, latent, dev, checkpointing=True):
    """One DM training step as the reference trains (UNet fwd + L1 + bwd + Adam, fp16 autocast + GradScaler, batch 1).

    Ours with `checkpointing` (False, "selective" or True: `DiffusionModelUNetMaisi.use_checkpointing`); the
    reference runs as NVIDIA's trainer does.
    """
    unet = _networks_unet_fp32(defs, impl == "reference", dev)
    if impl == "ours":
        unet.use_checkpointing = checkpointing
    opt = torch.optim.Adam(unet.parameters(), lr=1e-5)
    x, target = torch.randn(1, 4, *latent, device=dev), torch.randn(1, 4, *latent, device=dev)
    t, cls = torch.rand(1, device=dev) * 1000, torch.tensor([1], device=dev)
    spacing = torch.full((1, 3), 100.0, device=dev)
    return _amp_step(lambda: unet(x=x, timesteps=t, spacing_tensor=spacing, class_labels=cls), target, opt, dev)


def _amp_step(forward, target, opt, dev, extra_loss=None):
    """fp16-autocast forward, L1 (+ extra) loss, GradScaler backward and optimiser step, as the reference trainers."""
    cuda = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            out = forward()
        recon = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.l1_loss(recon.float(), target)
        if extra_loss is not None:
            loss = loss + extra_loss(out)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def _vae_train_step(impl: str, defs: dict, patch, dev):
    """One VAE generator step as the reference's trainer (fp16 autocast): reconstruct a (1, 1, *patch) patch,
    L1 + 1e-7 KL, backward, Adam. The perceptual and adversarial terms (networks outside the VAE, the same for both
    implementations) are left out."""
    torch.manual_seed(0)
    kw = dict(defs["autoencoder"])
    if impl == "reference":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    else:
        from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
    if dev.type != "cuda":
        kw["norm_float16"] = False
    vae = AutoencoderKlMaisi(**kw).to(dev).train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    x = torch.rand(1, 1, *patch, device=dev)

    def kl(out):
        mu, sigma = out[1].float(), out[2].float()
        return 1e-7 * 0.5 * (mu.square() + sigma.square() - torch.log(sigma.square() + 1e-8) - 1).sum()

    return _amp_step(lambda: vae(x), x, opt, dev, kl)


def _networks_unet_fp32(defs: dict, reference: bool, dev):
    torch.manual_seed(0)
    if reference:
        from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

        return DiffusionModelUNetMaisi(**defs["unet"] | {"use_flash_attention": dev.type == "cuda"}).to(dev).train()
    from fastmaisi.nets.unet import DiffusionModelUNetMaisi

    return DiffusionModelUNetMaisi(**defs["unet"]).to(dev).train()


def _measure(make_step, row: dict, repeats: int, dev) -> dict:
    """Time the step `make_step()` builds into `row` (step_s, spread_s, peak_GiB, or an out-of-memory error)."""
    try:
        m = _time(make_step(), repeats, dev)
        row.update(step_s=m["s"], spread_s=m["spread_s"], peak_GiB=m["peak_GiB"])
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    print(json.dumps(row), file=sys.stderr, flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_bench(tiny: bool = False, reference: bool = False, device: str = "auto", repeats: int = 3,
              rows=None, training: bool = True, inference: bool = True,
              checkpointing=("full", "selective", "none")) -> dict:
    """Measure every row for ours (and the reference); returns the JSON-able result."""
    from fastmaisi.decode import decode_latent

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    defs = definitions(tiny)
    table = [r for i, r in enumerate(TINY["rows"] if tiny else SEED_ROWS) if rows is None or i in rows]
    impls = ["ours"] + (["reference"] if reference else [])
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "weights": "random (timings do not depend on weight values)", "rows": [], "mask_stage": [], "training": [],
           "vae_training": []}
    train_cases = [("ours", mode) for mode in checkpointing] + [("reference", None)] * reference
    for impl, mode in train_cases if training else []:
        for latent in TINY["train"] if tiny else TRAIN_LATENTS:
            row = {"impl": impl if mode is None else f"ours-{mode}", "latent": list(latent)}
            out["training"].append(_measure(lambda: _train_step(impl, defs, latent, dev, CHECKPOINTING.get(mode)),
                                            row, repeats, dev))
    for impl in impls if training else []:
        for patch in TINY["vae_patches"] if tiny else VAE_PATCHES:
            row = {"impl": impl, "patch": list(patch)}
            out["vae_training"].append(_measure(lambda: _vae_train_step(impl, defs, patch, dev), row, repeats, dev))
    for impl in impls if inference else []:
        ae, unet, cnet, mask_unet = _networks(defs, impl == "reference", dev)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        amp = torch.autocast("cuda", dtype=torch.float16, enabled=impl == "reference" and dev.type == "cuda")
        for size, roi, overlap, splits in table:
            latent = tuple(s // 4 for s in size)
            row = {"impl": impl, "output": list(size), "latent": list(latent), "window": list(roi),
                   "overlap": overlap, "splits": splits}
            with torch.no_grad(), amp:
                dm = _time(_dm_step(unet, cnet, latent, dev, dtype), repeats, dev)
                row.update(dm_step_s=dm["s"], dm_step_spread_s=dm["spread_s"], dm_peak_GiB=dm["peak_GiB"],
                           rflow30_s=30 * dm["s"], ddpm1000_s=1000 * dm["s"])
                z = torch.randn(1, 4, *latent, device=dev, dtype=dtype)
                if impl == "ours":
                    dec = _time(lambda: decode_latent(ae, z), 1, dev)
                else:
                    dec = _time(_reference_decode(ae, z, roi, overlap, splits, dev), 1, dev)
            row.update(decode_s=dec["s"], decode_peak_GiB=dec["peak_GiB"])
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        with torch.no_grad(), amp:
            shape = TINY["mask_latent"] if tiny else variants.MASK_LATENT_SHAPE
            x = torch.randn(1, *shape, device=dev, dtype=dtype)
            ctx = torch.rand(1, 1, 10, device=dev, dtype=dtype)
            t = torch.tensor([500.0], device=dev)
            m = _time(lambda: mask_unet(x=x, timesteps=t, context=ctx), repeats, dev)
        out["mask_stage"].append({"impl": impl, "step_s": m["s"], "ddpm1000_s": 1000 * m["s"], "peak_GiB": m["peak_GiB"]})
        del ae, unet, cnet, mask_unet
    _ratios(out)
    return out


def _reference_decode(ae, z, roi, overlap, splits, dev):
    """The reference's decode: MONAI SlidingWindowInferer (gaussian, stitched on the CPU) unless the latent fits."""
    from monai.inferers import SlidingWindowInferer

    for m in ae.modules():  # the row's tensor-parallel split count, as `autoencoder_tp_num_splits` sets it
        if hasattr(m, "num_splits"):
            m.num_splits = splits
    if all(r >= s for r, s in zip(roi, z.shape[2:])):
        return lambda: ae.decode_stage_2_outputs(z).cpu()
    inferer = SlidingWindowInferer(roi_size=[min(r, s) for r, s in zip(roi, z.shape[2:])], sw_batch_size=1,
                                   mode="gaussian", overlap=overlap, sw_device=dev, device=torch.device("cpu"),
                                   progress=False)
    return lambda: inferer(network=ae.decode_stage_2_outputs, inputs=z)


def _ratios(out: dict) -> None:
    refs = {(tuple(r["output"]), tuple(r["window"])): r for r in out["rows"] if r["impl"] == "reference"}
    for r in out["rows"]:
        ref = refs.get((tuple(r["output"]), tuple(r["window"])))
        if r["impl"] == "ours" and ref:
            r["dm_speedup"] = ref["dm_step_s"] / r["dm_step_s"]
            r["decode_speedup"] = ref["decode_s"] / r["decode_s"]


def markdown(out: dict) -> str:
    """The README table: per row, DM step and decode time and peak memory, ours vs reference."""
    lines = [f"Device: {out['device']}, torch {out['torch']}, weights: {out['weights']}.", "",
             "| output | window / overlap / splits | impl | DM step s (30 rflow / 1000 ddpm) | DM peak GiB "
             "| decode s | decode peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {'x'.join(map(str, r['output']))} | {r['window']} / {r['overlap']} / {r['splits']} | "
                     f"{r['impl']} | {r['dm_step_s']:.3f} ({r['rflow30_s']:.1f} / {r['ddpm1000_s']:.0f}) | "
                     f"{_gib(r['dm_peak_GiB'])} | {r['decode_s']:.2f} | {_gib(r['decode_peak_GiB'])} |")
    if out.get("training"):
        lines += ["", "| DM training step, latent | impl | s/step | peak GiB |", "|---|---|---|---|"]
        for r in out["training"]:
            lines.append(f"| {'x'.join(map(str, r['latent']))} | {r['impl']} | "
                         + (f"{r['step_s']:.3f} | {_gib(r['peak_GiB'])} |" if "step_s" in r else f"{r['error']} | |"))
    if out.get("vae_training"):
        lines += ["", "| VAE training step (L1 + KL, fp16 autocast), patch | impl | s/step | peak GiB |",
                  "|---|---|---|---|"]
        for r in out["vae_training"]:
            lines.append(f"| {'x'.join(map(str, r['patch']))} | {r['impl']} | "
                         + (f"{r['step_s']:.3f} | {_gib(r['peak_GiB'])} |" if "step_s" in r else f"{r['error']} | |"))
    for m in out["mask_stage"]:
        lines.append(f"\nmask stage ({m['impl']}): {m['step_s']:.4f} s/step, 1000 DDPM steps {m['ddpm1000_s']:.1f} s, "
                     f"peak {_gib(m['peak_GiB'])} GiB")
    return "\n".join(lines)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def plot(out: dict, path: Path) -> bool:
    """Time and peak memory against output size for both implementations (needs matplotlib; skipped otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for impl in ("ours", "reference"):
        rows = [r for r in out["rows"] if r["impl"] == impl]
        if not rows:
            continue
        x = [r["output"][0] * r["output"][1] * r["output"][2] / 1e6 for r in rows]
        a.scatter(x, [r["rflow30_s"] + r["decode_s"] for r in rows], label=impl)
        b.scatter(x, [max(r["dm_peak_GiB"] or 0, r["decode_peak_GiB"] or 0) for r in rows], label=impl)
    a.set(xlabel="output voxels (M)", ylabel="30-step rflow + decode (s)")
    b.set(xlabel="output voxels (M)", ylabel="peak allocated GiB")
    a.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def bench_main(argv: list[str]) -> int:
    p = OneLineParser(prog="fastmaisi bench", description=__doc__)
    p.add_argument("--rows", type=int, nargs="*", help="indices of the seed table's rows (default: all)")
    p.add_argument("--reference", action="store_true", help="also run MONAI's MAISI classes (needs monai)")
    p.add_argument("--tiny", action="store_true", help="tiny networks and sizes (a CPU smoke configuration)")
    p.add_argument("-o", "--output", default="bench_out")
    p.add_argument("-d", "--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-training", action="store_true", help="skip the DM training rows")
    p.add_argument("--training-only", action="store_true", help="only the training rows (DM and VAE)")
    p.add_argument("--checkpointing", nargs="+", choices=list(CHECKPOINTING), default=list(CHECKPOINTING),
                   help="our DM training rows under these activation-checkpointing modes (default: all three)")
    args = p.parse_args(argv)
    if args.reference:
        try:
            import monai  # noqa: F401
        except ImportError:
            print("fastmaisi bench: --reference needs monai (pip install monai==1.6.1)", file=sys.stderr)
            return 2
    out = run_bench(tiny=args.tiny, reference=args.reference, device=args.device, repeats=args.repeats,
                    rows=args.rows, training=not args.no_training, inference=not args.training_only,
                    checkpointing=args.checkpointing)
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(out, indent=1))
    (folder / "bench.md").write_text(markdown(out) + "\n")
    plot(out, folder / "bench.png")
    print(markdown(out))
    return 0
