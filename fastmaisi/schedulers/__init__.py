"""Noise schedulers with MONAI 1.6.1's math (DDPM, DDIM, rectified flow), an optional faster RFlow sampler, and
`build` from an official config entry (`noise_scheduler`, `mask_generation_noise_scheduler`).

All three take the same calls: `set_timesteps(n, device=None, input_img_size_numel=None)`,
`step(model_output, t, x, next_timestep=..., generator=...)` -> (prev_sample, pred_original_sample),
`add_noise(x0, noise, t)` and `sample_timesteps(x)` for training.
"""

from __future__ import annotations

import inspect

from .base import NOISE_SCHEDULES, StepOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .rflow import RFlowScheduler, timestep_transform
from .samplers import sample_rflow_ab2

# MONAI class name -> (our class, MONAI's module under monai.networks.schedulers)
_CLASSES = {
    "DDPMScheduler": (DDPMScheduler, "ddpm"),
    "DDIMScheduler": (DDIMScheduler, "ddim"),
    "RFlowScheduler": (RFlowScheduler, "rectified_flow"),
}


def scheduler_class(target: str) -> type:
    """Our class for a `_target_`: 'DDPMScheduler', 'monai.networks.schedulers.DDPMScheduler',
    'monai.networks.schedulers.ddpm.DDPMScheduler' (likewise DDIM, RFlow with module rectified_flow) or ours."""
    prefix, _, name = str(target).rpartition(".")
    if name in _CLASSES:
        cls, module = _CLASSES[name]
        ours = cls.__module__.rsplit(".", 1)[-1]
        if prefix in ("", "monai.networks.schedulers", f"monai.networks.schedulers.{module}",
                      "fastmaisi.schedulers", f"fastmaisi.schedulers.{ours}"):
            return cls
    allowed = ", ".join(f"monai.networks.schedulers[.{m}].{n}" for n, (_, m) in _CLASSES.items())
    raise ValueError(f"unknown scheduler _target_ {target!r}; supported: {allowed} (or the bare class name)")


def build(definition: dict):
    """Build our scheduler from an official config entry: `_target_` naming MONAI's class + its keyword arguments.

    Keys starting with '_' other than `_target_` are ignored; an unknown target or keyword is a ValueError that
    names it and the allowed ones.
    """
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise ValueError("a scheduler definition must be a dict with a '_target_' key (e.g. the official "
                         "config's 'noise_scheduler' entry)")
    cls = scheduler_class(definition["_target_"])
    kwargs = {k: v for k, v in definition.items() if not k.startswith("_")}
    unresolved = {k: v for k, v in kwargs.items() if isinstance(v, str) and v[:1] in "@$%"}
    if unresolved:
        raise ValueError(f"unresolved config references in {cls.__name__} definition: {unresolved}")
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # DDPM/DDIM check their **schedule_args
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"unsupported argument(s) {unknown} for {cls.__name__}; supported: {list(params)}")
    return cls(**kwargs)


__all__ = ["DDIMScheduler", "DDPMScheduler", "NOISE_SCHEDULES", "RFlowScheduler", "StepOutput", "build",
           "sample_rflow_ab2", "scheduler_class", "timestep_transform"]
