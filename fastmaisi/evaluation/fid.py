"""2.5D FID for CT volumes: the reference's recipe (`scripts/compute_fid_2-5d_ct.py`), memory-bounded.

Per volume: RAS, optional trilinear resample, pad (-1000) / centre-crop, clip HU to [-1000, 1000]. Per plane
(XY = slices along the 3rd axis, YZ along the 1st, ZX along the 2nd) keep slices int(0.3 N)..int(0.7 N) - 1
(ratio 0.4), min-max normalise them jointly to [0, 1], repeat to 3 channels (BGR), subtract [0.406, 0.456, 0.485]
(no std division) and take the ResNet-50's global-average-pooled features, one vector per slice. FID per plane
between the pooled slice features of the two sets (Heusel et al. 2017, eq. 6), and the mean of the three.

Unlike the reference, slices go through the network `batch_size` at a time (the reference sends every slice of a
plane at once: about 205 x 3 x 512^2 floats at 512^3), and nothing is downloaded: the weights are a local file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from fastmaisi.evaluation.volumes import pad_crop, read_ras, resample

PLANES = ("XY", "YZ", "ZX")
BGR_MEANS = (0.406, 0.456, 0.485)  # ImageNet RGB means, in the BGR order the RadImageNet network expects
HU_RANGE = (-1000.0, 1000.0)


@dataclass(frozen=True)
class FidSettings:
    """Preprocessing of each volume; the reference's published numbers used spacing 1 mm and target 512^3."""

    center_slices_ratio: float | None = 0.4  # None: every slice
    spacing: tuple[float, float, float] | None = None  # resample to this spacing (mm) first
    target_shape: tuple[int, int, int] | None = None  # then pad with -1000 / centre-crop to this shape


# ---------------------------------------------------------------------------------------------------- distance
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians (Dowson & Landau 1982).

    Args:
        method: "sqrtm" (default; what MONAI's FIDMetric and pytorch-fid do): `scipy.linalg.sqrtm` of S1 @ S2 in
            float64; when that is not finite (a singular product) `eps` is added to both diagonals and it is
            retried; a small imaginary part from rounding (|imag| <= 1e-3 on the diagonal) is dropped, a larger one
            is a ValueError. "eigh": Tr (S1 S2)^(1/2) as the sum of the square roots of the eigenvalues of the
            symmetric S1^(1/2) S2 S1^(1/2) (the same eigenvalues as S1 S2), negative rounding clipped to 0; no
            complex arithmetic and about 50x faster on CPU at 2048-d (sqrtm takes minutes on a small machine).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not agree: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    if method == "sqrtm":
        tr_covmean = _trace_sqrtm_product(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown Frechet distance method {method!r}; choose from sqrtm, eigh")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    lam, vec = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vec * np.sqrt(np.clip(lam, 0.0, None))) @ vec.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # "matrix is singular": handled by the caller's finiteness check
        warnings.simplefilter("ignore")
        return scipy.linalg.sqrtm(a)


def fid_from_features(features1, features2, method: str = "sqrtm") -> float:
    """FID between two feature sets (N1, C) and (N2, C): mean and unbiased covariance of each, then the distance."""
    f1, f2 = (np.asarray(torch.as_tensor(f).double().cpu()) for f in (features1, features2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two (N >= 2, C) feature arrays with the same C, got {f1.shape} and {f2.shape}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False),
                            method=method)


# ---------------------------------------------------------------------------------------------------- features
def preprocess(volume: np.ndarray, spacing, settings: FidSettings, device: torch.device) -> torch.Tensor:
    """RAS volume (X, Y, Z) in HU -> resampled, padded/cropped, clipped float32 tensor on `device`."""
    v = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)
    if settings.spacing is not None:
        v = resample(v, spacing, settings.spacing)
    if settings.target_shape is not None:
        v = pad_crop(v, settings.target_shape, HU_RANGE[0])
    return v.clamp_(*HU_RANGE)


def center_range(n: int, ratio: float | None) -> range:
    """Slice indices the reference keeps: int((1 - r) / 2 * n) .. int((1 + r) / 2 * n) - 1 (all when r is None)."""
    if ratio is None:
        return range(n)
    return range(int((1.0 - ratio) / 2.0 * n), int((1.0 + ratio) / 2.0 * n))


def plane_slices(volume: torch.Tensor, plane: str, ratio: float | None) -> torch.Tensor:
    """(X, Y, Z) -> the kept slices of one plane, (N, H, W): XY (N, X, Y), YZ (N, Y, Z), ZX (N, X, Z) (a view)."""
    order = {"XY": (2, 0, 1), "YZ": (0, 1, 2), "ZX": (1, 0, 2)}[plane]
    stack = volume.permute(*order)
    keep = center_range(stack.shape[0], ratio)
    return stack[keep.start:keep.stop]


@torch.no_grad()
def slice_features(slices: torch.Tensor, net: torch.nn.Module, batch_size: int = 32) -> torch.Tensor:
    """(N, H, W) slices of one plane -> (N, C) float32 CPU features: joint min-max, 3 channels, BGR means, `net`."""
    lo, hi = slices.min(), slices.max()
    scale = hi - lo + 1e-10
    means = torch.tensor(BGR_MEANS, device=slices.device, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for start in range(0, slices.shape[0], batch_size):
        x = ((slices[start:start + batch_size].float() - lo) / scale)[:, None]  # (n, 1, H, W) in [0, 1]
        out.append(net(x.expand(-1, 3, -1, -1) - means).float().cpu())
    return torch.cat(out)


def volume_features(volume: torch.Tensor, net: torch.nn.Module, ratio: float | None = 0.4,
                    batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Preprocessed (X, Y, Z) volume -> {plane: (N_plane, C)} features."""
    return {plane: slice_features(plane_slices(volume, plane, ratio), net, batch_size) for plane in PLANES}


def dataset_features(paths: list[Path], net: torch.nn.Module, settings: FidSettings, *, device: torch.device,
                     batch_size: int = 32, cache_dir: str | os.PathLike | None = None, net_id: str = "",
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Features of every volume in `paths`, concatenated per plane -> {plane: (sum N, C)}.

    Args:
        cache_dir: where per-volume features are kept (`<sha256>.pt`); the name hashes the file's absolute path,
            size and mtime, `settings` and `net_id`, so a change of any of them recomputes.
        net_id: identifies the network's weights in the cache key (the CLI uses the weight file's sha256).
    """
    from tqdm import tqdm

    per_plane: dict[str, list[torch.Tensor]] = {p: [] for p in PLANES}
    for path in tqdm(paths, desc="features", unit="vol", disable=not progress):
        cached = _cache_path(cache_dir, path, settings, net_id) if cache_dir is not None else None
        if cached is not None and cached.is_file():
            feats = torch.load(cached, weights_only=True)
        else:
            volume, spacing = read_ras(path)
            feats = volume_features(preprocess(volume, spacing, settings, device), net,
                                    settings.center_slices_ratio, batch_size)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp")
                torch.save(feats, tmp)
                os.replace(tmp, cached)
        for plane in PLANES:
            per_plane[plane].append(feats[plane])
    return {plane: torch.cat(feats) for plane, feats in per_plane.items()}


def fid_2p5d(real: list[Path], fake: list[Path], net: torch.nn.Module, settings: FidSettings = FidSettings(), *,
             device: torch.device | str = "cpu", batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
             net_id: str = "", method: str = "sqrtm", progress: bool = False) -> dict:
    """2.5D FID between two lists of NIfTI volumes -> {"XY", "YZ", "ZX", "mean": float, "slices": {...}}.

    `net` maps (B, 3, H, W) to (B, C) features (`ResNet50` for the real metric; any module for tests).
    `method` is `frechet_distance`'s.
    """
    device = torch.device(device)
    net = net.to(device).eval()
    kwargs = dict(device=device, batch_size=batch_size, cache_dir=cache_dir, net_id=net_id, progress=progress)
    real_feats = dataset_features(real, net, settings, **kwargs)
    fake_feats = dataset_features(fake, net, settings, **kwargs)
    result: dict = {plane: fid_from_features(real_feats[plane], fake_feats[plane], method) for plane in PLANES}
    result["mean"] = sum(result[p] for p in PLANES) / len(PLANES)
    result["slices"] = {plane: {"real": len(real_feats[plane]), "fake": len(fake_feats[plane])} for plane in PLANES}
    return result


def _cache_path(cache_dir, path: Path, settings: FidSettings, net_id: str) -> Path:
    stat = Path(path).stat()
    key = json.dumps({"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "settings": asdict(settings), "net": net_id, "v": 1}, sort_keys=True)
    return Path(cache_dir) / f"{Path(path).name.split('.')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
