"""The reverse-diffusion loop and the denoisers it calls (UNet [+ ControlNet] [+ classifier-free guidance]).

k-diffusion sized: state lives in locals, a `callback(dict)` hook, a progress bar with `disable=`.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

# Latents up to this many voxels replay their steps from a CUDA graph. Above it a step is GPU-bound and recording is
# pure cost: on an H200 the rflow-ct loop at 128^3 took 2.63 s eager vs 2.67-2.70 s with graphs (recording 60 ms);
# the mask DM at 64^3 steps in 8.9 ms from a graph vs 37 ms eager (bench/profile_image_stage.py, bench_nets.py).
GRAPH_MAX_VOXELS = 64**3 * 2  # (a 512x512x128 image; its step is ~1/4 of the 128^3 one, ~20 ms)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,C,*S), t (B,)) -> model output like x


@torch.no_grad()
def sample(denoise: Denoiser, scheduler, x: torch.Tensor, num_steps: int, generator: torch.Generator | None = None,
           callback: Callable[[dict], None] | None = None, disable: bool = False, desc: str = "sampling",
           method: str = "euler", cuda_graph: bool = False, eta: float = 0.0) -> torch.Tensor:
    """Run `scheduler` from noise `x` (B, C, *S) to a clean latent in `num_steps` steps.

    Timesteps follow the reference: RFlow gets the latent's spatial numel for its resolution shift and steps to the
    next timestep (0 after the last); DDPM/DDIM step on their own grid. The loop reads them from a host copy, so no
    step waits for the GPU. method="ab2": `sample_rflow_ab2` instead of Euler (rectified flow only).
    cuda_graph: on CUDA, replay the denoiser from a CUDA graph after its first call (`nets.graphs`; same kernels,
    same result, without the per-step launch cost) when the latent is small enough for launches to matter
    (GRAPH_MAX_VOXELS); larger latents run eagerly, since recording costs more than it saves.
    eta: DDIM's η (0: deterministic; 1: ancestral sampling on the respaced grid); other schedulers take none.
    """
    step_kw = {"eta": eta} if eta else {}
    scheduler.set_timesteps(num_steps, device="cpu", input_img_size_numel=int(torch.tensor(x.shape[2:]).prod()))
    timesteps = scheduler.timesteps
    if cuda_graph and x[0, 0].numel() <= GRAPH_MAX_VOXELS:  # (CudaGraphed runs CPU calls eagerly)
        from fastmaisi.nets.graphs import CudaGraphed

        denoise = CudaGraphed(denoise)
    if method == "ab2":  # optional 2nd-order rectified-flow sampler over the same grid (not the reference's)
        from fastmaisi.schedulers.samplers import sample_rflow_ab2

        return sample_rflow_ab2(denoise, x, timesteps, scheduler.num_train_timesteps, callback, disable)
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=disable, leave=False)):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        out = denoise(x, t_batch)
        next_t = timesteps[i + 1] if i + 1 < len(timesteps) else 0  # MAISI: next_t = 0 after the last step
        x = scheduler.step(out, t, x, next_timestep=next_t, generator=generator, **step_kw)[0]
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return x


def guided(outputs: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch [cond, uncond]: uncond + s * (cond - uncond)."""
    cond, uncond = outputs.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def image_denoiser(unet, controlnet=None, *, spacing: torch.Tensor, class_labels: torch.Tensor | None = None,
                   top_region: torch.Tensor | None = None, bottom_region: torch.Tensor | None = None,
                   condition: torch.Tensor | None = None, uncond_condition: torch.Tensor | None = None,
                   guidance_scale: float = 0.0) -> Denoiser:
    """Denoiser for the image DM as the reference calls it: ControlNet(x, t, cond, class) then UNet(x, t, spacing, ...).

    With guidance_scale > 0 the batch is doubled: the second half gets class label 0 (the null modality) and, for the
    ControlNet, `uncond_condition` (the tumour-free mask) — the reference's modality / tumour CFG.
    spacing: (B, 3) mm x 100; regions: (B, 4) one-hot x 100; condition: (B, 8, *image_size) bit channels, or the
    integer label map (B, 1, *image_size) they encode (the ControlNet embeds it directly: `embed_labels`).
    """
    cfg = guidance_scale > 0
    if cfg:
        null = torch.zeros_like(class_labels) if class_labels is not None else None
        class_labels = torch.cat([class_labels, null]) if class_labels is not None else None
        spacing = torch.cat([spacing, spacing])
        top_region = torch.cat([top_region, top_region]) if top_region is not None else None
        bottom_region = torch.cat([bottom_region, bottom_region]) if bottom_region is not None else None
        if condition is not None:
            condition = torch.cat([condition, condition if uncond_condition is None else uncond_condition])
    cond_embedding = None
    if controlnet is not None and condition is not None:
        # the ControlNet's conditioning embedding, once: the loop then holds (B, 64, *latent) instead of the
        # 8-channel full-resolution condition (2 GiB at 512^3 in fp16)
        labels = not condition.is_floating_point() and condition.shape[1] == 1
        embed = controlnet.embed_labels if labels else controlnet.embed_condition
        cond_embedding, condition = embed(condition), None
    unet_kwargs = dict(spacing_tensor=spacing, class_labels=class_labels)
    if top_region is not None:
        unet_kwargs.update(top_region_index_tensor=top_region, bottom_region_index_tensor=bottom_region)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        residuals = {}
        if controlnet is not None:
            down, mid = controlnet(x=x, timesteps=t, controlnet_cond=condition, class_labels=class_labels,
                                   controlnet_cond_embedding=cond_embedding)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        out = unet(x=x, timesteps=t, **unet_kwargs, **residuals)
        return guided(out, guidance_scale) if cfg else out

    return denoise


def mask_denoiser(mask_unet, context: torch.Tensor) -> Denoiser:
    """Denoiser for the mask DM: cross-attention to the organ-size vector, context (B, 1, 10)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return mask_unet(x=x, timesteps=t, context=context)

    return denoise
