"""Rectified flow (Liu et al. 2022, arXiv:2209.03003), MONAI 1.6.1's `RFlowScheduler` math, as MAISI uses it.

Time runs t ∈ [0, T] (T = num_train_timesteps = 1000), τ = t/T, τ = 1 is pure noise:
    x_τ = (1 - τ) x_0 + τ ε,    the model predicts the velocity v = x_0 - ε,    sampling integrates dx = -v dτ.
The resolution shift (Esser et al. 2024, SD3, eq. 23) τ' = r τ / (1 + (r - 1) τ), r = (numel / base)^(1/dim), moves
steps toward the noisy end for larger volumes. MONAI quirks reproduced on purpose:
  - `transform_scale` is stored but never reaches the transform (effective scale 1.0); `scale` is the logit-normal
    scale and does nothing with sample_method="uniform" (MAISI's config sets scale=1.4 to no effect).
  - inference timesteps are rounded to float16; `step` truncates `next_timestep` to an int.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import StepOutput, append_dims, check_num_inference_steps

SAMPLE_METHODS = ("uniform", "logit-normal")


def timestep_transform(t, input_img_size_numel, base_img_size_numel: int = 32 * 32 * 32, scale: float = 1.0,
                       num_train_timesteps: int = 1000, spatial_dim: int = 3):
    """Resolution shift of t ∈ [0, T]: τ' = r τ / (1 + (r - 1) τ), r = scale · (numel / base)^(1/spatial_dim).

    Works on floats or tensors with MONAI's exact operation order (a 0-d int tensor numel makes it fp32).
    """
    tau = t / num_train_timesteps
    ratio = (input_img_size_numel / base_img_size_numel) ** (1.0 / spatial_dim) * scale
    tau = ratio * tau / (1 + (ratio - 1) * tau)
    return tau * num_train_timesteps


class RFlowScheduler:
    """Rectified-flow scheduler with MONAI's constructor (same names, defaults and order); a plain object.

    Args:
        use_discrete_timesteps: round inference timesteps to ints (and truncate training ones).
        sample_method: training timestep density, "uniform" or "logit-normal" (σ(N(loc, scale²)), SD3 §3.1).
        use_timestep_transform: apply the resolution shift (MAISI: True, base 32³ latent voxels).
        transform_scale: stored for compatibility; MONAI never applies it (the effective scale is 1.0).
        steps_offset: added to the inference timesteps.
        base_img_size_numel, spatial_dim: the shift's reference size and dimensionality (inference; training uses
            the latent's own ndim - 2, as MONAI).
    """

    prediction_type = "v_prediction"

    def __init__(self, num_train_timesteps: int = 1000, use_discrete_timesteps: bool = True,
                 sample_method: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                 use_timestep_transform: bool = False, transform_scale: float = 1.0, steps_offset: int = 0,
                 base_img_size_numel: int = 32 * 32 * 32, spatial_dim: int = 3) -> None:
        if sample_method not in SAMPLE_METHODS:
            raise ValueError(f"sample_method must be one of {SAMPLE_METHODS}, got {sample_method!r}")
        self.num_train_timesteps = num_train_timesteps
        self.use_discrete_timesteps = use_discrete_timesteps
        self.sample_method = sample_method
        self.loc, self.scale = loc, scale
        self.use_timestep_transform = use_timestep_transform
        self.transform_scale = transform_scale
        self.steps_offset = steps_offset
        self.base_img_size_numel = base_img_size_numel
        self.spatial_dim = spatial_dim
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None

    def _transform(self, t, numel, spatial_dim: int):
        """The shift as MONAI calls it: with the default scale 1.0 (not transform_scale)."""
        return timestep_transform(t, numel, base_img_size_numel=self.base_img_size_numel,
                                  num_train_timesteps=self.num_train_timesteps, spatial_dim=spatial_dim)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_τ = (1 - τ) x_0 + τ ε with τ = t/T per sample (timesteps (B,)); fp32 τ, so the result is at least fp32."""
        one_minus_tau = 1 - timesteps.float().to(noise.device) / self.num_train_timesteps
        one_minus_tau = append_dims(one_minus_tau, noise.ndim)
        # τ written as 1 - (1 - τ): MONAI's rounding
        return one_minus_tau * original_samples + (1 - one_minus_tau) * noise

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      input_img_size_numel: int | torch.Tensor | None = None) -> None:
        """t_i = (1 - i/n)·T for i < n, shifted for `input_img_size_numel` latent voxels, rounded to float16.

        The numel is used as a 0-d int64 tensor, as MAISI's scripts pass it (`torch.prod(torch.tensor(shape))`), so
        the shift runs in fp32 exactly as in the reference pipeline even when a Python int is given. (MONAI given an
        int computes in fp64, which differs in the last fp16 bit for about 0.7% of grids.)
        """
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        if self.use_timestep_transform and input_img_size_numel is None:
            raise ValueError("input_img_size_numel (latent spatial numel) is required when use_timestep_transform")
        self.num_inference_steps = n = num_inference_steps
        timesteps = [(1.0 - i / n) * self.num_train_timesteps for i in range(n)]
        if self.use_discrete_timesteps:
            timesteps = [int(round(t)) for t in timesteps]
        if self.use_timestep_transform:
            numel = torch.as_tensor(input_img_size_numel).cpu()
            timesteps = [self._transform(t, numel, self.spatial_dim) for t in timesteps]
        timesteps_np = np.array(timesteps).astype(np.float16)  # numpy's direct (single) rounding to fp16
        if self.use_discrete_timesteps:
            timesteps_np = timesteps_np.astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps_np).to(device) + self.steps_offset

    def sample_timesteps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps for x (B, C, *spatial): T·u with u ~ U[0,1) or σ(N(loc, scale²)), then shifted by x's size.

        Same random stream as MONAI for the same seed. Logit-normal draws on the CPU (as MONAI), so `generator`
        must then be a CPU generator.
        """
        batch = x.shape[0]
        if self.sample_method == "uniform":
            t = torch.rand((batch,), device=x.device, generator=generator) * self.num_train_timesteps
        else:  # LogisticNormal with one component: clamp(sigmoid(z), tiny, 1 - eps), z ~ N(loc, scale²)
            z = torch.randn((batch, 1), generator=generator) * self.scale + self.loc
            finfo = torch.finfo(z.dtype)
            u = torch.sigmoid(z).clamp(min=finfo.tiny, max=1 - finfo.eps)[:, 0]
            t = u.to(x.device) * self.num_train_timesteps
        if self.use_discrete_timesteps:
            t = t.long()
        if self.use_timestep_transform:
            t = self._transform(t, torch.prod(torch.tensor(x.shape[2:])), spatial_dim=x.ndim - 2)
        return t

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             next_timestep: float | torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> StepOutput:
        """Euler step of dx = -v dτ: x_next = x + v·Δτ, Δτ = (t - int(next_t))/T (1/n without next_t).

        MAISI passes next_t = 0 after the last timestep (so the last step lands on t = 0); with next_t=None MONAI
        uses Δτ = 1/n instead, which is not the same. Also returns x̂_0 = x + v·t/T. `generator` is accepted for a
        uniform call and unused (the step is deterministic). Arithmetic in the latents' dtype (fp16 in MAISI).
        """
        if next_timestep is not None:
            dt = float(timestep - int(next_timestep)) / self.num_train_timesteps
        elif self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() before step() without next_timestep")
        else:
            dt = 1.0 / float(self.num_inference_steps)
        prev_sample = sample + model_output * dt
        pred_original_sample = sample + model_output * timestep / self.num_train_timesteps
        return StepOutput(prev_sample, pred_original_sample)
