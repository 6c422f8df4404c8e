"""MAISI-compatible networks (same state_dict keys as MONAI's classes) and `build` from the official config dicts."""

from __future__ import annotations

import importlib
import inspect

import torch

# MONAI class name -> (our module, our class). The official configs name MONAI classes in `_target_`.
_REGISTRY = {
    "AutoencoderKlMaisi": ("fastmaisi.nets.autoencoder", "AutoencoderKlMaisi"),
    "DiffusionModelUNetMaisi": ("fastmaisi.nets.unet", "DiffusionModelUNetMaisi"),
    "DiffusionModelUNet": ("fastmaisi.nets.unet", "DiffusionModelUNet"),
    "ControlNetMaisi": ("fastmaisi.nets.controlnet", "ControlNetMaisi"),
    # NVIDIA's v2 mask generator (`scripts.adagn_unet`, config_network_rflow.json since 2026-10)
    "DiffusionModelUNetMaisiAdaGN": ("fastmaisi.nets.adagn_unet", "DiffusionModelUNetMaisiAdaGN"),
}


def network_class(target: str) -> type:
    """Our class for a `_target_` such as 'monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi'."""
    name = target.rsplit(".", 1)[-1]
    if name not in _REGISTRY:
        raise ValueError(f"unknown network _target_ {target!r}; supported: {', '.join(sorted(_REGISTRY))}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def build(definition: dict) -> torch.nn.Module:
    """Build our network from an official `*_def` entry (`_target_` + constructor kwargs, `@`-refs resolved)."""
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise ValueError("a network definition must be a dict with a '_target_' key (an official config '*_def' entry)")
    kwargs = {k: v for k, v in definition.items() if not k.startswith("_")}
    unresolved = {k: v for k, v in kwargs.items() if isinstance(v, str) and v[:1] in "@$%"}
    if unresolved:
        raise ValueError(f"unresolved config references in {definition['_target_']} definition: {unresolved}")
    cls = network_class(definition["_target_"])
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unsupported argument(s) {unknown} for {cls.__name__}; supported: {sorted(allowed)}")
    return cls(**kwargs)


__all__ = ["build", "network_class"]
