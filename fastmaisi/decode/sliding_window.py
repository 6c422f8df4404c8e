"""MONAI `SlidingWindowInferer`-compatible decode (per-window GroupNorm statistics, Gaussian blending): the
reference MAISI pipeline's decode, for bit-level comparisons with it."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastmaisi.decode.exact import _check
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's dense_patch_slices with its scan interval."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    n = 1
    while (n - 1) * interval + roi < size:
        n += 1
    return [min(i * interval, size - roi) for i in range(n)]


def importance_map(patch: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                   device=None) -> torch.Tensor:
    """MONAI's blending weights for a patch: ones, or a separable Gaussian (sigma = sigma_scale * size) clamped
    below at max(min, 1e-3)."""
    if mode == "constant":
        return torch.ones(tuple(patch), device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    scales = [sigma_scale] * len(patch) if isinstance(sigma_scale, (int, float)) else list(sigma_scale)
    m = None
    for i, (n, s) in enumerate(zip(patch, scales)):
        t = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float, device=device)
        g = torch.exp(t**2 / (-2 * (n * s) ** 2))
        m = g if m is None else m.unsqueeze(-1) * g[(None,) * i]
    return m.clamp_(min=max(m.min().item(), 1e-3))


def decode_latent_sliding_window(
    vae: AutoencoderKlMaisi,
    z: torch.Tensor,
    roi_size: int | Sequence[int],
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    cval: float = 0.0,
    out_device: str | torch.device | None = None,
) -> torch.Tensor:
    """The reference pipeline's decode: MONAI `SlidingWindowInferer(roi_size, sw_batch_size, overlap, mode,
    sigma_scale)` with `vae.decode` as predictor (GroupNorm statistics per window), blended on the VAE's device.

    Window positions, the importance map (computed at `roi_size` latent voxels, nearest-exact resized to the decoded
    window) and the weighted average follow MONAI; accumulation is in fp32 and the result has z's dtype.
    `roi_size` is in latent voxels (non-positive entries take the whole axis); latents smaller than the roi are
    zero-padded (`cval`) around, as MONAI does, and the padding is cropped from the output.
    """
    _check(vae, z, vae.latent_channels, "latent z", None)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    B, _, *size = z.shape
    roi = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
    if len(roi) != 3:
        raise ValueError(f"roi_size must have 3 entries, got {roi_size}")
    roi = [r if r and r > 0 else s for r, s in zip(roi, size)]
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size)]
    zp = z
    if any(p for pp in pad for p in pp):
        zp = F.pad(z, [p for pp in reversed(pad) for p in pp], value=cval)
    full = list(zp.shape[2:])
    starts = [_window_starts(n, r, overlap) for n, r in zip(full, roi)]
    windows = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    w_latent = importance_map(roi, mode, sigma_scale, device)[None, None]

    out = cnt = w_out = zoom = None
    jobs = [(b, win) for b in range(B) for win in windows]
    with torch.no_grad():
        for j0 in range(0, len(jobs), sw_batch_size):
            chunk = jobs[j0 : j0 + sw_batch_size]
            patch = torch.cat([
                zp[b : b + 1, :, s0 : s0 + roi[0], s1 : s1 + roi[1], s2 : s2 + roi[2]] for b, (s0, s1, s2) in chunk
            ]).to(device=device, dtype=dtype)
            y = vae.decode(patch).float()
            if out is None:
                zoom = [o / float(r) for o, r in zip(y.shape[2:], roi)]
                w_out = F.interpolate(w_latent, size=y.shape[2:], mode="nearest-exact")
                out = torch.zeros((B, y.shape[1], *[int(n * f) for n, f in zip(full, zoom)]), device=device)
                cnt = torch.zeros((1, 1, *out.shape[2:]), device=device)
                for win in windows:
                    cnt[(..., *_zoomed(win, roi, zoom))] += w_out[0, 0]
            for (b, win), yy in zip(chunk, y):
                out[(b, slice(None), *_zoomed(win, roi, zoom))] += yy * w_out[0]
        out /= cnt
        crop = [slice(int(round(p[0] * f)), int(round((p[0] + n) * f))) for p, n, f in zip(pad, size, zoom)]
        out = out[(slice(None), slice(None), *crop)].to(z.dtype)
    return out.to(out_device) if out_device is not None else out


def _zoomed(start: Sequence[int], roi: Sequence[int], zoom: Sequence[float]) -> tuple[slice, ...]:
    return tuple(slice(int(s * f), int((s + r) * f)) for s, r, f in zip(start, roi, zoom))
