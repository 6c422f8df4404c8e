"""Workflow 3, first stage: a label map from organ sizes (mask DM -> mask VAE -> argmax -> 132-label vocabulary)."""

from __future__ import annotations

import torch

from fastmaisi.nets.derived import reuse_derived_weights
from fastmaisi.pipelines.common import latent_noise
from fastmaisi.pipelines.models import Models
from fastmaisi.pipelines.sampling import mask_denoiser, sample
from fastmaisi.schedulers import DDIMScheduler
from fastmaisi.schedulers import build as build_scheduler
from fastmaisi.variants import DDIM_SCHEDULER_DEF, DDPM_SCHEDULER_DEF

MASK_SPACING_MM = 1.5  # the mask DM's fixed output grid (reference: 256^3 at 1.5 mm)


@torch.no_grad()
def sample_mask_latent(models: Models, anatomy_sizes: list[float], *, seed: int, latent_shape, steps: int = 1000,
                       progress: bool = True) -> torch.Tensor:
    """DDPM from noise (1, *latent_shape) with the organ-size vector as the one-token cross-attention context.

    The reference's DDPM step always goes from t to t-1, so it is right only with all 1000 steps; with fewer, the
    same model is sampled with DDIM at η = 1 instead: DDPM's ancestral sampling on the respaced grid. (The
    deterministic η = 0 drifted off the training latents with the demo's mask DM: latent std 1.32 against 0.98, and
    3 of 10 masks plausible against 6 of 6.)
    """
    device, dtype = models.device, models.dtype
    context = torch.tensor(anatomy_sizes, device=device, dtype=dtype).view(1, 1, -1)
    x = latent_noise(seed, (1, *latent_shape), device, dtype)
    g = torch.Generator(device=device).manual_seed(int(seed) + 1)  # DDPM's per-step noise, drawn on the device
    scheduler = build_scheduler(DDPM_SCHEDULER_DEF if steps == DDPM_SCHEDULER_DEF["num_train_timesteps"]
                                else DDIM_SCHEDULER_DEF)
    with reuse_derived_weights(models.mask_diffusion):
        return sample(mask_denoiser(models.mask_diffusion, context), scheduler, x, steps, generator=g,
                      disable=not progress, desc="mask DM", cuda_graph=models.cuda_graphs,
                      eta=1.0 if isinstance(scheduler, DDIMScheduler) else 0.0)


@torch.no_grad()
def decode_mask(models: Models, latent: torch.Tensor, memory_budget_bytes: int | None = None,
                progress: bool = False, on_device: bool = False):
    """Mask VAE decode of z / scale_factor, argmax over the 125 classes (softmax skipped: same argmax), remap to 132.
    Returns a uint8 numpy map (X, Y, Z), or with `on_device` a uint8 tensor where the decode ran."""
    from fastmaisi.decode import decode_latent
    from fastmaisi.labels import remap_mask_labels

    with reuse_derived_weights(models.mask_autoencoder):
        logits = decode_latent(models.mask_autoencoder, (latent / models.mask_scale_factor).to(models.dtype),
                               memory_budget_bytes=memory_budget_bytes, progress=progress)
    raw = logits.argmax(dim=1)[0]
    del logits
    if on_device:
        return remap_mask_labels(raw).to(torch.uint8)
    return remap_mask_labels(raw.to(torch.int16).cpu().numpy())
