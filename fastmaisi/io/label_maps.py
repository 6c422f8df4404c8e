"""Reading label maps (NIfTI, DICOM series folder, DICOM SEG), reoriented to RAS."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from fastmaisi.io.dicom import _read_dicom_seg, _read_dicom_series


def read_label_map(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a label map, reoriented to RAS: (array (X, Y, Z) of uint8, or int32 for ids > 255; spacing; 4x4 affine).

    Accepts a NIfTI file (.nii/.nii.gz), a folder holding one DICOM image series, or a DICOM SEG file
    (each segment becomes the MAISI id of its coded anatomy, else its `label N` tracking id, else its
    segment number). Raises ValueError for anything that
    is not a single-channel map of non-negative whole numbers.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label map {str(path)!r} does not exist")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif path.name.lower().endswith((".nii", ".nii.gz")):
        try:
            img = nib.load(path)
            array, affine = np.asanyarray(img.dataobj), img.affine
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise ValueError(f"cannot read {str(path)!r} as NIfTI: {exc}") from exc
    else:
        array, affine = _read_dicom_seg(path)
    array = _label_values(_squeeze_channels(np.asarray(array), path), path)
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    array, affine = np.asanyarray(img.dataobj), img.affine
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return array, spacing, affine  # type: ignore[return-value]


def _squeeze_channels(a: np.ndarray, path: Path) -> np.ndarray:
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        extra = f" with {a.shape[3]} channels (a label map has one)" if a.ndim == 4 else ""
        raise ValueError(f"{str(path)!r} is not a label map: {a.ndim}-D, shape {a.shape}{extra}")
    return a


def _label_values(a: np.ndarray, path: Path) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{str(path)!r} is not a label map: dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{str(path)!r} is not a label map: it has NaN/inf values")
        frac = a != np.round(a)
        if frac.any():
            raise ValueError(f"{str(path)!r} is not a label map: {int(frac.sum())} values are not whole numbers "
                             f"(e.g. {a[frac].flat[0]:.4g}); it looks like an image or a probability map")
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if lo < 0:
        raise ValueError(f"{str(path)!r} is not a label map: negative values (min {lo:g}); it looks like an image")
    if hi > np.iinfo(np.int32).max:
        raise ValueError(f"{str(path)!r} is not a label map: label ids up to {hi:g}")
    return a.astype(np.uint8 if hi <= 255 else np.int32, copy=False)
