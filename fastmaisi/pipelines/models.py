"""Load a variant's networks from a weights folder (official .pt files or converted .safetensors) onto a device."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastmaisi.variants import MASK_LATENT_SHAPE, ROLE_CONFIG_KEYS, Variant


@dataclass
class Models:
    """The networks of one variant, in eval mode on one device, and the latent scale factors."""

    variant: Variant
    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    scheduler_def: dict
    controlnet: torch.nn.Module | None = None
    mask_autoencoder: torch.nn.Module | None = None
    mask_diffusion: torch.nn.Module | None = None
    scale_factor: float = 1.0
    mask_scale_factor: float = 1.0
    dtype: torch.dtype = torch.float32
    mask_latent_shape: tuple = MASK_LATENT_SHAPE
    mask_spacing: tuple = (1.5, 1.5, 1.5)  # mm per voxel of the decoded mask (reference: 256^3 at 1.5 mm)
    files: dict = field(default_factory=dict)  # role -> {"path", "sha256"} for the record
    cuda_graphs: bool = True  # on CUDA, sampling loops replay denoiser calls from a CUDA graph (small latents)
    decode_devices: list | None = None  # the decode split along D over these devices (`decode_latent(devices=)`)

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_unet.parameters()).device


# On CUDA the diffusion networks run channels-last: cuDNN's 3-D convs take NDHWC natively, so the NCDHW in/out
# transposes around every conv disappear. H200, CUDA graphs: rflow-ct 512^3 ControlNet + UNet step 0.103 s NCDHW,
# 0.093 s channels-last (bench/bench_nets.py); mask DM step at 64^3 8.45 ms NCDHW, 7.23 ms channels-last, so the
# 1000-step mask stage 8.4 -> 7.2 s (docs/performance.md). The VAEs go through `decode`, which picks its own.
CHANNELS_LAST_ROLES = ("diffusion_unet", "controlnet", "mask_diffusion")

# A long-lived process (`fastmaisi app`) keeps networks loaded between runs: (role, file, definition, device, dtype)
# -> (network, file record, scale factor). None (the default): every `load_models` call reads its files.
_LOADED: dict | None = None


def keep_networks_loaded(keep: bool = True) -> None:
    """From now on, `load_models` returns the networks it loaded before for the same file, definition and device
    (`keep=False`: forget them and load from the files again)."""
    global _LOADED
    _LOADED = ({} if _LOADED is None else _LOADED) if keep else None


def weight_file(weights_dir: Path, stem: str) -> Path:
    """The file for a role: `<stem>.safetensors` (converted) or `<stem>.pt` (official)."""
    for ext in (".safetensors", ".pt", ".pth"):
        if (weights_dir / f"{stem}{ext}").is_file():
            return weights_dir / f"{stem}{ext}"
    raise ValueError(f"missing weight file {stem}.pt (or {stem}.safetensors) in {weights_dir}")


def missing_weight_files(variant: Variant, weights_dir: Path, roles) -> list[str]:
    """Names of the files a run needs that are not in `weights_dir` (checked before any compute)."""
    missing = []
    for role in roles:
        try:
            weight_file(weights_dir, variant.files[role])
        except ValueError:
            missing.append(f"{variant.files[role]}.pt")
    return missing


def network_definitions(variant: Variant, network_config: Path | None) -> dict:
    """Our built-in definitions, or those of a user's official `config_network_*.json` when given."""
    defs = variant.definitions()
    if network_config is None:
        return defs
    from fastmaisi.config import resolve_network_definition

    config = json.loads(Path(network_config).read_text())
    out = {role: resolve_network_definition(config, ROLE_CONFIG_KEYS[role]) for role in defs}
    if variant.mask_generator == "v2" and not out["mask_diffusion"]["_target_"].endswith("AdaGN"):
        out["mask_diffusion"] = defs["mask_diffusion"]  # a config from before 2026-10: its mask DM is v1's
    return out


def load_models(variant: Variant, weights_dir: str | Path, roles, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, network_config: str | Path | None = None) -> Models:
    """Build the networks for `roles`, load their weights strictly, move them to `device` in `dtype`."""
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into, sha256_file

    weights_dir = Path(weights_dir)
    defs = network_definitions(variant, network_config)
    nets, files, scales = {}, {}, {}
    for role in roles:
        path = weight_file(weights_dir, variant.files[role])
        key = (role, str(path.resolve()), json.dumps(defs[role], sort_keys=True), str(device), dtype)
        if _LOADED is not None and key in _LOADED:
            nets[role], files[role], scale = _LOADED[key]
        else:
            net = build(defs[role])
            scale = load_into(net, path, name=role).get("scale_factor")
            net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
            if role in CHANNELS_LAST_ROLES and torch.device(device).type == "cuda":
                net = net.to(memory_format=torch.channels_last_3d)  # its convs then run in cuDNN's native layout
            nets[role], files[role] = net, {"path": str(path), "sha256": sha256_file(path)}
            if _LOADED is not None:
                _LOADED[key] = (net, files[role], scale)
        if scale is not None:
            scales[role] = float(scale)
    scheduler_def = variant.scheduler
    extra = {"mask_latent_shape": variant.mask_latent_shape, "mask_spacing": variant.mask_spacing}
    if network_config is not None:
        config = json.loads(Path(network_config).read_text())
        scheduler_def = config.get("noise_scheduler", scheduler_def)
        if "mask_generation_latent_shape" in config:
            extra["mask_latent_shape"] = tuple(config["mask_generation_latent_shape"])
        if "mask_diffusion" in nets and "mask_diffusion" not in scales and "mask_generation_scale_factor" in config:
            scales["mask_diffusion"] = float(config["mask_generation_scale_factor"])  # checkpoint without one
    return Models(variant=variant, scheduler_def=scheduler_def, dtype=dtype, files=files, **extra,
                  scale_factor=scales.get("diffusion_unet", 1.0), mask_scale_factor=scales.get("mask_diffusion", 1.0),
                  **nets)
