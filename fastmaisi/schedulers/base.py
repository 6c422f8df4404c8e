"""What DDPM and DDIM share: beta schedules, q(x_t | x_0), the x_0 / epsilon predictions, the step result.

Arithmetic follows MONAI 1.6.1 operation for operation (fp32 0-d schedule scalars times latents of any dtype), so
results agree bit for bit; comments cite Ho et al. 2020 (DDPM, arXiv:2006.11239) and Song et al. 2021 (DDIM,
arXiv:2010.02502).
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class StepOutput(NamedTuple):
    """`step()` result; a tuple like MONAI's `(prev_sample, pred_original_sample)`, so it unpacks the same way."""

    prev_sample: torch.Tensor  # x_{t-1} (DDPM/DDIM) or x at the next timestep (RFlow)
    pred_original_sample: torch.Tensor  # x̂_0


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample (B,) tensor broadcasts against (B, C, *spatial)."""
    return x[(...,) + (None,) * (ndim - x.ndim)]


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
                         f"got {num_inference_steps}")


# Beta schedules, as MONAI's NoiseSchedules: each returns betas (T,) or the triple (betas, alphas, alphas_cumprod).
def linear_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """β_t linear in t (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """√β_t linear in t (latent diffusion; MAISI's mask and ddpm-ct models)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def sigmoid_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 sig_range: float = 6.0) -> torch.Tensor:
    """β_t = β_start + (β_end - β_start)·sigmoid(s), s linear in [-sig_range, sig_range]."""
    s = torch.linspace(-sig_range, sig_range, num_train_timesteps, dtype=torch.float32)
    return torch.sigmoid(s) * (beta_end - beta_start) + beta_start


def cosine(num_train_timesteps: int, s: float = 8e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ᾱ_t = cos²((t/T + s)/(1 + s)·π/2) / ᾱ_0, β_t clipped to 0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=torch.float32)
    alphas_cumprod = torch.cos(((t / num_train_timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod /= alphas_cumprod[0].item()
    betas = torch.clip(1.0 - (alphas_cumprod[1:] / alphas_cumprod[:-1]), 0.0, 0.999)
    alphas = 1.0 - betas
    return betas, alphas, torch.cumprod(alphas, dim=0)


NOISE_SCHEDULES = {f.__name__: f for f in (linear_beta, scaled_linear_beta, sigmoid_beta, cosine)}


class DiscreteScheduler:
    """Base of DDPM and DDIM: the schedule tables β_t, α_t = 1 - β_t, ᾱ_t = Π α_s (fp32, CPU) and training helpers.

    `schedule_args` go to the schedule function (beta_start, beta_end; sig_range; s); others are a ValueError.
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear_beta", clip_sample: bool = True,
                 prediction_type: str = "epsilon", clip_sample_min: float = -1.0, clip_sample_max: float = 1.0,
                 **schedule_args) -> None:
        if schedule not in NOISE_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; supported: {sorted(NOISE_SCHEDULES)}")
        schedule_fn = NOISE_SCHEDULES[schedule]
        allowed = [p for p in inspect.signature(schedule_fn).parameters if p != "num_train_timesteps"]
        unknown = sorted(set(schedule_args) - set(allowed))
        if unknown:
            own = [p for p in inspect.signature(type(self)).parameters if p != "schedule_args"]
            raise ValueError(f"unsupported argument(s) {unknown} for {type(self).__name__}(schedule={schedule!r}); "
                             f"supported: {own} and the schedule's {allowed}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        tables = schedule_fn(num_train_timesteps, **schedule_args)
        if isinstance(tables, tuple):
            self.betas, self.alphas, self.alphas_cumprod = tables
        else:
            self.betas = tables
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_values = [clip_sample_min, clip_sample_max]
        self.one = torch.tensor(1.0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def _set_timesteps(self, num_inference_steps: int, device, steps_offset: int = 0) -> None:
        """round(linspace(T - 1 - offset, 0, n)) + offset, descending int64 (MONAI 1.6.1)."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        last = self.num_train_timesteps - 1 - steps_offset
        self.timesteps = torch.linspace(last, 0, num_inference_steps, device=device).round().long() + steps_offset

    def _sqrt_alphas_cumprod(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1 - ᾱ_t)) in `like`'s dtype and device, shaped to broadcast against it."""
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
        return append_dims(alphas_cumprod**0.5, like.ndim), append_dims((1 - alphas_cumprod) ** 0.5, like.ndim)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4); timesteps (B,) int."""
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_alphas_cumprod(timesteps, original_samples)
        return sqrt_ab * original_samples + sqrt_one_minus_ab * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0, the v-prediction target (Salimans & Ho 2022, §4); `sample` is x_0."""
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_alphas_cumprod(timesteps, sample)
        return sqrt_ab * noise - sqrt_one_minus_ab * sample

    def sample_timesteps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps t ~ U{0, ..., T-1}, one per sample of x (B, ...), int64 on x's device (MAISI's randint)."""
        return torch.randint(0, self.num_train_timesteps, (x.shape[0],), device=x.device, generator=generator)

    def _pred_original_sample(self, model_output: torch.Tensor, sample: torch.Tensor,
                              alpha_prod_t: torch.Tensor) -> torch.Tensor:
        """x̂_0 from the model output (DDPM eq. 15, DDIM eq. 12), clipped if clip_sample."""
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction: x_0 = √ᾱ x_t - √(1-ᾱ) v
            x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        if self.clip_sample:
            x0 = torch.clamp(x0, self.clip_sample_values[0], self.clip_sample_values[1])
        return x0

    def _pred_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor,
                      alpha_prod_t: torch.Tensor) -> torch.Tensor:
        """ε̂ from the model output (before any clipping of x̂_0, as MONAI)."""
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "sample":
            return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample  # v_prediction
