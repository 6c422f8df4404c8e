"""World geometry of a user's mask through generation: to axis-aligned RAS for the pipeline, and the output grid's
affine back in the input's own orientation, so the synthetic volume overlays the user's data (Slicer, ITK-SNAP)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np

OBLIQUE_TOLERANCE_DEG = 0.01


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and the world axis closest to it."""
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(math.degrees(math.acos(min(1.0, float(np.abs(cols).max(axis=0).min())))))


def to_ras(label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(label in RAS index order, its diagonal RAS affine, note or None). Axis-aligned inputs are only flipped and
    transposed; an oblique one is resampled (nearest neighbour) onto an axis-aligned grid covering it, with a note."""
    angle = obliquity_deg(affine)
    if angle <= OBLIQUE_TOLERANCE_DEG:
        ornt = nib.orientations.io_orientation(affine)
        ras = np.ascontiguousarray(nib.orientations.apply_orientation(label, ornt))
        new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, label.shape)
        spacing = np.linalg.norm(new_affine[:3, :3], axis=0)
        clean = np.diag([*spacing, 1.0])
        clean[:3, 3] = new_affine[:3, 3]
        return ras, clean, None
    from scipy import ndimage

    ornt = nib.orientations.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    corners = np.array([[i, j, k, 1.0] for i in (0, label.shape[0] - 1) for j in (0, label.shape[1] - 1)
                        for k in (0, label.shape[2] - 1)]) @ affine.T
    lo, hi = corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1)
    new_affine = np.diag([*spacing, 1.0])
    new_affine[:3, 3] = lo
    index_map = np.linalg.inv(affine) @ new_affine  # output voxel -> input voxel
    ras = ndimage.affine_transform(label, index_map[:3, :3], offset=index_map[:3, 3], output_shape=shape, order=0,
                                   mode="constant", cval=0).astype(label.dtype)
    note = (f"the mask's axes are oblique ({angle:.1f} degrees from the closest world axes): resampled (nearest "
            f"neighbour) onto an axis-aligned {'x'.join(map(str, shape))} grid at the same spacing; outputs use it")
    return ras, new_affine, note


def output_affine(ras_affine: np.ndarray, ras_shape, size, spacing, input_affine: np.ndarray) -> np.ndarray:
    """World affine of the generated volume, in the axis orientation of `input_affine` (LPS stays LPS).

    The pipeline resamples the RAS mask to `spacing` keeping voxel 0 in place, then centre-pads/crops it to `size`
    (`pipelines.common.resample_label`); this is that grid's affine, reoriented like the input.
    """
    origin = ras_affine[:3, 3].copy()
    for axis, (n, s, m, ns) in enumerate(zip(ras_shape, np.diag(ras_affine)[:3], size, spacing)):
        resized = int(np.rint((n - 1) * s / ns + 1))  # the resampling rule's length (voxel 0 stays in place)
        offset = resized // 2 - m // 2 if resized >= m else -((m - resized) // 2)  # centre crop / centre pad
        origin[axis] += offset * ns
    ras_out = np.diag([*map(float, spacing), 1.0])
    ras_out[:3, 3] = origin
    if obliquity_deg(input_affine) > OBLIQUE_TOLERANCE_DEG:
        return ras_out  # resampled to the closest axes: outputs stay RAS
    to_input = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                               nib.orientations.io_orientation(input_affine))
    return ras_out @ nib.orientations.inv_ornt_aff(to_input, tuple(int(v) for v in size))


def from_ras(array: np.ndarray, out_affine: np.ndarray) -> np.ndarray:
    """An array in RAS index order, flipped/transposed into the orientation of `out_affine`."""
    ornt = nib.orientations.io_orientation(out_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))
