"""`decode_latent` / `encode_image`: exact `vae.decode` / `vae.encode` within a device-memory budget (plan, then
execute; one retry at half the budget on out-of-memory)."""

from __future__ import annotations

import torch

from fastmaisi.decode.execute import _execute
from fastmaisi.decode.host_memory import free_host_memory
from fastmaisi.decode.plan import _default_budget, plan_decode, plan_encode
from fastmaisi.decode.program import _compile, _shapes
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
from fastmaisi.decode.split import decode_latent_split


def _check(vae: AutoencoderKlMaisi, t: torch.Tensor, channels: int, what: str, budget) -> None:
    if not isinstance(vae, AutoencoderKlMaisi):
        raise TypeError(f"vae must be a fastmaisi AutoencoderKlMaisi, got {type(vae).__name__}")
    if t.ndim != 5:
        raise ValueError(f"{what} must be 5-D (B, C, D, H, W), got shape {tuple(t.shape)}")
    if t.shape[1] != channels:
        raise ValueError(f"{what} has {t.shape[1]} channels, expected {channels} (shape {tuple(t.shape)})")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf values")
    if budget is not None and budget <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {budget}")


def _compute(vae, x, budget, plan_fn, whole_fn, program_fn, out_device, progress=False):
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    for attempt in range(2):
        plan = plan_fn(budget)
        try:
            with torch.no_grad():
                if not plan.tiled and device.type != "cuda":  # CPU, no budget: the network's own forward
                    y = whole_fn(x.to(device=device, dtype=dtype))
                else:
                    ops, slots = program_fn()
                    _shapes(ops, slots, x.shape[2:])
                    y = _execute(ops, slots, plan, x, device, dtype, progress)
            if out_device is not None:
                y = y.to(out_device)
            return y, plan
        except RuntimeError as e:  # torch.OutOfMemoryError, or a failed page-locked host allocation
            if "out of memory" not in str(e).lower():
                raise
            torch.cuda.empty_cache()
            free_host_memory()
            if attempt == 1:
                raise RuntimeError(
                    f"CUDA ran out of memory during the {plan.task} even with half the budget "
                    f"({plan.memory_budget_bytes} bytes); pass a smaller memory_budget_bytes or free device memory. "
                    f"Plan: {plan.describe()}"
                ) from e
            budget = (plan.memory_budget_bytes or _default_budget(device) or 0) // 2


def decode_latent(
    vae: AutoencoderKlMaisi,
    z: torch.Tensor,
    memory_budget_bytes: int | None = None,
    out_device: str | torch.device | None = None,
    return_plan: bool = False,
    progress: bool = False,
    devices=None,
    group=None,
):
    """Exact `vae.decode(z)` for any (B, latent, d, h, w) latent within a device-memory budget.

    Runs on the VAE's device in its parameter dtype. The result lives on the compute device when it fits, otherwise
    in host memory (channels_last_3d strides; `plan.output_device` says which), unless `out_device` is given.
    On CUDA out-of-memory it retries once with half the budget, then raises RuntimeError.
    Returns the image, or (image, plan) with `return_plan=True`. `progress`: a bar over the slabs (tiled runs).
    `devices=[...]` (several devices of this process) or `group=` (a torch.distributed process group): the same
    decode split along D, the budget per device (`decode_latent_split`, `SplitPlan`).
    """
    _check(vae, z, vae.latent_channels, "latent z", memory_budget_bytes)
    if devices is not None or group is not None:
        return decode_latent_split(vae, z, devices, group, memory_budget_bytes, out_device, return_plan, progress)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    program = lambda: _compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)  # noqa: E731
    y, plan = _compute(
        vae, z, memory_budget_bytes,
        lambda budget: plan_decode(z.shape, device, budget, dtype, vae, out_device),
        vae.decode, program, out_device, progress,
    )
    return (y, plan) if return_plan else y


def encode_image(
    vae: AutoencoderKlMaisi,
    x: torch.Tensor,
    memory_budget_bytes: int | None = None,
    return_plan: bool = False,
    progress: bool = False,
):
    """Exact `vae.encode(x)` -> (z_mu, z_sigma) for a (B, C_in, D, H, W) image within a device-memory budget.

    Deterministic (returns the mean and sigma, like `encode`; sample with `vae.sampling(z_mu, z_sigma)`). The latents
    are returned on the VAE's device. Returns (z_mu, z_sigma), or ((z_mu, z_sigma), plan) with `return_plan=True`.
    `progress`: a bar over the slabs (tiled runs).
    """
    _check(vae, x, vae.in_channels, "image x", memory_budget_bytes)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    program = lambda: _compile(vae.encoder.blocks, vae.in_channels, None)  # noqa: E731
    h, plan = _compute(
        vae, x, memory_budget_bytes,
        lambda budget: plan_encode(x.shape, device, budget, dtype, vae),
        vae.encoder, program, None, progress,
    )
    with torch.no_grad():
        z = vae.latent_from_features(h.to(device))
    return (z, plan) if return_plan else z
