"""Output files people can open and trust: NIfTI or DICOM volumes, a JSON provenance record, a preview PNG.

Output layout, for one output named STEM in the output folder:

    STEM_image.nii.gz      int16 NIfTI: CT in HU clipped to [-1000, 1000]; MR in arbitrary units >= 0 (nominal 0..1000)
    STEM_label.nii.gz      uint8 NIfTI label map (label ids as in label_dict.json; 0 = background, 200 = body)
    STEM_labels.json       the label ids present, with name, RGB colour (the preview's), voxel count and volume in mL
    STEM_preview.png       axial | coronal | sagittal mid-slices, CT window [-160, 240] HU, labels blended in colour
    STEM_record.json       the provenance record (schema below); written last, so its presence marks a complete set
  with fmt="dicom", instead of the two NIfTI files:
    STEM_image_dicom/      a DICOM series, one file per axial slice (IM_00001.dcm, ...), CT or MR Image Storage
    STEM_label_seg.dcm     the label map as a DICOM SEG (binary, one segment per label id present), on the series' frame

Geometry. Arrays are indexed (X, Y, Z) in RAS+ (nibabel's canonical orientation): index x grows toward the patient's
Right, y toward Anterior, z toward Superior. The affine is diag(spacing) with the origin (the world position of voxel
(0, 0, 0), 0 by default) as translation; qform and sform both carry it (code 1, scanner), units mm. DICOM uses LPS:
the series is written as standard axial slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0, so rows run anterior to
posterior and columns patient-right to patient-left), which is the RAS volume flipped in x and y; the world positions
are the same points. Every file is written under a temporary hidden name in its final folder and renamed into place
only when the whole set is written, so an interrupted or failed run never leaves a file that looks complete.

Record schema (`fastmaisi-record/1`). `write_record` fills schema, version and time, and sets every documented key
that is missing to null; extra keys are kept; non-finite floats are stored as null. `read_record` checks the schema and
the required keys; `fastmaisi generate --from-record FILE` reruns `request` with `seed`.
    schema               "fastmaisi-record/1"
    fastmaisi_version    package version that wrote it (also "torch": torch version)
    created_utc          ISO 8601 time
    variant              required: "rflow-ct" | "ddpm-ct" | "rflow-mr" | "rflow-mr-brain"
    request              required: every input as given (the GenerateRequest fields: size, spacing, modality,
                         organ_sizes, body_region, mask, steps, guidance_scale, seed, ...)
    seed                 required: int, the seed that made this output
    workflow             "image" | "from-mask" | "paired"
    resolved             the inputs after defaults: size [X, Y, Z], spacing [sx, sy, sz] mm, modality_code, steps,
                         guidance_scale, anatomy (organ-size vector), mask_steps
    mask                 the user's mask: {"path", "sha256", "spacing", "shape", "body_added"} or null
    weights              {role: {"path", "sha256"}} of every checkpoint used; scale_factor: the latent scale
    device, dtype        e.g. "cuda:0 (NVIDIA H100 80GB HBM3)", "torch.float16"
    decode_plan          how the VAE decode was tiled / the memory plan
    attempts             [{"seed", "quality_check", "seconds", "timings": {stage: s}}], one per try, last = this one
    quality_check        the last attempt's {"passed", "failed", "medians"} (CT with a label map) or null
    retries              attempts that failed the quality check before this one
    geometry             (write_outputs) {"shape", "spacing", "origin", "orientation": "RAS", "affine"}
    outputs              (write_outputs) {kind: {"file", "format", "sha256" (files) or "files" (DICOM folder)}}
"""

from __future__ import annotations

import colorsys
import contextlib
import datetime
import errno
import gzip
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from fastmaisi import __version__
from fastmaisi.labels import BODY as BODY_LABEL
from fastmaisi.labels import LABEL_NAMES

RECORD_SCHEMA = "fastmaisi-record/1"
LABELS_SCHEMA = "fastmaisi-labels/1"
CT_HU_RANGE = (-1000, 1000)
MR_RANGE = (0, np.iinfo(np.int16).max)  # nominal [0, 1000]; the upper clip only guards int16 overflow
WINDOWS = {"soft": (-160, 240), "lung": (-1350, 150), "bone": (-450, 1050)}  # HU [low, high] for previews
SYNTHETIC_DESCRIPTION = "SYNTHETIC - fastmaisi"
SYNTHETIC_PATIENT = "SYNTHETIC^FASTMAISI"
_REQUIRED = ("variant", "request", "seed")
_OPTIONAL = ("workflow", "resolved", "mask", "weights", "device", "decode_plan", "attempts", "quality_check", "retries")
_OVERLAY_ALPHA = 0.45


# ---------------------------------------------------------------------------------------------------------------
# intensities and geometry

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
    `x` is a numpy array or a torch tensor (moved to the CPU here).
    """
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise ValueError(f"decoder output has {bad} non-finite values (NaN/inf); refusing to write them as intensities")
    if is_ct(modality):
        v = a * 2000.0
        v -= 1000.0
        lo, hi = CT_HU_RANGE
    else:
        v = a * 1000.0
        lo, hi = MR_RANGE
    np.clip(v, lo, hi, out=v)
    np.rint(v, out=v)
    return v.astype(np.int16)


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


# ---------------------------------------------------------------------------------------------------------------
# atomic writing: temporary names in the final folder, renamed into place together

class _Staging:
    """Files (or folders) written under hidden temporary names beside their final names; `commit` renames them all."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.items: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        final = Path(final)
        if not self.overwrite and (final.exists() or final.is_symlink()):
            raise ValueError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        self.items.append((tmp, final))
        return tmp

    def commit(self) -> None:
        try:
            for tmp, final in self.items:
                if final.exists() and (final.is_dir() or tmp.is_dir()):  # os.replace cannot replace a folder
                    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
                    os.replace(final, old)
                    os.replace(tmp, final)
                    _remove(old)
                else:
                    os.replace(tmp, final)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for tmp, _ in self.items:
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _staged(what: str, overwrite: bool) -> Iterator[_Staging]:
    """Stage writes; on any error remove every temporary file and re-raise (an OSError with a message naming `what`)."""
    staging = _Staging(overwrite)
    try:
        yield staging
    except BaseException as exc:
        staging.discard()
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                reason = "no space left on device (ENOSPC)"
            raise OSError(exc.errno, f"could not write {what}: {reason}; temporary files were removed and no "
                                     "file was left under a final name") from exc
        raise
    staging.commit()


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    """Write bytes through `write(fileobj)` and flush them to disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------
# NIfTI

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


def _write_nifti_to(path: Path, img: Any, compress: bool) -> None:
    def write(f: Any) -> None:
        if compress:  # mtime=0: the same volume gives the same bytes (and hash)
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
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


# ---------------------------------------------------------------------------------------------------------------
# reading label maps (NIfTI, DICOM series folder, DICOM SEG)

def read_label_map(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a label map, reoriented to RAS: (array (X, Y, Z) of uint8, or int32 for ids > 255; spacing; 4x4 affine).

    Accepts a NIfTI file (.nii/.nii.gz), a folder holding one DICOM image series, or a DICOM SEG file
    (segments become their `label N` tracking ids, else their segment numbers). Raises ValueError for anything that
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


# ---------------------------------------------------------------------------------------------------------------
# preview PNG

def label_color(value: int) -> tuple[int, int, int]:
    """Fixed RGB colour of a label id: golden-angle hues, so neighbouring ids differ; 0 black, body skin-coloured."""
    if value == 0:
        return (0, 0, 0)
    if value == BODY_LABEL:
        return (241, 214, 145)
    hue = (value * 0.618033988749895) % 1.0
    sat = (0.85, 0.6, 0.75)[value % 3]
    val = (1.0, 0.8)[(value // 3) % 2]
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))  # type: ignore[return-value]


def _window(image: np.ndarray, modality: str | int, window: str | tuple[float, float] | None) -> tuple[float, float]:
    if window is None:
        if is_ct(modality):
            return WINDOWS["soft"]
        sample = image[::4, ::4, ::4]
        lo, hi = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0)
        return float(lo), float(max(hi, lo + 1))
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {sorted(WINDOWS)} or (low, high), got {window!r}")
        return WINDOWS[window]
    lo, hi = (float(w) for w in window)
    if not hi > lo:
        raise ValueError(f"window must have high > low, got {window!r}")
    return lo, hi


def preview_image(image: Any, label: Any = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  modality: str | int = "ct", window: str | tuple[float, float] | None = None,
                  max_panel: int = 512, min_panel: int = 256) -> Any:
    """PIL RGB image: axial | coronal | sagittal mid-slices (radiological view), labels alpha-blended in colour.

    Display pixels are isotropic, d = max(min(spacing), largest extent / max_panel) mm, so the aspect is right; a
    small volume is enlarged until its largest extent spans `min_panel` pixels (the demo's 64^3 would be thumbnails).
    Axial: anterior up, patient right on the left; coronal: superior up, right on the left; sagittal: superior up,
    anterior on the left. Panels are top-aligned on black, 4 px apart. Body (200) is not tinted.
    """
    img = _volume(image, "image")
    lab = None if label is None else _volume(label, "label")
    if lab is not None and lab.shape != img.shape:
        raise ValueError(f"label map shape {lab.shape} differs from image shape {img.shape}")
    sp = _spacing(spacing)
    lo, hi = _window(img, modality, window)
    extent = max(n * s for n, s in zip(img.shape, sp))
    d = min(max(min(sp), extent / max_panel), extent / min_panel)
    X, Y, Z = (n // 2 for n in img.shape)
    # (slice selector: view of (rows, cols) = (vertical, horizontal), row pixel mm, col pixel mm)
    views = [(lambda v: v[::-1, ::-1, Z].T, sp[1], sp[0]),   # axial
             (lambda v: v[::-1, Y, ::-1].T, sp[2], sp[0]),   # coronal
             (lambda v: v[X, ::-1, ::-1].T, sp[2], sp[1])]   # sagittal
    panels = []
    for view, row_mm, col_mm in views:
        sl = view(img).astype(np.float32)
        size = (max(1, round(sl.shape[1] * col_mm / d)), max(1, round(sl.shape[0] * row_mm / d)))  # PIL: (w, h)
        gray = np.clip((sl - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        gray = np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR), dtype=np.float32)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        if lab is not None:
            ls = np.ascontiguousarray(view(lab)).astype(np.int32)
            ls = np.asarray(Image.fromarray(ls, mode="I").resize(size, Image.NEAREST))
            palette = np.array([label_color(v) for v in range(int(ls.max()) + 1)], np.float32)
            m = (ls != 0) & (ls != BODY_LABEL)
            rgb[m] = (1 - _OVERLAY_ALPHA) * rgb[m] + _OVERLAY_ALPHA * palette[ls[m]]
        panels.append(np.rint(rgb).astype(np.uint8))
    gap = 4
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.zeros((max(p.shape[0] for p in panels), width, 3), np.uint8)
    x = 0
    for p in panels:
        canvas[: p.shape[0], x: x + p.shape[1]] = p
        x += p.shape[1] + gap
    return Image.fromarray(canvas, mode="RGB")


def preview_png(path: str | os.PathLike, image_hu: Any, label: Any = None, spacing: Sequence[float] = (1, 1, 1),
                modality: str | int = "ct", window: str | tuple[float, float] | None = None,
                overwrite: bool = False) -> Path:
    """Write `preview_image(...)` as a PNG, atomically."""
    path = Path(path)
    pic = preview_image(image_hu, label, spacing, modality, window)
    with _staged(str(path), overwrite) as st:
        _write_file(st.path(path), lambda f: pic.save(f, format="PNG"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# record

def _jsonable(obj: Any, where: str = "record") -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where} holds a {type(obj).__name__}, which a JSON record cannot store")


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready copy of `record` with schema, version, time and missing optional keys (null) filled in.

    Raises ValueError when a required key is missing or malformed, or the schema is another major version.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    rec = _jsonable(record)
    schema = rec.setdefault("schema", RECORD_SCHEMA)
    if not (isinstance(schema, str) and re.fullmatch(re.escape(RECORD_SCHEMA) + r"(\.\d+)?", schema)):
        raise ValueError(f"record schema {schema!r} is not {RECORD_SCHEMA!r}")
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"record lacks required keys {missing} (required: {list(_REQUIRED)})")
    if not isinstance(rec["variant"], str):
        raise ValueError(f"record 'variant' must be a string, got {rec['variant']!r}")
    if not isinstance(rec["request"], dict):
        raise ValueError(f"record 'request' must be a dict of the run's inputs, got {rec['request']!r}")
    if not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool):
        raise ValueError(f"record 'seed' must be an int, got {rec['seed']!r}")
    resolved = rec.get("resolved") or {}
    size = resolved.get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 3
                                 and all(isinstance(n, int) and n > 0 for n in size)):
        raise ValueError(f"record resolved.size must be 3 positive ints, got {size!r}")
    if resolved.get("spacing") is not None:
        _spacing(resolved["spacing"])
    head = {"schema": schema, "fastmaisi_version": rec.get("fastmaisi_version", __version__),
            "created_utc": rec.get("created_utc",
                                   datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))}
    rec = {**head, **rec}
    for key in _OPTIONAL:
        rec.setdefault(key, None)
    return rec


def _dumps(obj: Any, indent: str = "") -> str:
    """JSON with one key per line but lists of plain values on one line (affines, sizes stay readable)."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) and v for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + f"\n{indent}]"
    return json.dumps(obj, allow_nan=False)


def _record_bytes(record: Mapping[str, Any]) -> bytes:
    return (_dumps(validate_record(record)) + "\n").encode()


def write_record(path: str | os.PathLike, record: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Validate (see `validate_record`) and write the record as JSON, atomically."""
    path = Path(path)
    data = _record_bytes(record)
    with _staged(str(path), overwrite) as st:
        _write_file(st.path(path), lambda f: f.write(data))
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a record written by `write_record` (for `fastmaisi generate --from-record`)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a JSON record: {exc}") from exc
    if not isinstance(record, dict) or "schema" not in record:
        raise ValueError(f"{str(path)!r} is not a fastmaisi record (no 'schema' key)")
    return validate_record(record)


# ---------------------------------------------------------------------------------------------------------------
# output sets

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


def label_table(label: np.ndarray, spacing: Sequence[float],
                label_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The `STEM_labels.json` content: every label id present (but 0) with name, colour, voxels and volume (mL)."""
    counts = np.bincount(label.ravel())
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
                  window: str | tuple[float, float] | None = None) -> dict[str, Path]:
    """Write one output set (image, label map or None, label table, preview, record) atomically; return its paths.

    `image_hu` is int16-compatible (see `hu_from_unit`), `label` uint8-compatible or None (image-only generation);
    `modality` ("ct", "mr", or a MAISI id) picks the preview window and the DICOM IOD; `label_names` default to the
    MAISI vocabulary (`fastmaisi.labels.LABEL_NAMES`).
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
    affine = ras_affine(spacing, origin)
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
    # 2. write everything under temporary names, then rename into place (record last)
    from fastmaisi.weights import sha256_file  # (imports torch)

    outputs: dict[str, Any] = {}
    with _staged(f"outputs {stem!r} in {str(out)!r}", overwrite=True) as st:  # existing files checked above
        if fmt == "nifti":
            for kind, data in (("image", image), ("label", lab)):
                if data is not None:
                    tmp = st.path(paths[kind])
                    _write_nifti_to(tmp, _nifti_image(data, affine, kind), compress=True)
                    outputs[kind] = {"file": paths[kind].name, "format": "nifti", "dtype": str(data.dtype),
                                     "sha256": sha256_file(tmp)}
        else:
            datasets = _write_dicom_series(st.path(paths["image"]), image, affine, modality, rec)
            outputs["image"] = {"file": paths["image"].name, "format": "dicom", "files": len(datasets)}
            if lab is not None:
                tmp = st.path(paths["label"])
                _write_dicom_seg(tmp, datasets, lab, label_names)
                outputs["label"] = {"file": paths["label"].name, "format": "dicom-seg", "sha256": sha256_file(tmp)}
        if lab is not None:
            table = (_dumps(label_table(lab, spacing, label_names)) + "\n").encode()
            _write_file(st.path(paths["labels"]), lambda f: f.write(table))
            outputs["labels"] = {"file": paths["labels"].name, "format": "json"}
        if preview:
            pic = preview_image(image, lab, spacing, modality, window)
            tmp = st.path(paths["preview"])
            _write_file(tmp, lambda f: pic.save(f, format="PNG"))
            outputs["preview"] = {"file": paths["preview"].name, "format": "png"}
        rec["geometry"] = {"shape": list(image.shape), "spacing": list(_spacing(spacing)),
                           "origin": affine[:3, 3].tolist(), "orientation": "RAS", "affine": affine.tolist()}
        rec["outputs"] = outputs
        data = _record_bytes(rec)
        _write_file(st.path(paths["record"]), lambda f: f.write(data))
    if overwrite:  # leftovers of an earlier run in the other format would contradict the record
        for p in _existing(out, stem):
            if p not in paths.values():
                _remove(p)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# DICOM (optional: pip install "fastmaisi[dicom]")

def _require_dicom(highdicom: bool = False) -> Any:
    try:
        import pydicom

        if highdicom:
            import highdicom as hd

            return hd
        return pydicom
    except ImportError as exc:
        raise ImportError(f'DICOM support needs pydicom and highdicom ({exc}); pip install "fastmaisi[dicom]"') from exc


def _lps(ras: np.ndarray) -> list[float]:
    return [float(-ras[0]), float(-ras[1]), float(ras[2])]


def _ds(values: Any) -> Any:
    from pydicom.valuerep import DSfloat

    return [DSfloat(float(v), auto_format=True) for v in values]


def _dicom_series(image: np.ndarray, affine: np.ndarray, modality: str | int, record: Mapping[str, Any]) -> list[Any]:
    """One pydicom Dataset per axial slice (z index order), pixel rows/cols = RAS volume flipped in y/x, transposed."""
    pydicom = _require_dicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = is_ct(modality)
    sop_class = pydicom.uid.CTImageStorage if ct else pydicom.uid.MRImageStorage
    nx, ny, nz = image.shape
    sx, sy, sz = np.linalg.norm(affine[:3, :3], axis=0)
    now = datetime.datetime.now()
    date, time_ = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    lo, hi = _window(image, modality, None)
    comment = (f"SYNTHETIC IMAGE generated by fastmaisi {__version__} ({record.get('variant')}, seed "
               f"{record.get('seed')}); not a patient; not for clinical use")
    datasets = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        # patient / study / series: clearly synthetic
        ds.PatientName, ds.PatientID = SYNTHETIC_PATIENT, "SYNTHETIC"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.PatientIdentityRemoved = "YES"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, date, time_, "SYNTHETIC"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.StudyDescription = ds.SeriesDescription = SYNTHETIC_DESCRIPTION
        ds.Modality = "CT" if ct else "MR"
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
        ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = date, time_, date, time_
        ds.Manufacturer, ds.ManufacturerModelName = "fastmaisi", str(record.get("variant") or "fastmaisi")
        ds.SoftwareVersions = __version__
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        # image: derived, synthetic, no burned-in text
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        ds.DerivationDescription = ds.ImageComments = comment[:1024]
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = _ds(_lps(affine @ np.array([nx - 1, ny - 1, k, 1.0])))
        ds.SliceLocation = _ds([(affine @ np.array([0, 0, k, 1.0]))[2]])[0]
        ds.PixelSpacing = _ds([sy, sx])
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds([sz])[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = _ds([(lo + hi) / 2, hi - lo])
        if ct:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.KVP, ds.AcquisitionNumber = "", ""
        else:  # MR Image module type 1/2 attributes, honestly empty
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.EchoTrainLength = "3D", "", ""
            ds.RepetitionTime = ""
        ds.PixelData = np.ascontiguousarray(image[::-1, ::-1, k].T, dtype="<i2").tobytes()
        datasets.append(ds)
    return datasets


def _write_dicom_series(folder: Path, image: np.ndarray, affine: np.ndarray, modality: str | int,
                        record: Mapping[str, Any]) -> list[Any]:
    datasets = _dicom_series(image, affine, modality, record)
    folder.mkdir()
    width = max(5, len(str(len(datasets))))
    for k, ds in enumerate(datasets):
        _write_file(folder / f"IM_{k + 1:0{width}d}.dcm", lambda f, ds=ds: ds.save_as(f, enforce_file_format=True))
    return datasets


def _write_dicom_seg(path: Path, datasets: list[Any], label: np.ndarray,
                     label_names: Mapping[int, str] | None) -> None:
    """A binary DICOM SEG over the series: segment n <-> n-th label id present, tracking id 'label <id>'."""
    hd = _require_dicom(highdicom=True)
    from pydicom.sr.codedict import codes

    values = [int(v) for v in np.flatnonzero(np.bincount(label.ravel())) if v != 0]
    names = LABEL_NAMES if label_names is None else label_names
    algorithm = hd.AlgorithmIdentificationSequence(name="fastmaisi", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=names.get(v, f"label_{v}")[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure, algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=f"label {v}",
        display_color=hd.color.CIELabColor.from_rgb(*label_color(v)))
        for n, v in enumerate(values, start=1)]
    lut = np.zeros(256, np.uint8)  # label id -> segment number
    lut[values] = np.arange(1, len(values) + 1)
    frames = np.ascontiguousarray(lut[label[::-1, ::-1, :].transpose(2, 1, 0)])  # (slices, rows, cols) as the series
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="fastmaisi", manufacturer_model_name="fastmaisi",
        software_versions=__version__, device_serial_number="0", series_description=f"{SYNTHETIC_DESCRIPTION} labels")
    _write_file(path, lambda f: seg.save_as(f))


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (cols, rows, slices) with rescale applied, RAS affine) from a folder holding one DICOM image series."""
    pydicom = _require_dicom()
    slices = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(p)
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"{str(folder)!r} holds no DICOM image slices with position and orientation")
    series = {ds.SeriesInstanceUID for ds in slices}
    if len(series) > 1:
        raise ValueError(f"{str(folder)!r} holds {len(series)} DICOM series; point at a folder with one")
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))))
    pos = np.array([ds.ImagePositionPatient for ds in slices], dtype=np.float64)
    if len(slices) > 1:
        gaps = np.diff(pos @ normal)
        if np.any(gaps < 1e-4) or np.ptp(gaps) > 1e-3 * max(1.0, abs(gaps.mean())):
            raise ValueError(f"{str(folder)!r}: slices are duplicated or unevenly spaced "
                             f"(gaps {np.unique(gaps.round(4))} mm)")
        step = (pos[-1] - pos[0]) / (len(slices) - 1)
    else:
        step = normal * float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    planes = []
    for ds in slices:
        px = ds.pixel_array
        slope, inter = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append(px if (slope, inter) == (1.0, 0.0) else px * slope + inter)
    array = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, step, pos[0]
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_dicom_seg(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(label array, RAS affine) from a DICOM SEG; segment numbers map to the ids in 'label <id>' tracking ids."""
    pydicom = _require_dicom()
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r}: not NIfTI (.nii/.nii.gz), a DICOM folder or DICOM SEG ({exc})") \
            from exc
    if getattr(ds, "Modality", None) != "SEG":
        raise ValueError(f"{str(path)!r} is a single DICOM file but not a SEG; pass the folder of the series")
    hd = _require_dicom(highdicom=True)
    seg = hd.seg.Segmentation.from_dataset(ds)
    numbers = list(seg.segment_numbers)
    ids = {}
    for n in numbers:
        m = re.fullmatch(r"label (\d+)", str(seg.get_segment_description(n).tracking_id or ""))
        ids[n] = int(m.group(1)) if m else n
    vol = seg.get_volume(combine_segments=True, dtype=np.int32)
    lut = np.zeros(max(numbers) + 1, np.int32)
    for n, v in ids.items():
        lut[n] = v
    img = vol.with_array(lut[vol.array]).to_nibabel()
    return np.asanyarray(img.dataobj), img.affine
