"""Reading a user's segmentation in its own grid: a multilabel NIfTI, a folder of per-class masks (TotalSegmentator's
default output), one class mask, a DICOM SEG (segments named by their coded anatomy) or a DICOM label series.

Nothing is reoriented here: the array keeps the input's voxel order and `affine` its world geometry (RAS mm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fastmaisi.io.label_maps import _label_values, _squeeze_channels
from fastmaisi.vocabularies import maisi_id_of_name

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IGNORED_FILES = ("statistics.json",)  # TotalSegmentator writes these beside the masks (also preview_*.png)


@dataclass
class Segmentation:
    """One input: integer ids (X, Y, Z) in its own voxel order, its 4x4 world affine, and, for inputs that name their
    classes (folders, class files, DICOM SEG), id -> class name."""

    path: str
    kind: str  # "multilabel", "folder", "class-file", "dicom-seg" or "dicom-series"
    array: np.ndarray
    affine: np.ndarray
    class_names: dict[int, str] | None = None
    notes: list[str] = field(default_factory=list)


def read_segmentation(path) -> Segmentation:
    """Read one input (see the module docstring); ValueError (one line) for anything that is not a label map."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist")
    if path.is_dir():
        files = _nifti_files(path)
        if files:
            return _read_class_folder(path, files)
        return _read_dicom_folder(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(path)
        stem = _stem(path)
        known, _ = maisi_id_of_name(stem)
        if known and array.size and int(array.max()) <= 1:
            return Segmentation(str(path), "class-file", array, affine, {1: stem})
        return Segmentation(str(path), "multilabel", array, affine)
    return _read_dicom_seg(path)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(NIFTI_SUFFIXES))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(path)
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read {str(path)!r} as NIfTI: {exc}") from exc
    array = _label_values(_squeeze_channels(np.asarray(array), path), path)
    return array, np.asarray(img.affine, dtype=np.float64)


def _read_class_folder(folder: Path, files: list[Path]) -> Segmentation:
    """One binary mask per class, named by class: ids 1..n in file-name order; a later file wins where masks overlap."""
    if len(files) > 255:
        raise ValueError(f"{str(folder)!r} holds {len(files)} masks; at most 255 classes can be merged")
    ignored = sorted(p.name for p in folder.iterdir() if p.is_file() and p not in files and not p.name.startswith("."))
    array = affine = None
    names: dict[int, str] = {}
    overlap = 0
    for i, f in enumerate(files, start=1):
        mask, aff = _read_nifti(f)
        if mask.size and int(mask.max()) > 1:  # (values are >= 0: checked by _read_nifti)
            values = np.unique(mask)
            shown = ", ".join(str(int(v)) for v in values[:6]) + (" ..." if values.size > 6 else "")
            raise ValueError(f"{str(f)!r} is not a binary class mask (values {shown}); a folder input holds one 0/1 "
                             "mask per class, named by class (TotalSegmentator's default output)")
        if array is None:
            array, affine = np.zeros(mask.shape, np.uint8), aff
        elif mask.shape != array.shape or not np.allclose(aff, affine, atol=1e-3):
            raise ValueError(f"{str(f)!r} is on another grid than {files[0].name} (shape {mask.shape} vs "
                             f"{array.shape}); the masks of one folder must share one grid")
        on = mask.astype(bool)
        overlap += int(np.count_nonzero(array[on]))
        array[on] = i
        names[i] = _stem(f)
    seg = Segmentation(str(folder), "folder", array, affine, names)
    extra = [n for n in ignored if n not in IGNORED_FILES and not re.fullmatch(r"preview.*\.png", n)]
    if extra:
        seg.notes.append(f"ignored {len(extra)} file(s) that are not NIfTI masks: {', '.join(extra[:5])}")
    if overlap:
        seg.notes.append(f"{overlap} voxel(s) claimed by two masks: the later file (by name) kept")
    return seg


def _read_dicom_folder(folder: Path) -> Segmentation:
    from fastmaisi.io.dicom import _read_dicom_series

    if not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        raise ValueError(f"{str(folder)!r} is empty: give a label map file, a folder of per-class masks or a folder "
                         "holding one DICOM label series")
    try:
        array, affine = _read_dicom_series(folder)
    except ValueError as exc:
        raise ValueError(f"{str(folder)!r} holds neither NIfTI class masks nor a DICOM label series ({exc})") from None
    array = _label_values(_squeeze_channels(np.asarray(array), folder), folder)
    return Segmentation(str(folder), "dicom-series", array, affine)


def _read_dicom_seg(path: Path) -> Segmentation:
    """Segment numbers become ids; each id is named by the segment's coded anatomy (never by its number)."""
    from fastmaisi.io.dicom import open_dicom_seg, segment_anatomy_name

    seg = open_dicom_seg(path, accepted="NIfTI (.nii/.nii.gz), a folder or a DICOM SEG")
    numbers = [int(n) for n in seg.segment_numbers]
    if max(numbers) > 255:
        raise ValueError(f"{str(path)!r} has {len(numbers)} segments; at most 255 can be read")
    names = {n: segment_anatomy_name(seg.get_segment_description(n)) for n in numbers}
    try:
        img = seg.get_volume(combine_segments=True, dtype=np.uint8).to_nibabel()
    except Exception as exc:  # highdicom refuses SEGs whose frames do not form one regular volume
        raise ValueError(f"{str(path)!r}: cannot assemble the SEG's frames into a volume ({exc})") from None
    return Segmentation(str(path), "dicom-seg", np.asarray(img.dataobj).astype(np.uint8), np.asarray(img.affine), names)
