"""Volume reading and geometry helpers shared by the evaluation commands (NIfTI in, RAS, MONAI-equivalent pad/crop)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def list_volumes(folder: str | os.PathLike, *, skip_labels: bool = True) -> list[Path]:
    """Sorted NIfTI files in `folder` (not recursive); `*_label.nii[.gz]` (fastmaisi's label outputs) skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if skip_labels:
        paths = [p for p in paths if not p.name.endswith(("_label.nii.gz", "_label.nii"))]
    if not paths:
        raise ValueError(f"no NIfTI volumes (*.nii, *.nii.gz) in {folder}")
    return paths


def read_ras(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3D NIfTI reoriented to RAS (nibabel.as_closest_canonical) -> (float32 array (X, Y, Z), spacing mm)."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(os.fspath(path)))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read {path} as NIfTI: {exc}") from None
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return data, spacing


def resample(volume: torch.Tensor, spacing, new_spacing) -> torch.Tensor:
    """Trilinear resample (X, Y, Z) from `spacing` to `new_spacing` mm; size round(n * s / ns) per axis."""
    shape = [max(1, int(round(n * s / ns))) for n, s, ns in zip(volume.shape, spacing, new_spacing)]
    if list(volume.shape) == shape:
        return volume
    return F.interpolate(volume[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]


def pad_crop(volume: torch.Tensor, shape, value: float) -> torch.Tensor:
    """MONAI SpatialPad (symmetric, constant `value`) then CenterSpatialCrop (start n//2 - m//2) to `shape`."""
    pads = []
    for n, m in zip(reversed(volume.shape), reversed(tuple(shape))):
        before = max(m - n, 0) // 2
        pads += [before, max(m - n, 0) - before]
    if any(pads):
        volume = F.pad(volume, pads, value=value)
    index = tuple(slice(n // 2 - m // 2, n // 2 - m // 2 + m) for n, m in zip(volume.shape, shape))
    return volume[index]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; a CUDA device on a machine without CUDA is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
