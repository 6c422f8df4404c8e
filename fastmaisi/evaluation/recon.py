"""VAE reconstruction quality: PSNR, 3D SSIM and MAE of encode -> decode over a folder of CT volumes.

Intensities: each CT volume is read in RAS, clipped to [-1000, 1000] HU and mapped to [0, 1] (the VAE's training
normalisation, pipeline.md §5.1); the reconstruction is clipped to [0, 1] as the generator does. PSNR and SSIM are
computed on these [0, 1] intensities with data_range 1. PSNR is then the same number as on clipped HU with
data_range 2000; SSIM is not (its luminance term depends on the -1000 offset), so compare SSIMs only with others
computed on [0, 1]. MAE is reported in HU (2000 x the [0, 1] MAE). SSIM is Wang et al. (2004) in 3D with
MONAI's SSIMMetric conventions: gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, biased local statistics, only
positions where the window fits (no padding), averaged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fastmaisi.evaluation.volumes import check_hu, read_ras

HU_RANGE = (-1000.0, 1000.0)
METRICS = ("psnr", "ssim", "mae_hu")


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    b = b.to(a.device)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def psnr(a, b, data_range: float) -> float:
    """10 log10(data_range^2 / MSE) in dB; inf for identical inputs."""
    a, b = _pair(a, b)
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def mae(a, b) -> float:
    """Mean absolute difference (in the inputs' units)."""
    a, b = _pair(a, b)
    return float(torch.mean(torch.abs(a.double() - b.double())))


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1D gaussian of `size` taps centred on the middle one (MONAI's `_gaussian_kernel`)."""
    x = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0, dtype=torch.float64)
    g = torch.exp(-((x / sigma) ** 2) / 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim3d(a, b, data_range: float, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
           slab: int = 64) -> float:
    """Mean 3D SSIM (Wang et al. 2004, eq. 13) of two (X, Y, Z) volumes, separable gaussian window, valid positions.

    Computed `slab` output planes along X at a time (each with its win_size - 1 halo), so memory stays at a few
    copies of a slab rather than of the volume.
    """
    a, b = _pair(a, b)
    if a.ndim != 3:
        raise ValueError(f"ssim3d expects (X, Y, Z) volumes, got shape {tuple(a.shape)}")
    if min(a.shape) < win_size:
        raise ValueError(f"every side must be >= win_size {win_size}, got shape {tuple(a.shape)}")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    g = gaussian_window(win_size, sigma, a.dtype, a.device)
    kernels = [g.view(1, 1, -1, 1, 1), g.view(1, 1, 1, -1, 1), g.view(1, 1, 1, 1, -1)]
    total, count, n_out = 0.0, 0, a.shape[0] - win_size + 1
    for start in range(0, n_out, slab):
        stop = min(start + slab, n_out)
        x, y = a[start:stop + win_size - 1], b[start:stop + win_size - 1]
        stats = torch.stack([x, y, x * x, y * y, x * y])[:, None]  # (5, 1, X, Y, Z): filter each as a batch item
        for k in kernels:
            stats = F.conv3d(stats, k)
        mu_x, mu_y, xx, yy, xy = stats[:, 0]
        sigma_x, sigma_y, sigma_xy = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
            (mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x + sigma_y + c2))
        total += float(ssim_map.double().sum())
        count += ssim_map.numel()
    return total / count


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """HU -> [0, 1]: clip to [-1000, 1000], then linear."""
    lo, hi = HU_RANGE
    return (hu.clamp(lo, hi) - lo) / (hi - lo)


def volume_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """Metrics of two [0, 1] volumes (X, Y, Z): PSNR (dB), SSIM, MAE in HU."""
    return {"psnr": psnr(original, reconstruction, 1.0), "ssim": ssim3d(original, reconstruction, 1.0),
            "mae_hu": mae(original, reconstruction) * (HU_RANGE[1] - HU_RANGE[0])}


def evaluate_reconstruction(paths: list[Path], reconstruct: Callable[[torch.Tensor], torch.Tensor], *,
                            device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Run `reconstruct` ((1, 1, X, Y, Z) [0, 1] -> same shape) on every volume -> {"volumes": [...], "mean": {...}}.

    The mean PSNR is inf when any volume is reconstructed exactly.
    """
    from tqdm import tqdm

    rows = []
    for path in tqdm(paths, desc="reconstruct", unit="vol", disable=not progress):
        hu, _ = read_ras(path)
        check_hu(hu, path.name)
        original = hu_to_unit(torch.from_numpy(hu).to(device))
        with torch.no_grad():
            recon = reconstruct(original[None, None])
        if tuple(recon.shape) != (1, 1, *original.shape):
            raise ValueError(f"{path.name}: reconstruction has shape {tuple(recon.shape)}, expected "
                             f"{(1, 1, *original.shape)}")
        recon = recon[0, 0].to(device=original.device, dtype=torch.float32).clamp(0.0, 1.0)
        rows.append({"file": path.name, "shape": list(original.shape), **volume_metrics(original, recon)})
    mean = {m: sum(r[m] for r in rows) / len(rows) for m in METRICS}
    return {"volumes": rows, "mean": mean}


def vae_reconstructor(vae: torch.nn.Module, *, memory_budget_bytes: int | None = None) -> Callable:
    """encode -> decode through the exact tiled `fastmaisi.decode.encode_image` / `decode_latent`, mean latent.

    The volume is padded (value 0, i.e. -1000 HU, split evenly on both sides as MONAI's DivisiblePad) to a
    multiple of the VAE's downsampling factor and the reconstruction cropped back.
    """
    from fastmaisi.decode import decode_latent, encode_image

    factor = int(getattr(vae, "downsample_factor", 4))
    param = next(vae.parameters())

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        pads, crop = [], [slice(None), slice(None)]
        for n in x.shape[2:]:
            extra = -n % factor
            pads.append((extra // 2, extra - extra // 2))
            crop.append(slice(extra // 2, extra // 2 + n))
        flat = [p for pair in reversed(pads) for p in pair]
        padded = F.pad(x, flat, value=0.0).to(device=param.device, dtype=param.dtype)
        z = encode_image(vae, padded, memory_budget_bytes=memory_budget_bytes)
        if isinstance(z, (tuple, list)):  # (z_mu, z_sigma): reconstruct from the mean
            z = z[0]
        return decode_latent(vae, z, memory_budget_bytes=memory_budget_bytes)[tuple(crop)]

    return reconstruct


def load_vae(weights: str | Path, network_config: str | Path | None = None, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The image autoencoder (built-in MAISI definition or an official config's `autoencoder_def`), loaded strictly."""
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into

    if network_config is None:
        from fastmaisi.variants import image_autoencoder_def

        definition = image_autoencoder_def()
    else:
        from fastmaisi.config import read_network_definition

        definition = read_network_definition(network_config, "autoencoder_def")
    vae = build(definition)
    load_into(vae, weights)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
