"""Retrain the built-in demo networks (fastmaisi/data/demo/) from scratch, reproducibly.

    python scripts/train_demo.py --device cuda        # ~8 minutes on one H200 (how the shipped weights were made)
    python scripts/train_demo.py                      # CPU only: many hours on 2 cores
    python scripts/train_demo.py --scale 0.02 --out /tmp/demo_smoke   # a quick smoke run

Steps: phantoms at the demo grid -> image VAE (L1 + KL, no GAN / perceptual; 32^3 patches, then whole volumes) ->
`encode` -> rflow diffusion UNet -> ControlNet (from the DM, with the phantom labels); and mask VAE (patches, then
whole volumes) -> mask diffusion UNet (context: the organ-size vector of each label map), with CUDA in a second
process beside the first chain. All through fastmaisi.train's Python API (the trainers of `fastmaisi train`), fp32.
The official-layout checkpoints are converted to safetensors (`fastmaisi.weights.convert`, checked against the demo
definitions); `record.json` notes the settings, final losses, times, versions and the checks of `evaluate` (VAE PSNR,
paired quality-check pass rate, from-mask Dice), which run on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmaisi import demo  # noqa: E402
from fastmaisi.pipelines.paired_v2 import MASK_V2_SCHEDULER_DEF  # noqa: E402
from fastmaisi.variants import DDPM_SCHEDULER_DEF, RFLOW_SCHEDULER_DEF  # noqa: E402

DATA_SEED = 0  # phantom i has seed DATA_SEED + i; held-out seeds for evaluation start at 1000
NUM_PHANTOMS = 120
MASK_CHAIN = ("mask-vae", "mask-vae-volume", "mask-diffusion", "mask-diffusion-v2")
_PATCH = dict(patch_size=(32, 32, 32), adv_weight=0.0, recon_loss="l1")
# stage -> (trainer, data ("phantoms" or "latents"), steps, batch size, peak lr, seed, extra Recipe fields, init
# stage). The VAEs train on 32^3 patches, then on whole 64^3 volumes: generation normalises (GroupNorm) over the
# whole volume, and patch-only weights shift the decoded HU by ~+40.
# The ControlNet weighs the tumour latents x10, not the reference's x100, so that the tumours (a few % of the latent
# voxels) do not dominate this small model's loss.
PLAN = {
    "vae": ("vae", "phantoms", 3000, 4, 1e-3, 1, dict(_PATCH, kl_weight=1e-7), None),
    "vae-volume": ("vae", "phantoms", 600, 1, 2e-4, 6, dict(_PATCH, patch_size=demo.DEMO_SIZE, kl_weight=1e-7),
                   "vae"),
    "diffusion": ("diffusion", "latents", 4000, 16, 5e-4, 2, dict(modality_dropout=0.1), None),
    "controlnet": ("controlnet", "latents", 3000, 8, 5e-4, 3,
                   dict(roi_labels=(23, 26), roi_weight=10.0, contrastive_weight=0.0, exclude_fold=None), None),
    "mask-vae": ("mask-vae", "phantoms", 3000, 4, 1e-3, 4, dict(_PATCH, kl_weight=1e-6, spacing=demo.DEMO_SPACING),
                 None),
    "mask-vae-volume": ("mask-vae", "phantoms", 600, 1, 2e-4, 7,
                        dict(_PATCH, patch_size=demo.DEMO_SIZE, kl_weight=1e-6, spacing=demo.DEMO_SPACING),
                        "mask-vae"),
    "mask-diffusion": ("mask-diffusion", "phantoms", 2000, 4, 5e-4, 5,
                       dict(spacing=demo.DEMO_SPACING, size=demo.DEMO_SIZE, loss="l1", latent="mean"), None),
    # the v2 mask generator (NVIDIA's AdaGN rflow-mask UNet, narrow): 19-number condition = one size slot of the map
    # + a synthetic weight that follows the phantom's body size (phantom.synthetic_demographics); rectified flow
    "mask-diffusion-v2": ("mask-diffusion-v2", "phantoms-v2", 2000, 4, 5e-4, 8,
                          dict(spacing=demo.DEMO_SPACING, size=demo.DEMO_SIZE, loss="l1", latent="mean"), None),
}
# stage -> (official checkpoint file it writes, demo role): the shipped networks
OUTPUTS = {"vae-volume": ("autoencoder.pt", "autoencoder"), "diffusion": ("diffusion_unet.pt", "diffusion_unet"),
           "controlnet": ("controlnet.pt", "controlnet"),
           "mask-vae-volume": ("mask_generation_autoencoder.pt", "mask_autoencoder"),
           "mask-diffusion": ("mask_generation_diffusion_unet.pt", "mask_diffusion"),
           "mask-diffusion-v2": ("mask_generation_diffusion_unet_v2.pt", "mask_diffusion_v2")}
# shipped role -> (file stem, network definition)
SHIPPED = {**{role: (stem, demo.demo_definitions()[role]) for role, stem in demo.DEMO_FILES.items()},
           "mask_diffusion_v2": (demo.DEMO_MASK_V2_FILE, demo.demo_mask_v2_definition())}
# what a stage reads from earlier stages (Recipe field -> stage, file)
INPUTS = {"controlnet": {"diffusion": ("diffusion", "diffusion_unet.pt")},
          "mask-diffusion": {"mask_autoencoder": ("mask-vae-volume", "mask_generation_autoencoder.pt")},
          "mask-diffusion-v2": {"mask_autoencoder": ("mask-vae-volume", "mask_generation_autoencoder.pt")}}


def run_stage(name: str, work: Path, scale: float, device: str = "cpu") -> dict:
    """Train one stage into work/<name>; returns its log summary."""
    from fastmaisi.train.loop import Dist, TrainConfig, train
    from fastmaisi.train.mask_v2 import setup_mask_diffusion_v2
    from fastmaisi.train.trainers import TRAINERS, Recipe

    trainer, data, steps, batch, lr, seed, extra, init = PLAN[name]
    steps = max(2, int(round(steps * scale)))
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(out_dir=out, steps=steps, batch_size=batch, lr=lr, warmup_steps=min(50, steps // 10),
                      lr_power=1.0, precision="fp32", log_every=10, seed=seed, progress=False)
    scheduler = {"mask-diffusion": DDPM_SCHEDULER_DEF, "mask-diffusion-v2": MASK_V2_SCHEDULER_DEF}.get(
        trainer, RFLOW_SCHEDULER_DEF)
    paths = {key: work / stage / file for key, (stage, file) in INPUTS.get(name, {}).items()}
    if name == "mask-diffusion-v2" and not paths["mask_autoencoder"].is_file():  # retrained alone: the shipped VAE
        paths["mask_autoencoder"] = demo.DEMO_WEIGHTS_DIR / f"{demo.DEMO_FILES['mask_autoencoder']}.safetensors"
    if init is not None:
        paths["init"] = work / init / OUTPUTS[name][0]
    source = {"phantoms": work / "phantoms" / "datalist.json", "phantoms-v2": work / "phantoms" / "datalist_v2.json",
              "latents": work / "latents"}[data]
    definitions = demo.demo_definitions()
    definitions["mask_diffusion"] = demo.demo_mask_v2_definition() if trainer == "mask-diffusion-v2" \
        else definitions["mask_diffusion"]
    recipe = Recipe(data=source, definitions=definitions, scheduler=dict(scheduler), cache=True, **extra, **paths)
    torch.manual_seed(seed)  # the initial weights
    t0, cpu0 = time.time(), time.process_time()
    dist = Dist(device=torch.device(device))
    task = (setup_mask_diffusion_v2 if trainer == "mask-diffusion-v2" else TRAINERS[trainer])(recipe, cfg, dist)
    history = train(task, cfg, dist)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    tail = [r["loss"] for r in history[-10:]]
    summary = {"trainer": trainer, "steps": steps, "batch_size": batch, "lr": lr,
               "lr_schedule": "linear warmup, then linear decay to 0", "warmup_steps": cfg.warmup_steps, "seed": seed,
               "init": init, "settings": _plain(extra), "first_loss": history[0]["loss"],
               "final_loss": history[-1]["loss"], "final_loss_mean_last_10_logs": sum(tail) / len(tail),
               "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
               "scale_factor": task.extra.get("scale_factor")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{name}: {steps} steps in {seconds:.0f} s, loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g}",
          flush=True)
    return summary


def write_v2_datalist(datalist: Path) -> Path:
    """datalist_v2.json beside `datalist`: the same phantoms, each with its synthetic weight (kg)."""
    from fastmaisi.phantom import synthetic_demographics

    entries = json.loads(datalist.read_text())["training"]
    entries = [{**e, **synthetic_demographics(e["seed"])} for e in entries]
    path = datalist.with_name("datalist_v2.json")
    path.write_text(json.dumps({"training": entries}, indent=1) + "\n")
    return path


def encode(work: Path, datalist: Path, device: str = "cpu") -> dict:
    """`fastmaisi encode` of every phantom with the image VAE: latents (sampled, a seed per image) + label maps."""
    from fastmaisi.train.encode import EncodeRequest, encode_volumes
    from fastmaisi.train.loop import Dist

    latents = work / "latents"
    shutil.rmtree(latents, ignore_errors=True)
    t0 = time.time()
    counts = encode_volumes(EncodeRequest(source=datalist, out_dir=latents, autoencoder=work / "vae-volume" /
                                          "autoencoder.pt", definition=demo.demo_definitions()["autoencoder"],
                                          multiple=32, latent="mean", seed=DATA_SEED),
                           Dist(device=torch.device(device)), progress=False)
    return {"counts": counts, "multiple": 32, "latent": "mean", "seconds": round(time.time() - t0, 1)}


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def evaluate(num_seeds: int = 10) -> dict:
    """Checks of the shipped networks: VAE reconstruction on held-out phantoms (seeds 1000..), the paired workflow's
    quality-check pass rate (seeds 0..num_seeds-1) and the from-mask HU Dice on held-out phantoms."""
    import numpy as np

    from fastmaisi.evaluation.recon import hu_to_unit, vae_reconstructor, volume_metrics
    from fastmaisi.labels import quality_check
    from fastmaisi.phantom import make_phantom

    models = demo.load_demo_models()
    reconstruct = vae_reconstructor(models.autoencoder)
    recon, dices = [], []
    for k in range(num_seeds):
        tumour = (None, "liver", "lung")[k % 3]
        hu, label = make_phantom(demo.DEMO_SIZE, demo.DEMO_SPACING, seed=1000 + k, tumour=tumour)
        x = hu_to_unit(torch.from_numpy(hu))
        with torch.no_grad():
            y = reconstruct(x[None, None])[0, 0].clamp(0, 1)
        recon.append(volume_metrics(x, y))
        if k < 3:
            dices.append(demo.organ_dice(demo.volume_from_mask(models, label, seed=k), label))
    passed, failed = 0, {}
    for seed in range(num_seeds):
        image, label = demo.paired_volume(models, seed)
        qc = quality_check(image, label)
        passed += qc.passed
        for organ in qc.failed:
            failed[organ] = failed.get(organ, 0) + 1
    mean = lambda rows: {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}  # noqa: E731
    return {"vae_recon_held_out": {"seeds": [1000, 1000 + num_seeds - 1], **mean(recon)},
            "from_mask_dice_held_out": {"seeds": [1000, 1002], "rule": "fastmaisi.demo.organs_by_hu", **mean(dices)},
            "paired_quality_check": {"seeds": [0, num_seeds - 1], "attempts": "one per seed (no retries)",
                                     "passed": int(passed), "of": num_seeds,
                                     "failed_organs": failed}}


def evaluate_v2(num_seeds: int = 6, weights_dir: Path | None = None) -> dict:
    """Checks of the demo's v2 mask generator on the CPU, each mask as `fastmaisi generate --mask-generator v2` makes
    it (100 guided steps, decode, post-processing): how many hold a body, liver, lungs, spleen and kidneys, and the
    body size it gives for a light and a heavy synthetic weight (the demographic it was trained with), against the
    training phantoms' weight range."""
    import numpy as np

    from fastmaisi import mask_conditions as mc
    from fastmaisi.pipelines import paired, paired_v2
    from fastmaisi.pipelines.models import load_models
    from fastmaisi.phantom import make_phantom, synthetic_demographics

    variant = demo.DEMO_VARIANT.with_mask_generator("v2")
    models = load_models(variant, weights_dir or demo.DEMO_WEIGHTS_DIR, ["mask_autoencoder", "mask_diffusion",
                                                                          "autoencoder", "diffusion_unet"])
    weights = [synthetic_demographics(DATA_SEED + i)["weight"] for i in range(NUM_PHANTOMS)]
    light, heavy = float(np.percentile(weights, 10)), float(np.percentile(weights, 90))
    organs = {"liver": (1,), "lungs": (28, 29, 30, 31, 32), "spleen": (3,), "kidneys": (5, 14)}
    found = {k: 0 for k in ("body", *organs)}
    body = {"light": [], "heavy": []}
    for seed in range(num_seeds):
        for name, kg in (("light", light), ("heavy", heavy)):
            cond = mc.condition_vector({}, {"weight": kg})
            z = paired_v2.sample_mask_latent_v2(models, cond, seed=seed, latent_shape=variant.mask_latent_shape,
                                                progress=False)
            label = paired_v2.postprocess_v2(paired.decode_mask(models, z), cond)
            body[name].append(int((label > 0).sum()))
            if name == "light":
                found["body"] += int((label > 0).mean() > 0.1)
                for organ, ids in organs.items():
                    found[organ] += int(np.isin(label, ids).any())
    return {"seeds": [0, num_seeds - 1], "masks_with": {**found, "of": num_seeds},
            "weight_kg": {"light": round(light, 1), "heavy": round(heavy, 1),
                          "training_range": [min(weights), max(weights)]},
            "mean_body_voxels": {k: round(float(np.mean(v))) for k, v in body.items()},
            "heavier_has_more_body_in": int(sum(h > l for l, h in zip(body["light"], body["heavy"]))),
            "phantom_mean_body_voxels": round(float(np.mean([
                (make_phantom(demo.DEMO_SIZE, demo.DEMO_SPACING, seed=DATA_SEED + i)[1] > 0).sum()
                for i in range(12)])))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=demo.DEMO_WEIGHTS_DIR, help="where the safetensors go")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastmaisi_demo_work"), help="scratch folder")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the networks train (cpu, cuda); the checks run on the CPU")
    ap.add_argument("--only", nargs="+", choices=list(PLAN), help="retrain these stages only (others reused)")
    ap.add_argument("--eval-only", action="store_true", help="only re-run the checks into record.json")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="train the mask chain in a second process beside the image chain (default: with CUDA)")
    ap.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)  # the --parallel worker
    args = ap.parse_args(argv)
    parallel = args.device.startswith("cuda") if args.parallel is None else args.parallel
    torch.set_num_threads(max(1, args.threads // 2) if parallel or args.stages_only else args.threads)
    from fastmaisi.phantom import write_dataset
    from fastmaisi.weights import convert

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    todo = list(args.only or PLAN)
    t_start = time.time()
    record_path = args.out / "record.json"
    record = json.loads(record_path.read_text()) if (args.only or args.eval_only) and record_path.is_file() \
        else {"recipes": {}}
    if args.eval_only:
        record["evaluation"] = evaluate()
        record["evaluation_v2"] = evaluate_v2()
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["evaluation"], indent=2))
        return 0

    # 1. phantoms at the demo grid: tumours none / liver / lung in turn
    datalist = work / "phantoms" / "datalist.json"
    if not datalist.is_file():
        write_dataset(work / "phantoms", NUM_PHANTOMS, demo.DEMO_SIZE, demo.DEMO_SPACING, seed=DATA_SEED,
                      tumour="mixed", workers=args.threads)
    write_v2_datalist(datalist)
    # 2. image VAE -> encode -> diffusion UNet -> ControlNet; mask VAE -> mask diffusion UNet (the two chains are
    # independent: with --parallel the mask chain trains in a second process on the same device)
    worker, mine = None, todo
    if parallel and not args.stages_only:
        theirs = [n for n in todo if n in MASK_CHAIN]
        mine = [n for n in todo if n not in MASK_CHAIN]
        if theirs:
            worker = subprocess.Popen([sys.executable, __file__, "--stages-only", "--only", *theirs, "--work", str(work),
                                       "--scale", str(args.scale), "--threads", str(args.threads), "--device",
                                       args.device])
    for name in mine:
        if name == "diffusion" and ("vae-volume" in todo or not (work / "latents").is_dir()):
            record["encode"] = encode(work, datalist, args.device)
        record["recipes"][name] = run_stage(name, work, args.scale, args.device)
    if args.stages_only:
        return 0
    if worker is not None:
        if worker.wait() != 0:
            print(f"the mask-chain process failed (exit {worker.returncode})", file=sys.stderr)
            return 1
        for name in todo:
            record["recipes"].setdefault(name, json.loads((work / name / "summary.json").read_text()))

    # 8. safetensors (+ sidecar JSON with scale_factor), strictly checked against the demo definitions
    args.out.mkdir(parents=True, exist_ok=True)
    defs = demo.demo_definitions()
    sizes = {}
    for name in [n for n in todo if n in OUTPUTS]:
        file, role = OUTPUTS[name]
        stem, definition = SHIPPED[role]
        target = args.out / f"{stem}.safetensors"
        convert(work / name / file, target, definition)
        sidecar = target.with_name(target.name + ".json")
        meta = json.loads(sidecar.read_text())
        meta.pop("source_sha256", None)  # the scratch .pt is not shipped
        sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        sizes[target.name] = target.stat().st_size
    record.update({
        "description": "fastmaisi demo networks: narrow MAISI architectures trained by scripts/train_demo.py on "
                       "procedural phantoms (fastmaisi.phantom), fp32, on `device`",
        "command": "python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"generator": "fastmaisi.phantom.write_dataset", "num_phantoms": NUM_PHANTOMS,
                 "seeds": [DATA_SEED, DATA_SEED + NUM_PHANTOMS - 1], "tumour": "mixed (none / liver / lung in turn)",
                 "size": list(demo.DEMO_SIZE), "spacing": list(demo.DEMO_SPACING)},
        "variant": {"size": list(demo.DEMO_SIZE), "spacing": list(demo.DEMO_SPACING), "steps": demo.DEMO_STEPS,
                    "mask_steps": demo.DEMO_MASK_STEPS, "files": demo.DEMO_FILES},
        "definitions": defs, "scale": args.scale,
        "wall_seconds_this_run": round(time.time() - t_start, 1),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": args.threads, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    record.setdefault("file_bytes", {}).update(sizes)
    record["stage_seconds_sum"] = round(sum(r["seconds"] for r in record["recipes"].values())
                                         + record.get("encode", {}).get("seconds", 0.0), 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n")  # the checks below take a minute or more
    if args.out == demo.DEMO_WEIGHTS_DIR:
        t0 = time.time()
        record["evaluation"] = evaluate()
        record["evaluation"]["seconds"] = round(time.time() - t0, 1)
        if "mask-diffusion-v2" in todo:
            record["evaluation_v2"] = evaluate_v2()
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record.get("evaluation"), indent=2))
    print(f"wrote {len(sizes)} networks ({sum(sizes.values()) / 1e6:.1f} MB) and {record_path} in "
          f"{time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
