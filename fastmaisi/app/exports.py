"""Other formats of a finished job's outputs, written on request next to them."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

_LOCK = threading.Lock()


def dicom_zip(folder: Path, result: dict, modality: str) -> Path:
    """The job's image as a DICOM CT/MR series plus its label map as DICOM SEG, zipped (written once, then reused).
    Uses the same writer as `fastmaisi generate --format dicom`; needs `pip install "fastmaisi[dicom]"`."""
    import nibabel as nib
    import numpy as np

    from fastmaisi import io

    paths = {k: Path(v) for k, v in result["paths"].items()}
    stem = paths["record"].name.removesuffix("_record.json")
    target = folder / f"{stem}_dicom.zip"
    with _LOCK:
        if target.is_file():
            return target
        io._require_dicom(highdicom=True)  # ImportError with the install hint when missing
        image = nib.load(paths["image"])
        label = np.asarray(nib.load(paths["label"]).dataobj) if "label" in paths else None
        spacing = [float(s) for s in image.header.get_zooms()[:3]]
        work = folder / ".dicom"
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.mkdir()
            io.write_outputs(work, stem, np.asarray(image.dataobj), label, spacing, io.read_record(paths["record"]),
                             fmt="dicom", modality=modality, preview=False, origin=image.affine[:3, 3])
            staged = shutil.make_archive(str(folder / f".{stem}_dicom"), "zip", root_dir=work)
            Path(staged).replace(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target
