"""DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239), MONAI 1.6.1's `DDPMScheduler` math.

MAISI uses it for the mask-generation model and ddpm-ct: scaled_linear_beta 0.0015..0.0195, ε-prediction,
fixed_small variance, no clipping, 1000 steps.
"""

from __future__ import annotations

import torch

from .base import DiscreteScheduler, StepOutput

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


class DDPMScheduler(DiscreteScheduler):
    """DDPM with MONAI's constructor (same names, defaults and positional order).

    Args:
        schedule: "linear_beta", "scaled_linear_beta", "sigmoid_beta" or "cosine"; `schedule_args` (beta_start,
            beta_end, sig_range, s) go to it.
        variance_type: "fixed_small" (β̃_t, clamped at 1e-20), "fixed_large" (β_t), "learned", "learned_range"
            (the model outputs 2C channels; the second half is the variance or its interpolation weight).
        clip_sample: clamp x̂_0 to [clip_sample_min, clip_sample_max].
        prediction_type: "epsilon", "sample" or "v_prediction".
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear_beta",
                 variance_type: str = "fixed_small", clip_sample: bool = True, prediction_type: str = "epsilon",
                 clip_sample_min: float = -1.0, clip_sample_max: float = 1.0, **schedule_args) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=clip_sample,
                         prediction_type=prediction_type, clip_sample_min=clip_sample_min,
                         clip_sample_max=clip_sample_max, **schedule_args)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      input_img_size_numel: int | None = None) -> None:
        """timesteps = round(linspace(T-1, 0, n)), int64 descending. `input_img_size_numel` is ignored (RFlow only).

        `step` always goes from t to t-1, so fewer than T steps is only an approximation (as in MONAI/MAISI).
        """
        self._set_timesteps(num_inference_steps, device)

    def _variance(self, t: int, predicted_variance: torch.Tensor | None) -> torch.Tensor:
        """Posterior variance β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t (eq. 7), or a variant per variance_type."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[t - 1] if t > 0 else self.one
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * self.betas[t]
        if self.variance_type == "fixed_small":
            variance = torch.clamp(variance, min=1e-20)
        elif self.variance_type == "fixed_large":  # σ_t² = β_t (§3.2)
            variance = self.betas[t]
        elif self.variance_type == "learned" and predicted_variance is not None:
            return predicted_variance
        elif self.variance_type == "learned_range" and predicted_variance is not None:
            # MONAI interpolates the variances themselves, not their logs as Nichol & Dhariwal 2021 eq. 15 does.
            frac = (predicted_variance + 1) / 2
            variance = frac * self.betas[t] + (1 - frac) * variance
        return variance

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, next_timestep=None) -> StepOutput:
        """One ancestral step x_t -> x_{t-1} (Algorithm 2): x_{t-1} = μ̃_t(x_t, x̂_0) + σ_t z, z ~ N(0, I) if t > 0.

        The noise z is drawn like MONAI: `torch.randn(shape, dtype=model_output.dtype, generator=generator, ...)`.
        `next_timestep` is accepted so every scheduler takes the same call, and ignored: DDPM always steps to t-1.
        Returns (x_{t-1}, x̂_0).
        """
        t = int(timestep)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        # 1. ᾱ_t, ᾱ_{t-1} (ᾱ_{-1} = 1), as fp32 0-d tensors: the arithmetic runs in the latents' dtype
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[t - 1] if t > 0 else self.one

        # 2. predicted x_0 (eq. 15)
        pred_original_sample = self._pred_original_sample(model_output, sample, alpha_prod_t)

        # 3. posterior mean μ̃_t = √ᾱ_{t-1} β_t / (1 - ᾱ_t) · x̂_0 + √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t (eq. 7)
        x0_coeff = alpha_prod_t_prev**0.5 * self.betas[t] / (1 - alpha_prod_t)
        xt_coeff = self.alphas[t] ** 0.5 * (1 - alpha_prod_t_prev) / (1 - alpha_prod_t)
        prev_sample = x0_coeff * pred_original_sample + xt_coeff * sample

        # 4. + σ_t z
        if t > 0:
            z = torch.randn(model_output.size(), dtype=model_output.dtype, layout=model_output.layout,
                            generator=generator, device=model_output.device)
            prev_sample = prev_sample + self._variance(t, predicted_variance) ** 0.5 * z
        return StepOutput(prev_sample, pred_original_sample)
