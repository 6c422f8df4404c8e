"""Workflow 3, first stage with NVIDIA's v2 mask generator (`rflow-mask`): the 19-number condition -> 100 guided
rectified-flow steps on the 64^3 mask latent -> mask VAE (our exact decode) -> argmax -> 132 labels -> clean-up.

As NV-Generate-CTMR `ldm_conditional_sample_one_mask`: RFlow (scale 1.0, timestep shift for the latent's numel),
classifier-free guidance in one batch of 2 ([cond, all -1]), spacing [1.5] * 3 x 100, Euler steps with no next
timestep after the last one (MONAI then steps by 1/n), post-processing aimed at the tumour whose slot is set.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fastmaisi.nets.derived import reuse_derived_weights
from fastmaisi.mask_conditions import CONDITION_DIM, TUMOUR_SLOTS, UNSET, V2_GUIDANCE_SCALE, V2_STEPS
from fastmaisi.pipelines.common import latent_noise
from fastmaisi.pipelines.models import Models
from fastmaisi.pipelines.sampling import GRAPH_MAX_VOXELS, guided

MASK_V2_SCHEDULER_DEF = dict(_target_="monai.networks.schedulers.rectified_flow.RFlowScheduler",
                             num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                             sample_method="uniform", scale=1.0)  # config `mask_generation_noise_scheduler`
MASK_V2_STEPS = V2_STEPS
MASK_V2_GUIDANCE = V2_GUIDANCE_SCALE
MASK_V2_SPACING_MM = (1.5, 1.5, 1.5)  # the spacing input of every mask step (the mask grid)


def v2_denoiser(net, cond: torch.Tensor, spacing: torch.Tensor, guidance_scale: float):
    """(x (1, 4, *S), t (1,)) -> velocity: one call on the batch [cond, uncond] and the guided mix (scale > 0), else
    one conditional call. cond: (1, 1, 19); spacing: (1, 3) mm x 100."""
    if guidance_scale <= 0:
        return lambda x, t: net(x=x, timesteps=t, context=cond, spacing_tensor=spacing)
    context = torch.cat([cond, torch.full_like(cond, UNSET)])
    spacing2 = torch.cat([spacing, spacing])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(x=torch.cat([x, x]), timesteps=torch.cat([t, t]), context=context, spacing_tensor=spacing2)
        return guided(out, guidance_scale)

    return denoise


@torch.no_grad()
def rflow_mask_loop(net, scheduler, x: torch.Tensor, cond: torch.Tensor, spacing: torch.Tensor, *, steps: int,
                    guidance_scale: float, progress: bool = True, cuda_graph: bool = False) -> torch.Tensor:
    """The v2 mask sampling loop from noise x (1, 4, *S); returns the clean latent (still scaled)."""
    denoise = v2_denoiser(net, cond, spacing, guidance_scale)
    if cuda_graph and x[0, 0].numel() <= GRAPH_MAX_VOXELS:
        from fastmaisi.nets.graphs import CudaGraphed

        denoise = CudaGraphed(denoise)
    scheduler.set_timesteps(steps, device="cpu", input_img_size_numel=int(torch.tensor(x.shape[2:]).prod()))
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="mask DM v2", disable=not progress, leave=False)):
        v = denoise(x, torch.full((x.shape[0],), float(t), device=x.device))
        next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None  # NVIDIA: None after the last step
        x = scheduler.step(v, t, x, next_timestep=next_t)[0]
    return x


@torch.no_grad()
def sample_mask_latent_v2(models: Models, condition: list[float], *, seed: int, latent_shape,
                          steps: int = MASK_V2_STEPS, guidance_scale: float = MASK_V2_GUIDANCE,
                          progress: bool = True) -> torch.Tensor:
    """Noise (1, *latent_shape) from `seed` -> the v2 mask latent, conditioned on the 19 numbers."""
    from fastmaisi.schedulers import build as build_scheduler

    if len(condition) != CONDITION_DIM:
        raise ValueError(f"the v2 condition has {CONDITION_DIM} numbers, got {len(condition)}")
    device, dtype = models.device, models.dtype
    cond = torch.tensor(condition, dtype=torch.float32).view(1, 1, -1).to(device=device, dtype=dtype)
    spacing = (torch.tensor(MASK_V2_SPACING_MM, dtype=torch.float32).view(1, 3) * 100).to(device=device, dtype=dtype)
    x = latent_noise(seed, (1, *latent_shape), device, dtype)
    with reuse_derived_weights(models.mask_diffusion):  # weight-derived tensors once, outside the CUDA graph
        return rflow_mask_loop(models.mask_diffusion, build_scheduler(MASK_V2_SCHEDULER_DEF), x, cond, spacing,
                               steps=steps, guidance_scale=guidance_scale, progress=progress,
                               cuda_graph=models.cuda_graphs)


def postprocess_v2(label, condition: list[float]):
    """Our mask clean-up aimed at the tumour whose v2 slot is set (the v1 vector's tumour slots are the same five
    tumours in the same order, so the v2 tumour slots are handed over in its places 5-9). A numpy map is cleaned on
    the host, a tensor on its device."""
    from fastmaisi.pipelines.mask_postprocess_torch import postprocess_any

    start = CONDITION_DIM - 5 - len(TUMOUR_SLOTS)
    return postprocess_any(label, [UNSET] * 5 + list(condition[start:start + len(TUMOUR_SLOTS)]))


__all__ = ["MASK_V2_SCHEDULER_DEF", "MASK_V2_STEPS", "MASK_V2_GUIDANCE", "rflow_mask_loop", "sample_mask_latent_v2",
           "postprocess_v2", "v2_denoiser"]
