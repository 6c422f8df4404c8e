"""`fastmaisi train mask-diffusion --mask-generator v2`: our training recipe for the v2 mask generator (NVIDIA's
AdaGN `rflow-mask` UNet; NVIDIA publishes no training code for it).

Rectified flow (the config's `mask_generation_noise_scheduler`, scale 1.0) on frozen mask-VAE latents, velocity
target x0 - eps, L1 (or MSE). The 19-number condition of each sample is drawn from the label map's sizes and the
datalist item's demographics (keys age, sex, weight, bmi, height when present) the way the model is used, one size
target at most:
  - with p `COND_DROP` (0.1) all 19 are -1 (the unconditional branch of classifier-free guidance);
  - else, with p 0.8, one of the size slots present in the map (uniformly), the others -1;
  - each demographic the item has is kept with p 0.5.
Sizes are organ voxels / labelled voxels (our rule, as the v1 recipe's `organ_size_vector`); lung = the 5 lobes.
Spacing input: the label grid's spacing x 100.
"""

from __future__ import annotations

import numpy as np
import torch

from fastmaisi import mask_conditions as mc
from fastmaisi.train import data as D
from fastmaisi.train.loop import Dist, Task, TrainConfig
from fastmaisi.train.losses import per_sample_mean, upcast
from fastmaisi.train.trainers import (
    Recipe,
    _adam,
    _diffusion_export,
    _scale_factor,
    build_net,
    label_items,
    load_label_resampled,
    load_weights,
    mask_latents,
    noise_and_timesteps,
    training_target,
)

COND_DROP = 0.1  # p of the all -1 (unconditional) condition
SIZE_TARGET = 0.8  # p of one size slot being set (when the map has any)
KEEP_DEMOGRAPHIC = 0.5  # p of each known demographic being kept
SLOT_LABELS = {"liver": (1,), "spleen": (3,), "stomach": (12,), "pancreas": (4,), "colon": (62,),
               "left kidney": (14,), "right kidney": (5,), "lung": (28, 29, 30, 31, 32), "gallbladder": (10,),
               "lung tumor": (23,), "pancreatic tumor": (24,), "hepatic tumor": (26,),
               "colon cancer primaries": (27,), "bone lesion": (128,)}
V2_CHECKPOINT = "mask_generation_diffusion_unet_v2.pt"


def size_slots(label: np.ndarray) -> list[float]:
    """The 14 size slots of a label map: slot voxels / labelled voxels, -1 when absent."""
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=256)
    body = max(int(counts[1:].sum()), 1)
    out = []
    for name in mc.SIZE_SLOTS:
        n = int(sum(counts[i] for i in SLOT_LABELS[name]))
        out.append(n / body if n else mc.UNSET)
    return out


def item_demographics(item: dict) -> dict:
    """The demographics a datalist item carries (keys age, sex, weight, bmi, height), checked as at inference."""
    found = {k: item[k] for k in mc.DEMOGRAPHICS if item.get(k) is not None}
    if "weight" in found and "bmi" in found:  # never together at inference: keep bmi
        found.pop("weight")
    found = {k: mc.parse_demographic(k, v) for k, v in found.items()}
    mc.check_conditions({}, found)
    return found


def draw_condition(sizes: list[float], demographics: dict, rng: np.random.Generator) -> list[float]:
    """One training condition (19 numbers) from a map's sizes and its item's demographics (module docstring)."""
    if rng.random() < COND_DROP:
        return [mc.UNSET] * mc.CONDITION_DIM
    present = [i for i, v in enumerate(sizes) if v != mc.UNSET]
    target = {}
    if present and rng.random() < SIZE_TARGET:
        i = present[int(rng.integers(len(present)))]
        target = {mc.SIZE_SLOTS[i]: sizes[i]}
    kept = {k: v for k, v in demographics.items() if rng.random() < KEEP_DEMOGRAPHIC}
    return mc.condition_vector(target, kept)


def _latents(mask_ae, batch: dict, recipe: Recipe) -> torch.Tensor:
    """The batch's mask latents: encoded at load time (--latent mean) or now (sampled z)."""
    return upcast(batch["latent"]) if "latent" in batch else mask_latents(mask_ae, batch, recipe.latent)


def mask_diffusion_v2_loss(model, batch: dict, *, mask_ae, scheduler, extra: dict, recipe: Recipe):
    """Rectified flow on mask latents; the condition drives both AdaGN and the cross-attention."""
    x0 = _latents(mask_ae, batch, recipe) * extra["scale_factor"]
    noise, t = noise_and_timesteps(scheduler, x0, batch["seed"])
    out = model(x=scheduler.add_noise(x0, noise, t), timesteps=t, context=batch["context"],
                spacing_tensor=batch["spacing"])
    diff = upcast(out) - upcast(training_target(scheduler, x0, noise, t))
    return per_sample_mean(diff.abs() if recipe.loss == "l1" else diff.pow(2))


def setup_mask_diffusion_v2(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> Task:
    from fastmaisi.schedulers import RFlowScheduler
    from fastmaisi.schedulers import build as build_scheduler

    if recipe.mask_autoencoder is None:
        raise ValueError("mask-diffusion training needs the trained mask autoencoder: --mask-autoencoder CHECKPOINT")
    definition = recipe.definitions["mask_diffusion"]
    if not definition["_target_"].endswith("DiffusionModelUNetMaisiAdaGN"):
        raise ValueError(f"--mask-generator v2 trains DiffusionModelUNetMaisiAdaGN; the definition is "
                         f"{definition['_target_']} (use the 2026-10 config or leave out --network-config)")
    mask_ae = build_net(recipe.definitions["mask_autoencoder"])
    load_weights(mask_ae, recipe.mask_autoencoder, "mask autoencoder")
    mask_ae = mask_ae.to(dist.device).eval().requires_grad_(False)
    unet = build_net(definition, recipe.gradient_checkpointing)
    meta = load_weights(unet, recipe.init, "v2 mask diffusion UNet")
    scheduler = build_scheduler(recipe.scheduler)
    if not isinstance(scheduler, RFlowScheduler):
        raise ValueError("the v2 mask generator trains with rectified flow (mask_generation_noise_scheduler)")
    load = load_label_resampled(recipe.spacing, recipe.size)
    spacing = torch.tensor([float(s) * 100.0 for s in recipe.spacing], dtype=torch.float32)

    def load_with_sizes(item: dict) -> dict:
        out = load(item)
        out["sizes"] = size_slots(out["label"][0].numpy())
        out["demographics"] = item_demographics(item)
        if recipe.latent == "mean":  # deterministic: encoded once here (with --cache, once per map for the run)
            batch = {"label": out.pop("label")[None].to(dist.device)}
            out["latent"] = mask_latents(mask_ae, batch, "mean")[0].cpu()
        return out

    def make(decoded: dict, rng: np.random.Generator) -> dict:
        cond = draw_condition(decoded["sizes"], decoded["demographics"], rng)
        key = "latent" if "latent" in decoded else "label"
        return {key: decoded[key], "context": torch.tensor([cond], dtype=torch.float32), "spacing": spacing.clone()}

    dataset = D.SampleDataset(label_items(recipe), load_with_sizes, make, recipe.cache, recipe.max_bad_fraction)
    extra = {"scale_factor": _scale_factor(recipe, meta, dataset, cfg, dist, lambda b: _latents(mask_ae, b, recipe))}
    return Task("mask-diffusion", unet,
                lambda m, b: mask_diffusion_v2_loss(m, b, mask_ae=mask_ae, scheduler=scheduler, extra=extra,
                                                    recipe=recipe),
                dataset, _diffusion_export(V2_CHECKPOINT, scheduler.num_train_timesteps), definition,
                optimizer=_adam(), extra=extra, frozen=(mask_ae,),
                find_unused_parameters=True)  # a length-1 cross-attention skips to_q / to_k


__all__ = ["setup_mask_diffusion_v2", "size_slots", "draw_condition", "item_demographics", "V2_CHECKPOINT"]
