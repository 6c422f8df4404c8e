"""NIfTI writing: int16 images and uint8 label maps with a RAS affine, atomically and byte-reproducibly."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fastmaisi.io.atomic import _staged, _write_file
from fastmaisi.io.volumes import _image_data, _label_data, ras_affine

SYNTHETIC_DESCRIPTION = "SYNTHETIC - fastmaisi"


def _nifti_image(data: np.ndarray, affine: np.ndarray, kind: str) -> Any:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr["descrip"] = f"{SYNTHETIC_DESCRIPTION} {kind}".encode()
    if kind == "label":
        hdr.set_intent("label")
    return img


def _gzip_class() -> type:
    """python-isal's GzipFile (the `fast` extra: ISA-L deflate, several times faster) when installed, else gzip's.
    Both write standard gzip that nibabel and every other reader opens; each gives the same bytes for a volume."""
    try:
        from isal.igzip import GzipFile
    except ImportError:
        return gzip.GzipFile
    return GzipFile


def deflate_name() -> str:
    """Which deflate writes .nii.gz here (for records): "isal" or "zlib"."""
    return "zlib" if _gzip_class() is gzip.GzipFile else "isal"


def _write_nifti_to(path: Path, img: Any, compress: bool) -> None:
    def write(f: Any) -> None:
        if compress:  # no file name and mtime 0 in the gzip header: the same volume gives the same bytes (and hash)
            with _gzip_class()(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
                img.to_file_map(img.make_file_map({"image": gz}))
        else:
            img.to_file_map(img.make_file_map({"image": f}))

    _write_file(path, write)


def _nifti_suffix(path: Path) -> bool:
    """True for .nii.gz, False for .nii; anything else is an error."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return True
    if name.endswith(".nii"):
        return False
    raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {str(path)!r}")


def write_nifti(path: str | os.PathLike, array: Any, spacing: Sequence[float], kind: str = "image",
                origin: Sequence[float] | None = None, overwrite: bool = False) -> Path:
    """Write an int16 image (kind="image") or a uint8 label map (kind="label") as NIfTI with a RAS affine, atomically.

    Raises ValueError for a bad array, spacing or an existing file (unless `overwrite`), OSError when writing fails
    (then no file is left under `path`).
    """
    path = Path(path)
    compress = _nifti_suffix(path)
    if kind == "image":
        data = _image_data(array)
    elif kind == "label":
        data = _label_data(array)
    else:
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    img = _nifti_image(data, ras_affine(spacing, origin), kind)
    with _staged(str(path), overwrite) as st:
        _write_nifti_to(st.path(path), img, compress)
    return path
