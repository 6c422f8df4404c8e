"""DDIM sampling (Song et al. 2021, arXiv:2010.02502), MONAI 1.6.1's `DDIMScheduler` math.

Not used by the MAISI releases; available for ε-models (e.g. the mask DM) as a deterministic few-step sampler.
"""

from __future__ import annotations

import torch

from .base import DiscreteScheduler, StepOutput


class DDIMScheduler(DiscreteScheduler):
    """DDIM with MONAI's constructor (same names, defaults and positional order).

    Args:
        set_alpha_to_one: the last step's ᾱ_prev is 1 (True) or ᾱ_0 (False).
        steps_offset: added to the inference timesteps; in [0, num_train_timesteps).
        Others as `DDPMScheduler`.
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear_beta", clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 clip_sample_min: float = -1.0, clip_sample_max: float = 1.0, **schedule_args) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=clip_sample,
                         prediction_type=prediction_type, clip_sample_min=clip_sample_min,
                         clip_sample_max=clip_sample_max, **schedule_args)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.steps_offset = steps_offset
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      input_img_size_numel: int | None = None) -> None:
        """timesteps = round(linspace(T-1-offset, 0, n)) + offset, int64 descending; `input_img_size_numel` ignored."""
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset must be in [0, {self.num_train_timesteps}), got {self.steps_offset}")
        self._set_timesteps(num_inference_steps, device, self.steps_offset)

    def _alpha_prods(self, t: int, prev_t: int) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        return self.alphas_cumprod[t], prev

    def _variance(self, t: int, prev_t: int) -> torch.Tensor:
        """σ_t(1)² = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_{t-1}) (eq. 16 with η = 1)."""
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, prev_t)
        return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, next_timestep=None) -> StepOutput:
        """x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z (eq. 12), σ_t = η σ_t(1) (eq. 16).

        The previous timestep is t - T // n as in MONAI (not the next entry of `timesteps` when n does not divide T);
        `next_timestep` is accepted for a uniform call and ignored. eta = 0 is deterministic. Returns (x_{t-1}, x̂_0).
        """
        t = int(timestep)
        # 1. previous timestep and ᾱ_t, ᾱ_{t-1}
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, prev_t)

        # 2. predicted x_0 and ε (eq. 12, "predicted x_0"; ε̂ from the unclipped prediction)
        pred_original_sample = self._pred_original_sample(model_output, sample, alpha_prod_t)
        pred_epsilon = self._pred_epsilon(model_output, sample, alpha_prod_t)

        # 3. σ_t (eq. 16)
        std_dev_t = eta * self._variance(t, prev_t) ** 0.5

        # 4. "direction pointing to x_t" and x_{t-1} without noise (eq. 12)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        # 5. + σ_t z
        if eta > 0:
            z = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                            device=model_output.device)
            prev_sample = prev_sample + std_dev_t * z
        return StepOutput(prev_sample, pred_original_sample)
