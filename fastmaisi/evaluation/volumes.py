"""Volume reading and geometry helpers shared by the evaluation commands (NIfTI or fastmaisi's DICOM series in, RAS,
MONAI-equivalent pad/crop)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SERIES_SUFFIX = "_image_dicom"  # fastmaisi generate --format dicom: one folder of slices per volume


def list_volumes(folder: str | os.PathLike, *, skip_labels: bool = True) -> list[Path]:
    """Sorted NIfTI files and DICOM series folders (`*_image_dicom/`, as `generate --format dicom` writes them) in
    `folder` (not recursive); `*_label.nii[.gz]` (fastmaisi's label outputs) skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    paths = sorted(p for p in folder.iterdir() if (p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
                   or (p.is_dir() and p.name.endswith(DICOM_SERIES_SUFFIX) and not p.name.startswith(".")))
    if skip_labels:
        paths = [p for p in paths if not p.name.endswith(("_label.nii.gz", "_label.nii"))]
    if not paths:
        raise ValueError(f"no NIfTI volumes (*.nii, *.nii.gz) or DICOM series (*{DICOM_SERIES_SUFFIX}/) in {folder}")
    return paths


def read_ras(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3D NIfTI, or a folder holding one DICOM series, reoriented to RAS (nibabel.as_closest_canonical) ->
    (float32 array (X, Y, Z), spacing mm)."""
    import nibabel as nib

    if Path(path).is_dir():
        from fastmaisi.io.dicom import _read_dicom_series

        array, affine = _read_dicom_series(Path(path))
        img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine))
        return np.asarray(img.dataobj, dtype=np.float32), tuple(float(s) for s in img.header.get_zooms()[:3])
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


def check_hu(volume: np.ndarray, name: str) -> None:
    """Refuse a volume that is not CT in HU (an MR volume, or one scaled to [0, 1]): CT holds air near -1000 HU."""
    low = float(np.percentile(volume, 1)) if volume.size else 0.0
    if low > -500:
        raise ValueError(f"{name}: does not look like CT in HU (1st percentile {low:.0f}; CT has air near -1000): "
                         "this measure is for CT; MR and normalised volumes are refused")
