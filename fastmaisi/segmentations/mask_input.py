"""`generate --mask`: a user's segmentation -> the MAISI label map on the requested grid, plus where it lies in the
world (so outputs keep the mask's origin and direction) and the record of the conversion."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from fastmaisi.segmentations.convert import convert_segmentation
from fastmaisi.segmentations.geometry import output_affine, to_ras


def sha256_input(path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, sorted by name)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_mask(paths, vocabulary, size, spacing, strict: bool = False):
    """(label (size) in RAS index order, mask record, world affine of the outputs in the mask's orientation).

    Raises ValueError (one line) for every refusal of `convert_segmentation`."""
    from fastmaisi.pipelines.common import resample_label

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    shown = " ".join(map(str, paths))
    label, affine, report = convert_segmentation(paths, vocabulary, strict_body=strict,
                                                 option="--mask-vocabulary")
    for inp in report["inputs"]:
        print(f"--mask {inp['path']}: {inp['kind']}, vocabulary {inp['vocabulary']} ({inp['reason']})",
              file=sys.stderr)
    if report["body"]["added"] and report["body"]["method"].startswith("envelope"):
        warnings.warn(f"--mask {shown} has no body label (200): adding it with the documented envelope rule"
                      + (f" (structures without a MAISI id become body: {', '.join(report['unmapped'][:8])}"
                         f"{' ...' if len(report['unmapped']) > 8 else ''})" if report["unmapped"] else ""),
                      stacklevel=2)
    ras, ras_aff, note = to_ras(label, affine)
    if note:
        print(f"--mask {shown}: {note}", file=sys.stderr)
    ras_spacing = tuple(float(s) for s in np.diag(ras_aff)[:3])
    resampled = resample_label(ras, ras_spacing, size, spacing)
    out_affine = output_affine(ras_aff, ras.shape, size, spacing, affine)
    import nibabel as nib

    info = {"path": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths],
            "sha256": sha256_input(paths[0]) if len(paths) == 1 else [sha256_input(p) for p in paths],
            "spacing": list(ras_spacing), "shape": list(label.shape), "body_added": bool(report["body"]["added"]),
            "vocabulary": [i["vocabulary"] for i in report["inputs"]] if len(paths) > 1
            else report["inputs"][0]["vocabulary"],
            "conversion": report,
            "geometry": {"affine": affine.tolist(), "orientation": "".join(nib.aff2axcodes(affine)),
                         "note": note}}
    return resampled, info, out_affine
