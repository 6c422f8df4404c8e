"""One output set (image, label map, label table, preview, record) written atomically; output-folder checks."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastmaisi.labels import LABEL_NAMES
from fastmaisi.io.atomic import _remove, _staged, _write_file
from fastmaisi.io.dicom import _write_dicom_seg, _write_dicom_series, dicom_identity
from fastmaisi.io.nifti import _nifti_image, _write_nifti_to
from fastmaisi.io.preview import label_color, preview_image
from fastmaisi.io.record import _dumps, _record_bytes, validate_record
from fastmaisi.io.volumes import _image_data, _label_data, _spacing, is_ct, ras_affine

LABELS_SCHEMA = "fastmaisi-labels/1"


def output_paths(out_dir: str | os.PathLike, stem: str, fmt: str = "nifti") -> dict[str, Path]:
    """The files of one output set (see the module docstring), by kind."""
    d = Path(out_dir)
    names = {"nifti": {"image": f"{stem}_image.nii.gz", "label": f"{stem}_label.nii.gz"},
             "dicom": {"image": f"{stem}_image_dicom", "label": f"{stem}_label_seg.dcm"}}
    if fmt not in names:
        raise ValueError(f"fmt must be one of {sorted(names)}, got {fmt!r}")
    paths = {k: d / v for k, v in names[fmt].items()}
    paths.update(labels=d / f"{stem}_labels.json", preview=d / f"{stem}_preview.png", record=d / f"{stem}_record.json")
    return paths


def _check_stem(stem: str) -> None:
    if not isinstance(stem, str) or not stem or stem.startswith(".") or re.search(r"[/\\\x00]", stem):
        raise ValueError(f"output name must be a non-empty file name without '/' or a leading '.', got {stem!r}")


def _existing(out_dir: Path, stem: str) -> list[Path]:
    paths = {p for fmt in ("nifti", "dicom") for p in output_paths(out_dir, stem, fmt).values()}
    return sorted(p for p in paths if p.exists() or p.is_symlink())


def check_output_dir(out_dir: str | os.PathLike, stems: Sequence[str], overwrite: bool = False) -> Path:
    """Create `out_dir` if needed and check, before any compute, that it is writable and that no output of `stems`
    (in any format) exists unless `overwrite`. Raises ValueError with the reason."""
    out = Path(out_dir)
    for stem in stems:
        _check_stem(stem)
    if len(set(stems)) != len(stems):
        raise ValueError(f"output names repeat: {sorted(s for s in set(stems) if list(stems).count(s) > 1)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fastmaisi-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output folder {str(out)!r} is not writable: {exc.strerror or exc}") from exc
    existing = [p for stem in stems for p in _existing(out, stem)]
    if existing and not overwrite:
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        shown = ", ".join(p.name for p in existing[:5]) + more
        raise ValueError(f"outputs already exist in {str(out)!r}: {shown}; pass overwrite=True (--overwrite) to "
                         "replace them, or choose another folder or name")
    return out


def _counts(label: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """np.bincount of a non-negative integer map in any memory order, 4 Mi voxels at a time (one bincount of a
    512^3 uint8 map would make a 1 GiB int64 copy first)."""
    flat = label.reshape(-1, order="A")  # (a view for a C- or Fortran-ordered map; the order does not matter here)
    counts = np.zeros(1, np.int64)
    for start in range(0, flat.size, chunk):
        part = np.bincount(flat[start:start + chunk])
        if part.size > counts.size:
            part[:counts.size] += counts
            counts = part
        else:
            counts[:part.size] += part
    return counts


def label_table(label: np.ndarray, spacing: Sequence[float],
                label_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The `STEM_labels.json` content: every label id present (but 0) with name, colour, voxels and volume (mL)."""
    counts = _counts(label)
    ml = float(np.prod(_spacing(spacing))) / 1000.0
    names = LABEL_NAMES if label_names is None else label_names
    entries = [{"value": v, "name": names.get(v, f"label_{v}"), "color": list(label_color(v)),
                "voxels": int(counts[v]), "volume_ml": round(int(counts[v]) * ml, 3)}
               for v in map(int, np.flatnonzero(counts)) if v != 0]
    return {"schema": LABELS_SCHEMA, "labels": entries}


def write_outputs(out_dir: str | os.PathLike, stem: str, image_hu: Any, label: Any, spacing: Sequence[float],
                  record: Mapping[str, Any], *, modality: str | int, preview: bool = True, fmt: str = "nifti",
                  overwrite: bool = False, origin: Sequence[float] | None = None,
                  label_names: Mapping[int, str] | None = None,
                  window: str | tuple[float, float] | None = None,
                  affine: np.ndarray | None = None) -> dict[str, Path]:
    """Write one output set (image, label map or None, label table, preview, record) atomically; return its paths.

    `image_hu` is int16-compatible (see `hu_from_unit`), `label` uint8-compatible or None (image-only generation);
    `modality` ("ct", "mr", or a MAISI id) picks the preview window and the DICOM IOD; `label_names` default to the
    MAISI vocabulary (`fastmaisi.labels.LABEL_NAMES`). `affine`: the arrays' full 4x4 world affine in any
    axis-aligned orientation (e.g. a user's LPS mask's), used instead of `spacing`/`origin`; NIfTI keeps it as given
    (qform = sform), DICOM and the preview see the arrays reoriented to RAS.
    The record (see the module docstring) gains "geometry" and "outputs" (file names and SHA-256), and is written
    last. With `overwrite`, outputs of `stem` in the other format are removed so the folder holds one coherent set.
    Raises ValueError on bad input or existing outputs, OSError when writing fails (nothing left under final names).
    """
    # 1. check everything before writing anything
    _check_stem(stem)
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} does not exist; call check_output_dir() first")
    rec = validate_record(record)
    is_ct(modality)
    image = _image_data(image_hu)
    lab = None if label is None else _label_data(label, image.shape)
    if affine is None:
        affine = ras_affine(spacing, origin)
        ras_image, ras_lab, ras_aff = image, lab, affine
    else:
        affine, ras_image, ras_lab, ras_aff = _oriented(affine, image, lab)
        spacing = tuple(float(s) for s in np.diag(ras_aff)[:3])
    paths = output_paths(out, stem, fmt)
    if lab is None:
        del paths["label"], paths["labels"]
    elif fmt == "dicom" and not lab.any():
        raise ValueError("label map is empty (all 0): a DICOM SEG needs a segment; pass label=None")
    if not preview:
        del paths["preview"]
    if not overwrite:
        existing = _existing(out, stem)
        if existing:
            raise ValueError(f"outputs already exist: {', '.join(p.name for p in existing)}; pass overwrite=True "
                             "(--overwrite) to replace them")
    # 2. write everything under temporary names, then rename into place (record last). The files are written at the
    # same time on worker threads (deflate, hashing, PNG and DICOM encoding release the GIL); the record is written
    # once they all are.
    from concurrent.futures import ThreadPoolExecutor

    from fastmaisi.weights import sha256_file  # (imports torch)

    # each job writes its file(s) and returns their entries of the record's "outputs", by kind
    def nifti(kind: str, data: np.ndarray, tmp: Path) -> dict[str, dict[str, Any]]:
        _write_nifti_to(tmp, _nifti_image(data, affine, kind), compress=True)
        return {kind: {"file": paths[kind].name, "format": "nifti", "dtype": str(data.dtype),
                       "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}}

    def dicom(series: Path, seg: Path | None) -> dict[str, dict[str, Any]]:
        datasets = _write_dicom_series(series, ras_image, ras_aff, modality, rec)
        done = {"image": {"file": paths["image"].name, "format": "dicom", "files": len(datasets),
                          **dicom_identity(datasets)}}
        if seg is not None:
            _write_dicom_seg(seg, datasets, ras_lab, label_names)
            done["label"] = {"file": paths["label"].name, "format": "dicom-seg", "sha256": sha256_file(seg),
                             "bytes": seg.stat().st_size}
        return done

    def table(tmp: Path) -> dict[str, dict[str, Any]]:
        text = (_dumps(label_table(lab, spacing, label_names)) + "\n").encode()
        _write_file(tmp, lambda f: f.write(text))
        return {"labels": {"file": paths["labels"].name, "format": "json"}}

    def picture(tmp: Path) -> dict[str, dict[str, Any]]:
        pic = preview_image(ras_image, ras_lab, spacing, modality, window)
        _write_file(tmp, lambda f: pic.save(f, format="PNG"))
        return {"preview": {"file": paths["preview"].name, "format": "png"}}

    outputs: dict[str, Any] = {}
    with _staged(f"outputs {stem!r} in {str(out)!r}", overwrite=True) as st:  # existing files checked above
        with ThreadPoolExecutor(4, thread_name_prefix="fastmaisi-write") as pool:  # (leaving it waits for all)
            if fmt == "nifti":
                jobs = [pool.submit(nifti, kind, data, st.path(paths[kind]))
                        for kind, data in (("image", image), ("label", lab)) if data is not None]
            else:
                jobs = [pool.submit(dicom, st.path(paths["image"]), None if lab is None else st.path(paths["label"]))]
            if lab is not None:
                jobs.append(pool.submit(table, st.path(paths["labels"])))
            if preview:
                jobs.append(pool.submit(picture, st.path(paths["preview"])))
        for job in jobs:  # (in submission order: the record's bytes do not depend on which finished first)
            outputs.update(job.result())
        rec["geometry"] = {"shape": list(image.shape), "spacing": list(_spacing(spacing)),
                           "origin": affine[:3, 3].tolist(), "orientation": _axcodes(affine),
                           "affine": affine.tolist()}
        rec["outputs"] = outputs
        data = _record_bytes(rec)
        _write_file(st.path(paths["record"]), lambda f: f.write(data))
    if overwrite:  # leftovers of an earlier run in the other format would contradict the record
        for p in _existing(out, stem):
            if p not in paths.values():
                _remove(p)
    return paths


def _axcodes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine))


def _oriented(affine: Any, image: np.ndarray, lab: np.ndarray | None):
    """(affine, image and label in RAS index order, their RAS affine) for an axis-aligned `affine` of the arrays."""
    import nibabel as nib

    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    cols = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    if np.abs(cols).max(axis=0).min() < 1 - 1e-6:
        raise ValueError("affine is oblique: outputs are written on axis-aligned grids only")
    ornt = nib.orientations.io_orientation(aff)
    ras_aff = aff @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    ras_aff[np.abs(ras_aff) < 1e-9] = 0.0
    flip = (lambda a: None if a is None else np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt)))
    return aff, flip(image), flip(lab), ras_aff
