"""Retrain the built-in demo networks (fastmaisi/data/demo/) from scratch on CPU, reproducibly.

    python scripts/train_demo.py                      # about 30 min on 2 CPU cores
    python scripts/train_demo.py --scale 0.02 --out /tmp/demo_smoke   # a quick smoke run

Steps: phantoms at the demo grid -> image VAE (L1 + KL, no GAN / perceptual) -> `encode` -> rflow diffusion UNet ->
ControlNet (from the DM, with the phantom labels) -> mask VAE -> mask diffusion UNet (context: organ-size vector of
each label map), all through fastmaisi.train's Python API (the same trainers as `fastmaisi train`), fp32. The
official-layout checkpoints are converted to safetensors (`fastmaisi.weights.convert`, checked against the demo
definitions) and a `record.json` notes the settings, final losses, wall time and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmaisi import demo  # noqa: E402
from fastmaisi.variants import DDPM_SCHEDULER_DEF, RFLOW_SCHEDULER_DEF  # noqa: E402

DATA_SEED = 0  # phantom i has seed DATA_SEED + i; held-out seeds for evaluation start at 1000
NUM_PHANTOMS = 80
# recipe -> (steps, batch size, peak lr, extra Recipe fields)
PLAN = {
    "vae": (900, 4, 1e-3, dict(patch_size=(32, 32, 32), kl_weight=1e-7, adv_weight=0.0, recon_loss="l1")),
    "diffusion": (2000, 8, 5e-4, dict(modality_dropout=0.1)),
    "controlnet": (600, 4, 5e-4, dict(roi_labels=(23, 26), roi_weight=100.0, contrastive_weight=0.0,
                                      exclude_fold=None)),
    "mask-vae": (700, 4, 1e-3, dict(patch_size=(32, 32, 32), kl_weight=1e-6, spacing=demo.DEMO_SPACING)),
    "mask-diffusion": (1200, 4, 5e-4, dict(spacing=demo.DEMO_SPACING, size=demo.DEMO_SIZE, loss="l1",
                                           latent="sample")),
}
# recipe -> (official checkpoint file it writes, demo role)
OUTPUTS = {"vae": ("autoencoder.pt", "autoencoder"), "diffusion": ("diffusion_unet.pt", "diffusion_unet"),
           "controlnet": ("controlnet.pt", "controlnet"),
           "mask-vae": ("mask_generation_autoencoder.pt", "mask_autoencoder"),
           "mask-diffusion": ("mask_generation_diffusion_unet.pt", "mask_diffusion")}


def run_recipe(name: str, work: Path, data: Path, scale: float, seed: int, **paths) -> dict:
    """Train one recipe into work/<name>; returns its log summary."""
    from fastmaisi.train.loop import Dist, TrainConfig, train
    from fastmaisi.train.trainers import TRAINERS, Recipe

    steps, batch, lr, extra = PLAN[name]
    steps = max(2, int(round(steps * scale)))
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(out_dir=out, steps=steps, batch_size=batch, lr=lr, warmup_steps=min(50, steps // 10),
                      lr_power=1.0, precision="fp32", log_every=10, seed=seed, progress=False)
    scheduler = DDPM_SCHEDULER_DEF if name == "mask-diffusion" else RFLOW_SCHEDULER_DEF
    recipe = Recipe(data=data, definitions=demo.demo_definitions(), scheduler=dict(scheduler), cache=True,
                    **extra, **paths)
    torch.manual_seed(seed)  # the initial weights
    t0 = time.time()
    task = TRAINERS[name](recipe, cfg, Dist())
    history = train(task, cfg, Dist())
    seconds = time.time() - t0
    tail = [r["loss"] for r in history[-10:]]
    summary = {"steps": steps, "batch_size": batch, "lr": lr, "lr_schedule": "linear warmup, then linear decay",
               "warmup_steps": cfg.warmup_steps, "seed": seed, "settings": _plain(extra),
               "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
               "final_loss_mean_last_10_logs": sum(tail) / len(tail), "seconds": round(seconds, 1),
               "scale_factor": task.extra.get("scale_factor")}
    print(f"{name}: {steps} steps in {seconds:.0f} s, loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g}",
          flush=True)
    return summary


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=demo.DEMO_WEIGHTS_DIR, help="where the safetensors go")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastmaisi_demo_work"), help="scratch folder")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(PLAN), help="retrain these recipes only (others reused)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastmaisi.phantom import write_dataset
    from fastmaisi.train.encode import EncodeRequest, encode_volumes
    from fastmaisi.train.loop import Dist
    from fastmaisi.weights import convert

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    todo = args.only or list(PLAN)
    t_start = time.time()
    record_path = args.out / "record.json"
    record = json.loads(record_path.read_text()) if args.only and record_path.is_file() else {"recipes": {}}

    # 1. phantoms at the demo grid: tumours none / liver / lung in turn
    datalist = work / "phantoms" / "datalist.json"
    if not datalist.is_file():
        write_dataset(work / "phantoms", NUM_PHANTOMS, demo.DEMO_SIZE, demo.DEMO_SPACING, seed=DATA_SEED,
                      tumour="mixed", workers=args.threads)
    # 2-3. image VAE, then encode every phantom (latent sampled with a seed per image, labels carried along)
    if "vae" in todo:
        record["recipes"]["vae"] = run_recipe("vae", work, datalist, args.scale, seed=1)
    latents = work / "latents"
    if "vae" in todo or not latents.is_dir():
        shutil.rmtree(latents, ignore_errors=True)
        t0 = time.time()
        counts = encode_volumes(EncodeRequest(source=datalist, out_dir=latents, autoencoder=work / "vae" /
                                              "autoencoder.pt", definition=demo.demo_definitions()["autoencoder"],
                                              multiple=32, latent="sample", seed=DATA_SEED), Dist(),
                                progress=False)
        record["encode"] = {"counts": counts, "multiple": 32, "latent": "sample", "seconds": round(time.time() - t0, 1)}
    # 4-5. diffusion UNet on the latents; ControlNet from it, with the label maps
    if "diffusion" in todo:
        record["recipes"]["diffusion"] = run_recipe("diffusion", work, latents, args.scale, seed=2)
    if "controlnet" in todo:
        record["recipes"]["controlnet"] = run_recipe("controlnet", work, latents, args.scale, seed=3,
                                                     diffusion=work / "diffusion" / "diffusion_unet.pt")
    # 6-7. mask VAE on label patches; mask DM on whole label maps with the organ-size context
    if "mask-vae" in todo:
        record["recipes"]["mask-vae"] = run_recipe("mask-vae", work, datalist, args.scale, seed=4)
    if "mask-diffusion" in todo:
        record["recipes"]["mask-diffusion"] = run_recipe(
            "mask-diffusion", work, datalist, args.scale, seed=5,
            mask_autoencoder=work / "mask-vae" / "mask_generation_autoencoder.pt")

    # 8. safetensors (+ sidecar JSON with scale_factor), strictly checked against the demo definitions
    args.out.mkdir(parents=True, exist_ok=True)
    defs = demo.demo_definitions()
    sizes = {}
    for name in todo:
        file, role = OUTPUTS[name]
        target = args.out / f"{demo.DEMO_FILES[role]}.safetensors"
        convert(work / name / file, target, defs[role])
        sidecar = target.with_name(target.name + ".json")
        meta = json.loads(sidecar.read_text())
        meta.pop("source_sha256", None)  # the scratch .pt is not shipped
        sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        sizes[target.name] = target.stat().st_size
    record.update({
        "description": "fastmaisi demo networks: narrow MAISI architectures trained by scripts/train_demo.py on "
                       "procedural phantoms (fastmaisi.phantom), CPU, fp32",
        "command": "python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"generator": "fastmaisi.phantom.write_dataset", "num_phantoms": NUM_PHANTOMS,
                 "seeds": [DATA_SEED, DATA_SEED + NUM_PHANTOMS - 1], "tumour": "mixed (none / liver / lung in turn)",
                 "size": list(demo.DEMO_SIZE), "spacing": list(demo.DEMO_SPACING)},
        "variant": {"size": list(demo.DEMO_SIZE), "spacing": list(demo.DEMO_SPACING), "steps": demo.DEMO_STEPS,
                    "mask_steps": demo.DEMO_MASK_STEPS, "files": demo.DEMO_FILES},
        "definitions": defs, "scale": args.scale,
        "wall_seconds_this_run": round(time.time() - t_start, 1),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": args.threads, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    record.setdefault("file_bytes", {}).update(sizes)
    record["wall_seconds_total"] = round(sum(r["seconds"] for r in record["recipes"].values())
                                         + record.get("encode", {}).get("seconds", 0.0), 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(todo)} networks ({sum(sizes.values()) / 1e6:.1f} MB) and {record_path} in "
          f"{time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
