"""`fastmaisi train RECIPE` and `fastmaisi encode`: parse, validate, call, print. Exit code 2 with one line on bad
input. Multi-GPU / multi-node: run the same command under torchrun (e.g. `torchrun --nproc-per-node 8 -m fastmaisi
train diffusion ...`); --batch-size is per process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fastmaisi.argtypes import device as _device
from fastmaisi.argtypes import non_negative as _non_negative
from fastmaisi.argtypes import OneLineParser, positive_gib
from fastmaisi.argtypes import positive_int as _positive_int
from fastmaisi.variants import ROLE_CONFIG_KEYS as CONFIG_KEYS
from fastmaisi.variants import VARIANTS

RECIPES = ("vae", "diffusion", "controlnet", "mask-vae", "mask-diffusion")
# per-recipe defaults (the reference's where it has one)
DEFAULTS = {
    "vae": dict(lr=1e-4, lr_power=0.0),
    "diffusion": dict(lr=1e-5, lr_power=2.0),
    "controlnet": dict(lr=1e-5, lr_power=2.0),
    "mask-vae": dict(lr=1e-4, lr_power=0.0),
    "mask-diffusion": dict(lr=1e-4, lr_power=2.0),
}


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def _triple(kind):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected 3 numbers like 64,64,64 (or one for all)") from None
        if len(values) == 1:
            values = values * 3
        if len(values) != 3 or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected 3 positive numbers like 64,64,64")
        return values
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--data", required=True, type=Path, help="folder of NIfTI files or a MAISI datalist .json")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for checkpoints, resume.pt, train_log.csv")
    p.add_argument("--data-base-dir", type=Path, help="base of the datalist's relative paths (default: its folder)")
    p.add_argument("--variant", choices=list(VARIANTS), default="rflow-ct", help="network definitions and scheduler")
    p.add_argument("--network-config", type=Path, help="official config_network_*.json instead of --variant's")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="per process (default 1)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=_non_negative, help="peak learning rate (default: the recipe's)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (default 0)")
    p.add_argument("--lr-power", type=_non_negative, help="polynomial decay power; 0 = constant")
    p.add_argument("--grad-clip", type=_non_negative, default=0.0, help="max gradient norm; 0 = off (default)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "fp64"], default="fp32",
                   help="bf16/fp16: autocast (fp16 with a GradScaler); fp64: all in double, for numerics checks")
    p.add_argument("--ema-decay", type=_fraction, default=0.0, help="EMA of the weights; 0 = off (default)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="full", choices=["full", "selective", "outer"],
                   help="recompute activations in backward: full (each block; least memory), selective (the "
                        "diffusion UNets: keep conv/attention outputs, recompute norms and activations) or outer "
                        "(the diffusion UNets: only the full-resolution blocks); no value = full")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps; 0 = only at the end (default)")
    p.add_argument("--log-every", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--cache", action="store_true", help="keep decoded volumes in memory")
    p.add_argument("--max-bad-fraction", type=_fraction, default=0.1,
                   help="fail when more than this fraction of the volumes is unreadable (default 0.1)")
    p.add_argument("--resume", nargs="?", const="auto", type=str, metavar="RESUME_PT",
                   help="continue exactly from resume.pt (default: OUTPUT/resume.pt)")
    p.add_argument("--init", type=Path, metavar="CKPT", help="start from these weights (strict load; fine-tuning)")
    p.add_argument("-d", "--device", type=_device, default="auto",
                   help="auto, cpu, cuda, cuda:1 (torchrun: one GPU per process)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or started run in OUTPUT "
                   "(--resume continues it instead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--modality", default="ct", help="modality of items that do not name one (ct, mri_t1, 9, ...)")


def checkpointing_mode(flag: str | None) -> bool | str:
    """--gradient-checkpointing's value as `Recipe.gradient_checkpointing`: off, True (full), "selective" or "outer"."""
    return {None: False, "full": True}.get(flag, flag)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastmaisi train", description=(
        "Train a MAISI network. Writes the official checkpoint layout (loadable by `fastmaisi generate` and by the "
        "reference) plus resume.pt for exact continuation, and train_log.csv."))
    sub = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    helps = {"vae": "image autoencoder (L1 + KL + perceptual + PatchGAN)",
             "diffusion": "latent diffusion UNet on `fastmaisi encode` latents",
             "controlnet": "ControlNet on latents + label maps, with a frozen diffusion UNet",
             "mask-vae": "mask autoencoder: 8 bit-channels in, 125 classes out",
             "mask-diffusion": "mask diffusion UNet conditioned on organ sizes (v2: + demographics)"}
    for name in RECIPES:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        _common(p)
        if name in ("vae", "mask-vae"):
            p.add_argument("--patch-size", type=_triple(int), default=(64, 64, 64), help="random patches (64,64,64)")
            p.add_argument("--kl-weight", type=_non_negative, default=1e-7)
        if name == "vae":
            p.add_argument("--perceptual-weights", type=Path, help="LPIPS-squeeze weights file; without it the "
                           "perceptual term is off (see fastmaisi.train.losses.PerceptualLoss)")
            p.add_argument("--perceptual-weight", type=_non_negative, default=0.3)
            p.add_argument("--adv-weight", type=_non_negative, default=0.1, help="PatchGAN weight; 0 = no GAN")
            p.add_argument("--recon-loss", choices=["l1", "l2"], default="l1")
        if name in ("diffusion", "controlnet", "mask-diffusion"):
            p.add_argument("--scale-factor", type=float, help="latent scale (default: the checkpoint's, else "
                           "1/std of the first batch)")
        if name == "diffusion":
            p.add_argument("--modality-dropout", type=_fraction, default=0.1,
                           help="p of modality coarsening and of the null class (default 0.1)")
        if name == "controlnet":
            p.add_argument("--diffusion", type=Path, required=True, metavar="CKPT", help="the trained diffusion UNet")
            p.add_argument("--roi-labels", type=int, nargs="+", help="label ids weighted by --roi-weight (default: "
                           "23 for rflow-ct, 129 otherwise, as the reference configs)")
            p.add_argument("--roi-weight", type=_non_negative, default=100.0)
            p.add_argument("--contrastive-weight", type=_non_negative, help="region-contrastive loss weight "
                           "(default 0.01 for rflow-ct, 0 = off otherwise)")
            p.add_argument("--contrastive-delta", type=_non_negative, default=2.0)
            p.add_argument("--exclude-fold", type=int, default=0, help="datalist items with this fold are "
                           "validation and not trained on (default 0, as the reference; -1 = use all)")
        if name in ("mask-vae", "mask-diffusion"):
            p.add_argument("--spacing", type=_triple(float), default=(1.5, 1.5, 1.5), help="mm (default 1.5)")
        if name == "mask-diffusion":
            p.add_argument("--mask-autoencoder", type=Path, required=True, metavar="CKPT")
            p.add_argument("--size", type=_triple(int), default=(256, 256, 256), help="label grid (256,256,256)")
            p.add_argument("--loss", choices=["l1", "mse"], default="l1")
            p.add_argument("--latent", choices=["sample", "mean"], default="sample",
                           help="mask-VAE latent: sampled z (default) or the mean")
            p.add_argument("--mask-generator", choices=["v1", "v2"], default="v1",
                           help="v1: DDPM UNet on 10 organ sizes (default); v2: NVIDIA's AdaGN rflow-mask UNet on "
                                "19 numbers (sizes + the datalist's age/sex/weight/bmi/height), rectified flow")
    return parser


def _definitions(args, roles) -> tuple[dict, dict]:
    """(role -> network definition, noise scheduler definition) from --network-config or --variant."""
    from fastmaisi import variants

    variant = variants.get_variant(args.variant)
    mask = args.recipe == "mask-diffusion"
    v2 = mask and getattr(args, "mask_generator", "v1") == "v2"
    scheduler = variants.DDPM_SCHEDULER_DEF if mask else variant.scheduler
    if v2:
        from fastmaisi.pipelines.paired_v2 import MASK_V2_SCHEDULER_DEF as scheduler
    builtin = {**variant.definitions(), "mask_autoencoder": variants.MASK_AUTOENCODER_DEF,
               "mask_diffusion": variants.MASK_DIFFUSION_V2_DEF if v2 else variants.MASK_DIFFUSION_DEF}
    if args.network_config is None:
        return {r: dict(builtin[r]) for r in roles}, dict(scheduler)
    from fastmaisi.config import resolve_network_definition

    config = json.loads(args.network_config.read_text())
    defs = {r: resolve_network_definition(config, CONFIG_KEYS[r]) for r in roles}
    return defs, config.get("mask_generation_noise_scheduler" if mask else "noise_scheduler", scheduler)


def _setup_logging(main: bool) -> None:
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s", stream=sys.stderr)


def _earlier_run(out: Path) -> list[str]:
    """Files of an earlier training run in `out` (checkpoints, resume.pt, the log) that a new run would replace."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".") and
                  (p.suffix in (".pt", ".safetensors") or p.name == "train_log.csv"))


def _check_patch_size(args, definitions) -> None:
    """VAE patches must halve cleanly through every downsampling of the autoencoder: refused here, not as a shape
    error inside a training step."""
    patch = getattr(args, "patch_size", None)
    if patch is None or "autoencoder" not in definitions:
        return
    factor = 2 ** (len(definitions["autoencoder"].get("num_channels", (0, 0, 0))) - 1)
    if any(p % factor for p in patch):
        raise ValueError(f"--patch-size {','.join(map(str, patch))}: each side must be a multiple of {factor} "
                         f"(the autoencoder downsamples by {factor})")


def train_main(argv: list[str] | None = None) -> int:
    """`fastmaisi train RECIPE -i DATA -o OUT [options]`."""
    args = build_parser().parse_args(argv)
    earlier = _earlier_run(args.output)
    if earlier and args.resume is None and not args.overwrite:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        print(f"fastmaisi train {args.recipe}: {args.output} holds an earlier run ({shown}); --resume continues it, "
              "--overwrite replaces it, or choose another folder", file=sys.stderr)
        return 2
    from fastmaisi.cli_guard import CreatedFolders, is_fault

    created = CreatedFolders(args.output)
    from fastmaisi.train.loop import TrainConfig, init_distributed, train
    from fastmaisi.train.trainers import ROLES, TRAINERS, Recipe

    dist = init_distributed(None if args.device == "auto" else args.device)
    _setup_logging(dist.is_main)
    defaults = DEFAULTS[args.recipe]
    resume = None if args.resume is None else Path(args.output / "resume.pt" if args.resume == "auto" else args.resume)
    rflow_ct = args.variant == "rflow-ct"
    try:
        cfg = TrainConfig(out_dir=args.output, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          lr=args.lr if args.lr is not None else defaults["lr"], warmup_steps=args.warmup_steps,
                          lr_power=args.lr_power if args.lr_power is not None else defaults["lr_power"],
                          grad_clip=args.grad_clip, precision=args.precision, ema_decay=args.ema_decay,
                          checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
                          num_workers=args.num_workers, resume=resume, progress=not args.no_progress)
        definitions, scheduler = _definitions(args, ROLES[args.recipe])
        _check_patch_size(args, definitions)
        recipe = Recipe(data=args.data, definitions=definitions, scheduler=scheduler, base_dir=args.data_base_dir,
                        modality=args.modality, cache=args.cache, max_bad_fraction=args.max_bad_fraction,
                        init=args.init, gradient_checkpointing=checkpointing_mode(args.gradient_checkpointing))
        for key in ("patch_size", "kl_weight", "perceptual_weights", "perceptual_weight", "adv_weight", "recon_loss",
                    "scale_factor", "modality_dropout", "diffusion", "roi_weight", "contrastive_delta", "spacing",
                    "mask_autoencoder", "size", "loss", "latent"):
            if hasattr(args, key):
                setattr(recipe, key, getattr(args, key))
        if args.recipe == "controlnet":
            recipe.roi_labels = tuple(args.roi_labels or ((23,) if rflow_ct else (129,)))
            recipe.contrastive_weight = (args.contrastive_weight if args.contrastive_weight is not None
                                         else (0.01 if rflow_ct else 0.0))
            recipe.exclude_fold = None if args.exclude_fold == -1 else args.exclude_fold
        else:
            recipe.exclude_fold = None
        import torch

        torch.manual_seed(args.seed)  # the same initial weights on every process and in every run
        setup = TRAINERS[args.recipe]
        if getattr(args, "mask_generator", "v1") == "v2":
            from fastmaisi.train.mask_v2 import setup_mask_diffusion_v2 as setup
        task = setup(recipe, cfg, dist)
        history = train(task, cfg, dist)
    except KeyboardInterrupt:
        from fastmaisi.cli_guard import interrupted

        return interrupted(f"fastmaisi train {args.recipe}", created,
                           "the last checkpoint and resume.pt were kept (--resume continues)")
    except Exception as e:  # CheckpointError is a ValueError
        if not is_fault(e):
            raise
        print(f"fastmaisi train {args.recipe}: error: {' '.join(str(e).split())}", file=sys.stderr)
        created.remove_empty()
        return 2
    finally:
        _finish(dist)
    if dist.is_main:
        last = f", final loss {history[-1]['loss']:.5g}" if history else ""
        print(f"trained {args.recipe} for {cfg.steps} steps{last}; checkpoints in {args.output}")
    return 0


def _finish(dist) -> None:
    import torch.distributed as tdist

    if dist.world_size > 1 and tdist.is_initialized():
        tdist.destroy_process_group()


def build_encode_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastmaisi encode", description=(
        "Encode images to latents for diffusion/ControlNet training: <name>_emb.nii.gz (float32 [X/4,Y/4,Z/4,4]) + "
        "<name>_emb.nii.gz.json (dim, spacing, modality[, label, regions]). Reference rules: RAS; each axis resized "
        "to the nearest multiple of 128 (min 128); CT -1000..1000 HU -> 0..1 clipped; MR percentiles 0..99.5 -> "
        "0..1. Existing outputs are skipped."))
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of NIfTI images or a MAISI datalist .json")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (the input's layout is kept)")
    p.add_argument("--autoencoder", required=True, type=Path, help="autoencoder weights (e.g. autoencoder_v1.pt)")
    p.add_argument("--variant", choices=list(VARIANTS), default="rflow-ct", help="autoencoder definition")
    p.add_argument("--network-config", type=Path, help="official config_network_*.json (its autoencoder_def)")
    p.add_argument("--data-base-dir", type=Path, help="base of the datalist's relative paths (default: its folder)")
    p.add_argument("--labels", type=Path, help="folder of label maps named like the images (for ControlNet)")
    p.add_argument("--modality", default="ct", help="modality of images the datalist does not label (default ct)")
    p.add_argument("--multiple", type=_positive_int, default=128, help="resize each axis to a multiple of this")
    p.add_argument("--latent", choices=["sample", "mean"], default="sample",
                   help="z = mu + sigma*eps with a seed per image (default, as the reference) or the mean mu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--memory-budget-gb", type=positive_gib, help="device memory the encoder may use (default: what is "
                   "free)")
    p.add_argument("--overwrite", action="store_true", help="re-encode existing outputs")
    p.add_argument("--max-bad-fraction", type=_fraction, default=0.1)
    p.add_argument("-d", "--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true")
    return p


def encode_main(argv: list[str] | None = None) -> int:
    """`fastmaisi encode -i IMAGES -o LATENTS --autoencoder CKPT [options]`."""
    args = build_encode_parser().parse_args(argv)
    from fastmaisi.train.encode import EncodeRequest, encode_volumes
    from fastmaisi.train.loop import init_distributed

    dist = init_distributed(None if args.device == "auto" else args.device)
    _setup_logging(dist.is_main)
    try:
        args.recipe = "encode"
        definition = _definitions(args, ("autoencoder",))[0]["autoencoder"]
        budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
        counts = encode_volumes(EncodeRequest(
            source=args.input, out_dir=args.output, autoencoder=args.autoencoder, definition=definition,
            base_dir=args.data_base_dir, labels=args.labels, modality=args.modality, multiple=args.multiple,
            latent=args.latent, seed=args.seed, precision=args.precision, memory_budget_bytes=budget,
            overwrite=args.overwrite, max_bad_fraction=args.max_bad_fraction), dist, progress=not args.no_progress)
    except KeyboardInterrupt:
        from fastmaisi.cli_guard import interrupted

        return interrupted("fastmaisi encode", kept="latents already written were kept (a rerun skips them)")
    except Exception as e:
        from fastmaisi.cli_guard import is_fault

        if not is_fault(e):
            raise
        print(f"fastmaisi encode: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        _finish(dist)
    print(f"encoded {counts['written']} volumes to {args.output} ({counts['existing']} already there, "
          f"{counts['unreadable']} unreadable)")
    return 0
