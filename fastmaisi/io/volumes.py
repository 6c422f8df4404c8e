"""Intensities and geometry: decoder output to int16 HU / MR units, RAS affines, array checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CT_HU_RANGE = (-1000, 1000)
MR_RANGE = (0, np.iinfo(np.int16).max)  # nominal [0, 1000]; the upper clip only guards int16 overflow


def is_ct(modality: str | int) -> bool:
    """True for CT, False for MR. Ints follow MAISI's modality ids (1..7 CT, 8..127 MR); strings start 'ct' or 'mr'."""
    if isinstance(modality, (int, np.integer)) and not isinstance(modality, bool):
        if 1 <= modality <= 7:
            return True
        if 8 <= modality <= 127:
            return False
    elif isinstance(modality, str):
        name = modality.strip().lower()
        if name.startswith("ct"):
            return True
        if name.startswith("mr"):
            return False
    raise ValueError(f"modality must be 'ct', 'mr...' or a MAISI modality id in 1..127, got {modality!r}")


def hu_from_unit(x: Any, modality: str | int) -> np.ndarray:
    """Decoder output in [0, 1] -> int16 intensities (MAISI `diff_model_infer.py` mapping), same shape.

    CT: x*2000-1000 HU clipped to [-1000, 1000]. MR: x*1000 clipped below at 0 (and at the int16 maximum).
    Values are rounded to the nearest integer (the reference truncates toward zero: at most 1 unit apart).
    `x` is a numpy array or a torch tensor. A GPU tensor is converted on its GPU (milliseconds instead of seconds on the
    host at 512^3), the same float32 arithmetic, and only the int16 result is copied to the host.
    """
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        if x.device.type != "cpu":
            return _hu_from_tensor(x.detach(), modality)
        x = x.detach().float().numpy()
    a = np.asarray(x, dtype=np.float32)
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise ValueError(f"decoder output has {bad} non-finite values (NaN/inf); refusing to write them as intensities")
    scale, offset, (lo, hi) = _unit_mapping(modality)
    v = a * scale
    if offset:
        v += offset
    np.clip(v, lo, hi, out=v)
    np.rint(v, out=v)
    return v.astype(np.int16)


def _unit_mapping(modality: str | int) -> tuple[float, float, tuple[int, int]]:
    """(scale, offset, clip range) of decoder output -> intensities: CT x*2000-1000 HU in [-1000, 1000]; MR x*1000,
    clipped at 0 (and the int16 maximum)."""
    return (2000.0, -1000.0, CT_HU_RANGE) if is_ct(modality) else (1000.0, 0.0, MR_RANGE)


def _hu_from_tensor(t: Any, modality: str | int) -> np.ndarray:
    """hu_from_unit for a torch tensor, on its device; the same float32 operations, so the same int16 values."""
    import torch

    t = t.float()
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        raise ValueError(f"decoder output has {bad} non-finite values (NaN/inf); refusing to write them as intensities")
    scale, offset, (lo, hi) = _unit_mapping(modality)
    v = t * scale
    if offset:
        v += offset
    v.clamp_(lo, hi).round_()  # round half to even, as np.rint
    return v.to(torch.int16).cpu().numpy()


def ras_affine(spacing: Sequence[float], origin: Sequence[float] | None = None) -> np.ndarray:
    """4x4 RAS affine: diag(spacing), translation = world position (mm) of voxel (0, 0, 0)."""
    sp = _spacing(spacing)
    org = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64)
    if org.shape != (3,) or not np.all(np.isfinite(org)):
        raise ValueError(f"origin must be 3 finite numbers (mm), got {origin!r}")
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = org
    return aff


def _spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return sp  # type: ignore[return-value]


def _volume(a: Any, name: str) -> np.ndarray:
    """A 3-D numpy array; leading size-1 axes (batch, channel) are dropped."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (X, Y, Z) volume, got shape {a.shape}")
    return a


def _image_data(image: Any) -> np.ndarray:
    a = _volume(image, "image")
    if not (np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"image must hold integer intensities (HU), got dtype {a.dtype}; map decoder output with "
                         "hu_from_unit() first")
    info = np.iinfo(np.int16)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise ValueError(f"image values [{a.min()}, {a.max()}] do not fit int16")
    return a.astype(np.int16, copy=False)


def _label_data(label: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = _volume(label, "label")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"label map must hold integer label ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"label ids must lie in 0..255 to be written as uint8, got [{a.min()}, {a.max()}]")
    if shape is not None and a.shape != shape:
        raise ValueError(f"label map shape {a.shape} differs from image shape {shape}")
    return a.astype(np.uint8, copy=False)
