"""Workflow 1: image only (CT or MR, by modality; body region for ddpm-ct), with modality guidance."""

from __future__ import annotations

import torch

from fastmaisi.nets.derived import reuse_derived_weights
from fastmaisi.pipelines.common import latent_noise, region_tensor, spacing_tensor
from fastmaisi.pipelines.models import Models
from fastmaisi.pipelines.sampling import image_denoiser, sample
from fastmaisi.schedulers import build as build_scheduler


@torch.no_grad()
def sample_image_latent(models: Models, *, size, spacing, modality_code: int, steps: int, guidance_scale: float,
                        seed: int, body_region=("chest", "abdomen"), progress: bool = True,
                        sampler: str = "euler") -> torch.Tensor:
    """Noise -> latent (1, 4, *size/4) with the image DM alone (no ControlNet), as the reference's diff_model_infer."""
    device, dtype = models.device, models.dtype
    variant = models.variant
    x = latent_noise(seed, (1, 4, *[s // 4 for s in size]), device, dtype)
    kwargs = dict(spacing=spacing_tensor(spacing, device, dtype), guidance_scale=guidance_scale)
    if variant.body_region:
        kwargs.update(top_region=region_tensor(body_region[0], device, dtype),
                      bottom_region=region_tensor(body_region[1], device, dtype))
    else:
        kwargs["class_labels"] = torch.tensor([modality_code], device=device, dtype=torch.long)
    denoise = image_denoiser(models.diffusion_unet, **kwargs)
    g = torch.Generator(device=device).manual_seed(int(seed) + 1)  # DDPM's per-step noise (RFlow draws none)
    with reuse_derived_weights(models.diffusion_unet):
        return sample(denoise, build_scheduler(models.scheduler_def), x, steps, generator=g, disable=not progress,
                      desc="image DM", method=sampler, cuda_graph=models.cuda_graphs)
