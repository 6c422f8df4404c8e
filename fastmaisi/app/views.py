"""Display copies of a job's volumes for the page's viewer: at most 256^3 voxels, so a 512^3 CT opens in a browser tab.

A volume larger than `MAX_VOXELS` is reduced by an integer factor per axis (the finest display spacing first): the
image block-averaged, the label map sampled at the voxel nearest each block's centre (ids unchanged), both on one
affine whose voxel i' is the centre of source voxels f*i' .. f*i'+f-1, so image and label overlay where the full
volumes do. Copies are uncompressed NIfTI (no gunzip on the page's main thread), written once into the job folder's
`.view/` and reused. Smaller volumes are served as they are. Downloads always give the full-resolution files.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
from pathlib import Path

import numpy as np

MAX_VOXELS = 256 ** 3
VIEW_FOLDER = ".view"
_LOCK = threading.Lock()


def reduction_factors(shape, spacing, max_voxels: int = MAX_VOXELS) -> tuple[int, int, int]:
    """Integer factor per axis so that prod(ceil(shape / factor)) <= max_voxels; (1, 1, 1) for a small volume.
    Raises by one the factors of the axes with the finest display spacing (all of them on a tie, so square voxels
    stay square), so e.g. 512^3 becomes 256^3 and 512x512x128 at 0.7x0.7x2.5 mm 256x256x128, not 256x256x64."""
    shape = [int(n) for n in shape[:3]]
    spacing = [abs(float(s)) or 1.0 for s in spacing[:3]]
    f = [1, 1, 1]
    while math.prod(math.ceil(n / k) for n, k in zip(shape, f)) > max_voxels:
        axes = [a for a in range(3) if f[a] < shape[a]]
        finest = min(spacing[a] * f[a] for a in axes)
        for a in axes:
            if spacing[a] * f[a] <= finest * 1.001:
                f[a] += 1
    return tuple(f)


def view_affine(affine, factors) -> np.ndarray:
    """The affine of a copy reduced by `factors`: its voxel i' sits at the centre of source voxels f*i' .. f*i'+f-1."""
    f = np.asarray(factors, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = (f - 1) / 2
    return np.asarray(affine, dtype=np.float64) @ scale


def block_mean(data: np.ndarray, factors) -> np.ndarray:
    """(ceil(n0/f0), ceil(n1/f1), ceil(n2/f2)) means of f0 x f1 x f2 blocks (partial blocks at the far edges average
    the voxels they have); integer input is rounded back to its dtype. Works one slab of the last axis at a time."""
    f0, f1, f2 = factors
    n0, n1, n2 = data.shape[:3]
    m0, m1, m2 = -(-n0 // f0), -(-n1 // f1), -(-n2 // f2)
    out = np.empty((m0, m1, m2), dtype=data.dtype)

    def block_sums(a: np.ndarray, axis: int, f: int) -> np.ndarray:
        starts = np.arange(0, a.shape[axis], f)
        return np.add.reduceat(a, starts, axis=axis)

    counts0 = block_sums(np.ones(n0, np.float32), 0, f0)
    counts1 = block_sums(np.ones(n1, np.float32), 0, f1)
    for k in range(m2):
        slab = data[:, :, k * f2:(k + 1) * f2].astype(np.float32).sum(axis=2)
        sums = block_sums(block_sums(slab, 0, f0), 1, f1)
        mean = sums / (counts0[:, None] * counts1[None, :] * slab.dtype.type(min(f2, n2 - k * f2)))
        if np.issubdtype(data.dtype, np.integer):
            info = np.iinfo(data.dtype)
            mean = np.clip(np.rint(mean), info.min, info.max)
        out[:, :, k] = mean
    return out


def nearest_sample(data: np.ndarray, factors) -> np.ndarray:
    """The voxel nearest each f-block's centre (index f*i' + (f-1)//2, clipped to the volume): label ids unchanged."""
    index = [np.minimum(np.arange(0, n, f) + (f - 1) // 2, n - 1) for n, f in zip(data.shape[:3], factors)]
    return np.ascontiguousarray(data[np.ix_(*index)])


def view_info(image_path: str | os.PathLike) -> dict:
    """{"shape", "source_shape", "factors", "reduced"} of the image's display copy, from its header alone."""
    import nibabel as nib

    img = nib.load(str(image_path))
    shape = tuple(int(n) for n in img.shape[:3])
    factors = reduction_factors(shape, img.header.get_zooms()[:3])
    return {"shape": [-(-n // f) for n, f in zip(shape, factors)], "source_shape": list(shape),
            "factors": list(factors), "reduced": factors != (1, 1, 1)}


def copy_name(source_name: str) -> str:
    """File name of the display copy of `source_name`: `x_image.nii.gz` -> `x_image_view.nii`."""
    return source_name.removesuffix(".gz").removesuffix(".nii") + "_view.nii"


def display_copy(job_folder: str | os.PathLike, source: str | os.PathLike, kind: str,
                 image_path: str | os.PathLike | None = None) -> Path:
    """The file the viewer should load for `source` (kind "image" or "label"): `source` itself when the image has at
    most MAX_VOXELS voxels, else `job_folder/.view/<name>_view.nii`, written once (atomically) and reused.
    The factors come from the image (`image_path`, default `source`), so the label map is reduced like the image."""
    import nibabel as nib

    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    source = Path(source)
    info = view_info(image_path or source)
    if not info["reduced"]:
        return source
    target = Path(job_folder) / VIEW_FOLDER / copy_name(source.name)
    with _LOCK:
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            return target
        target.parent.mkdir(exist_ok=True)
        img = nib.load(str(source))
        data = np.asanyarray(img.dataobj)
        reduce = block_mean if kind == "image" else nearest_sample
        small = reduce(data, info["factors"])
        affine = view_affine(img.affine, info["factors"])
        header = img.header.copy()
        header.set_data_dtype(small.dtype)
        view = nib.Nifti1Image(small, affine, header=header)
        view.set_qform(affine, int(header["qform_code"]) or 1)
        view.set_sform(affine, int(header["sform_code"]) or 1)
        tmp = target.with_name(f".partial-{secrets.token_hex(4)}-{target.name}")  # nibabel needs .nii last
        try:
            nib.save(view, str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
