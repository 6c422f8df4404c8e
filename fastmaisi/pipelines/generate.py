"""`generate`: one request -> the three workflows -> checked, written volumes. Validates everything before compute."""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastmaisi.variants import Variant, fov_warnings, get_variant

RETRY_SEED_STRIDE = 100_003  # retry k of sample i uses seed + i + k * stride: never collides with another sample's seed


@dataclass
class GenerateRequest:
    """Everything a run depends on; stored in every output's JSON record, so a record reproduces its volume."""

    output_dir: str
    variant: str | None = None  # None: rflow-ct with --weights, the built-in demo without
    weights: str | None = None
    network_config: str | None = None
    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    modality: str | int | None = None
    body_region: tuple[str, str] = ("chest", "abdomen")
    mask: str | None = None
    mask_db: str | None = None  # folder of candidate label maps (the reference's mask database path)
    strict_mask: bool = False
    organ_sizes: dict = field(default_factory=dict)
    steps: int | None = None
    mask_steps: int | None = None  # None: the variant's (1000; the demo's 100)
    guidance_scale: float | None = None
    seed: int = 0
    num_samples: int = 1
    max_retries: int = 2
    device: str = "auto"
    memory_budget_gb: float | None = None
    decode_devices: tuple[str, ...] | None = None  # split the decode along D over these devices (budget per device)
    overwrite: bool = False
    fmt: str = "nifti"
    sampler: str = "euler"  # "euler" (the reference's) or "ab2" (rectified flow only; faster, not bit-compatible)
    cuda_graphs: bool = True  # CUDA: replay denoiser steps from a CUDA graph (small latents: sampling.GRAPH_MAX_VOXELS)

    workflow_name: str | None = None  # "image", "from-mask" or "paired"; None: from-mask with --mask, paired with
    # --organ-size (or with the demo), else image

    @property
    def variant_name(self) -> str:
        return self.variant or ("rflow-ct" if self.weights else "demo")

    @property
    def workflow(self) -> str:
        if self.workflow_name:
            return self.workflow_name
        if self.mask or self.mask_db:
            return "from-mask"
        if self.organ_sizes or get_variant(self.variant_name).default_organ_sizes:
            return "paired"
        return "image"


def resolve(request: GenerateRequest) -> tuple[Variant, dict]:
    """Fill variant defaults and check every input; raise ValueError (one clear line) before any compute."""
    from fastmaisi.labels import anatomy_size_vector, modality_code

    variant = get_variant(request.variant_name)
    size = tuple(request.size or variant.size)
    spacing = tuple(request.spacing or variant.spacing)
    if len(size) != 3 or any(int(s) != s or s <= 0 or s % 32 for s in size):
        raise ValueError(f"--size {' '.join(map(str, size))}: each size must be a positive multiple of 32 "
                         "(the latent is 4x smaller and the UNet halves it three times)")
    if len(spacing) != 3 or any(not 0.1 <= s <= 10.0 for s in spacing):
        raise ValueError(f"--spacing {' '.join(map(str, spacing))}: each spacing must be in 0.1..10 mm")
    code = modality_code(request.modality if request.modality is not None else variant.modality_code)
    is_ct = code <= 7
    if is_ct != (variant.modality == "ct"):
        raise ValueError(f"--modality {request.modality!r} does not match variant {variant.name} "
                         f"({'CT' if variant.modality == 'ct' else 'MR'})")
    if (request.mask or request.mask_db or request.organ_sizes) and not variant.has_controlnet:
        raise ValueError(f"variant {variant.name} has no ControlNet: --mask, --mask-db and --organ-size need a CT "
                         "variant")
    if sum(map(bool, (request.mask, request.mask_db, request.organ_sizes))) > 1:
        raise ValueError("--mask, --mask-db and --organ-size are different workflows: give one of them")
    if request.sampler not in ("euler", "ab2"):
        raise ValueError(f"--sampler {request.sampler!r}: choose euler or ab2")
    if request.sampler == "ab2" and not variant.scheduler["_target_"].endswith("RFlowScheduler"):
        raise ValueError(f"--sampler ab2 is for rectified-flow variants; {variant.name} uses DDPM")
    organ_sizes = request.organ_sizes or (variant.default_organ_sizes if request.workflow == "paired" else None)
    if request.workflow == "paired" and not organ_sizes:
        raise ValueError(f"the paired workflow needs organ sizes: --organ-size NAME=FRACTION (variant {variant.name} "
                         "has no defaults)")
    anatomy = anatomy_size_vector(organ_sizes) if organ_sizes else None
    steps = request.steps or variant.steps
    if steps < 1 or (variant.scheduler["_target_"].endswith("DDPMScheduler") and 1000 % steps):
        raise ValueError(f"--steps {steps}: must be >= 1 (and divide 1000 for DDPM)")
    if request.num_samples < 1 or request.max_retries < 0:
        raise ValueError("--num-samples must be >= 1 and --max-retries >= 0")
    guidance = variant.guidance_scale if request.guidance_scale is None else request.guidance_scale
    for w in fov_warnings(variant, size, spacing):
        warnings.warn(w, stacklevel=2)
    mask_steps = request.mask_steps or variant.mask_steps
    if mask_steps < 1 or 1000 % mask_steps:
        raise ValueError(f"--mask-steps {mask_steps}: must divide 1000 (DDPM)")
    return variant, dict(size=size, spacing=spacing, modality_code=code, steps=steps, guidance_scale=guidance,
                         anatomy=anatomy, mask_steps=mask_steps, sampler=request.sampler)


def generate(request: GenerateRequest, progress: bool = True, dry_run: bool = False) -> list[dict]:
    """Run a request; returns one dict per written sample (paths + record). See DESIGN: plan, mask, condition,
    sample, decode, check, write."""
    import torch

    from fastmaisi import io
    from fastmaisi.pipelines import models as model_io

    # 1. plan: inputs, weights and outputs are checked before anything heavy happens
    variant, opts = resolve(request)
    workflow = request.workflow
    roles = ["autoencoder", "diffusion_unet"]
    if workflow != "image":
        roles.append("controlnet")
    if workflow == "paired":
        roles += ["mask_autoencoder", "mask_diffusion"]
    weights_dir = _weights_dir(request, variant, roles, opts, dry_run)
    user_label, user_mask_info, candidates = None, None, []
    if request.mask:
        user_label, user_mask_info = _load_user_mask(request, opts, request.mask)
    elif request.mask_db:
        from fastmaisi.pipelines.mask_db import rank_candidates

        candidates = rank_candidates(request.mask_db, opts["size"], opts["spacing"])
    rank, world, local_rank = _torchrun_rank()
    indices = [i for i in range(request.num_samples) if i % world == rank]  # under torchrun: rank r takes i % world == r
    stems = {i: f"sample_{request.seed + i:06d}" for i in indices}  # seed-named: no two ranks write the same file
    device = _device(request.device, local_rank if world > 1 else None)
    budget = int(request.memory_budget_gb * 2**30) if request.memory_budget_gb else None
    decode_devices = _decode_devices(request.decode_devices)
    if dry_run:
        from fastmaisi.pipelines.estimate import sampling_plan

        print(f"Plan (dry run: nothing is written)\n{sampling_plan(variant, workflow, opts, device)}\n"
              f"{_decode_plan(opts, device, budget, variant=variant, devices=decode_devices).describe()}")
        return []
    io.check_output_dir(request.output_dir, list(stems.values()), overwrite=request.overwrite)

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = model_io.load_models(variant, weights_dir, roles, device=device, dtype=dtype,
                                  network_config=request.network_config)
    models.cuda_graphs = request.cuda_graphs
    models.decode_devices = decode_devices
    plan = _plan_text(opts, device, budget, models.autoencoder, devices=decode_devices)
    results = []
    for i, stem in stems.items():
        attempts = []
        for k in range(request.max_retries + 1):
            seed = request.seed + i + k * RETRY_SEED_STRIDE
            t0 = time.perf_counter()
            if candidates:  # mask database: sample i starts at the i-th best mask; each retry takes the next one
                user_label, user_mask_info = _load_user_mask(request, opts, candidates[(i + k) % len(candidates)])
            image_hu, label, timings = one_volume(models, workflow, opts, seed, user_label, budget, progress)
            # 6. check: per-organ median HU (CT only); a failed check retries with a new seed
            qc = _quality(variant, image_hu, label)
            attempts.append({"seed": seed, "quality_check": qc, "seconds": round(time.perf_counter() - t0, 2),
                             "timings": timings, "mask": user_mask_info})
            if qc is None or qc["passed"]:
                break
        # 7. write: int16 image, uint8 label, record, preview — atomically
        record = _record(request, variant, opts, models, attempts, plan, device, user_mask_info)
        record["rank"], record["world_size"] = rank, world
        paths = io.write_outputs(request.output_dir, stem, image_hu, label, opts["spacing"], record,
                                 fmt=request.fmt, overwrite=request.overwrite, modality=variant.modality)
        results.append({"paths": paths, "record": record})
    return results


def one_volume(models, workflow, opts, seed, user_label, budget, progress):
    """Stages 2-5 for one seed: mask (paired), condition, sample, decode. Returns (image_hu, label or None, timings)."""
    from fastmaisi.io import hu_from_unit
    from fastmaisi.pipelines import common, from_mask, image, paired
    from fastmaisi.pipelines.mask_postprocess import postprocess_mask

    timings = {}
    t = time.perf_counter()
    label = user_label
    if workflow == "paired":
        # 2. mask: organ sizes -> mask DM -> mask VAE -> 132-label map on the mask grid -> requested grid
        z = paired.sample_mask_latent(models, opts["anatomy"], seed=seed, latent_shape=models.mask_latent_shape,
                                      steps=opts["mask_steps"], progress=progress)
        raw = postprocess_mask(paired.decode_mask(models, z, budget, progress), opts["anatomy"])
        label = common.resample_label(raw, models.mask_spacing, opts["size"], opts["spacing"])
        timings["mask_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
    # 3-4. condition + sample
    common_kw = dict(spacing=opts["spacing"], modality_code=opts["modality_code"], steps=opts["steps"],
                     guidance_scale=opts["guidance_scale"], seed=seed, progress=progress,
                     sampler=opts["sampler"])
    if label is None:
        z = image.sample_image_latent(models, size=opts["size"], **common_kw)
    else:
        z = from_mask.sample_latent_from_mask(models, label, **common_kw)
    timings["sample_s"] = round(time.perf_counter() - t, 2)
    # 5. decode: exact whole-volume decode -> HU
    t = time.perf_counter()
    unit = common.decode_to_unit(models, z, budget, progress)
    image_hu = hu_from_unit(unit[0, 0], models.variant.modality)
    if label is not None:
        image_hu = from_mask.crop_to_body(image_hu, label, -1000 if models.variant.modality == "ct" else 0)
    timings["decode_s"] = round(time.perf_counter() - t, 2)
    return image_hu, label, timings


def _quality(variant, image_hu, label):
    if variant.modality != "ct" or label is None:
        return None
    from fastmaisi.labels import quality_check

    result = quality_check(image_hu, label)
    return {"passed": bool(result.passed), "failed": list(result.failed),
            "medians": {k: (None if v is None else float(v)) for k, v in result.medians.items()}}


def _load_user_mask(request, opts, path):
    """Read, validate, body-envelope and resample a label map (the user's, or a database candidate) to the grid."""
    from fastmaisi import io, labels
    from fastmaisi.pipelines.common import resample_label
    from fastmaisi.weights import sha256_file

    label, spacing, _ = io.read_label_map(path)
    info = labels.validate_label_map(label)
    if not info["has_body"]:
        if request.strict_mask:
            raise ValueError(f"--mask {path}: no body label (200) and --strict-mask was given")
        warnings.warn(f"--mask {path} has no body label (200): adding it with the documented envelope rule",
                      stacklevel=2)
        label = labels.add_body_envelope(label, spacing=spacing)
    resampled = resample_label(label, spacing, opts["size"], opts["spacing"])
    return resampled, {"path": str(path), "sha256": sha256_file(path),
                       "spacing": [float(s) for s in spacing], "shape": list(label.shape),
                       "body_added": not info["has_body"]}


def _torchrun_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets for each process; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _device(name: str, local_rank: int | None = None):
    """The torch device for --device `name`; under torchrun (`local_rank` given) "auto" and a bare "cuda" mean
    cuda:<local rank>. A CUDA device also becomes the process's current device: the Triton GroupNorm kernels launch
    on the current device, so without it every rank's kernels would run on GPU 0."""
    import torch

    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _weights_dir(request: GenerateRequest, variant, roles, opts, dry_run: bool) -> Path | None:
    """The folder the networks load from, its files checked now: --weights, or the built-in demo's; None for a
    dry run of a named variant without --weights (a plan needs the config, not the weights)."""
    from fastmaisi.pipelines.models import missing_weight_files

    if request.weights:
        weights_dir = Path(request.weights)
        if not weights_dir.is_dir():
            raise ValueError(f"--weights {request.weights}: not a folder with the {variant.name} weight files")
        missing = missing_weight_files(variant, weights_dir, roles)
        if missing:
            raise ValueError(f"--weights {weights_dir}: missing {', '.join(missing)}")
        return weights_dir
    if variant.name != "demo":
        if dry_run:
            return None
        raise ValueError(f"no --weights given: pass --weights DIR, a folder with the {variant.name} weight files "
                         "(official .pt or converted .safetensors), or leave out --variant to run the built-in demo")
    from fastmaisi.variants import DEMO_WEIGHTS_DIR

    print(f"no --weights: the built-in demo networks ({'x'.join(map(str, opts['size']))} phantom-trained toys, not "
          "real CT; fastmaisi/data/demo)", file=sys.stderr)
    missing = missing_weight_files(variant, DEMO_WEIGHTS_DIR, roles) if DEMO_WEIGHTS_DIR.is_dir() else ["the folder"]
    if missing:
        raise ValueError(f"the built-in demo weights are not installed ({DEMO_WEIGHTS_DIR}: missing "
                         f"{', '.join(missing)}); reinstall fastmaisi, run scripts/train_demo.py, or pass --weights DIR")
    return DEMO_WEIGHTS_DIR


def _decode_devices(names):
    """--decode-devices as torch devices (None: the one-device decode); each checked to exist."""
    if not names:
        return None
    import torch

    devices = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not (
                torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count())):
            raise ValueError(f"--decode-devices {','.join(names)}: {name!r} is not a device of this machine")
        devices.append(torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None else dev)
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"--decode-devices {','.join(names)}: give devices of one kind (all cuda, or all cpu)")
    return devices


def _plan_text(opts, device, budget, vae=None, variant=None, devices=None) -> str:
    """Steps and the decode's memory/time plan, for the record."""
    plan = _decode_plan(opts, device, budget, vae, variant, devices)
    return f"{opts['steps']} sampling steps at latent {tuple(plan.input_shape[2:])} on {device}. {plan.describe()}"


def _decode_plan(opts, device, budget, vae=None, variant=None, devices=None):
    """The decode's plan (of `vae`, else of the variant's autoencoder built without weights); with `devices`, the
    plan of the decode split over them."""
    import torch

    from fastmaisi.decode import plan_decode

    if vae is None and variant is not None:
        from fastmaisi.nets import build

        with torch.device("meta"):
            vae = build(variant.definitions()["autoencoder"])

    latent = (1, 4, *[s // 4 for s in opts["size"]])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if devices:
        from fastmaisi.decode.split import plan_split

        return plan_split(latent, devices, budget, dtype, vae=vae)
    return plan_decode(latent, device, budget, dtype, vae=vae)


def _record(request, variant, opts, models, attempts, plan, device, mask_info) -> dict:
    import torch

    from fastmaisi import __version__

    return {"fastmaisi_version": __version__, "torch": torch.__version__, "variant": variant.name,
            "workflow": request.workflow, "request": asdict(request),
            "resolved": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
            "mask": mask_info, "weights": models.files, "scale_factor": models.scale_factor,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "dtype": str(models.dtype), "decode_plan": plan, "attempts": attempts,
            "seed": attempts[-1]["seed"], "quality_check": attempts[-1]["quality_check"],
            "retries": len(attempts) - 1}
