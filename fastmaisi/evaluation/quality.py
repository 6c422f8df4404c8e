"""The per-organ median-HU quality check (pipeline.md §2.8) over a folder of generated image/label pairs.

Pairs are `<stem>_image.nii[.gz]` + `<stem>_label.nii[.gz]`, the names `fastmaisi generate` writes. The check itself
is `fastmaisi.labels.quality_check`, the same gate the generator applies before saving. Both files are read in
RAS (labels with `fastmaisi.io.read_label_map`, which refuses maps that are not whole non-negative numbers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from fastmaisi.evaluation.volumes import read_ras

IMAGE_SUFFIXES = ("_image.nii.gz", "_image.nii", "_image_dicom")
LABEL_SUFFIXES = ("_label.nii.gz", "_label.nii", "_label_seg.dcm")


def find_pairs(folder: str | os.PathLike) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """([(stem, image, label)] sorted by stem, [image files without a label]) in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    pairs, unpaired = [], []
    for image in sorted(folder.iterdir()):
        suffix = next((s for s in IMAGE_SUFFIXES if image.name.endswith(s)), None)
        if suffix is None or image.name.startswith(".") or image.is_dir() != (suffix == "_image_dicom"):
            continue
        stem = image.name[: -len(suffix)]
        label = next((folder / f"{stem}{ext}" for ext in LABEL_SUFFIXES if (folder / f"{stem}{ext}").is_file()), None)
        if label is None:
            unpaired.append(image.name)
        else:
            pairs.append((stem, image, label))
    if not pairs:
        raise ValueError(f"no <stem>_image.nii[.gz] + <stem>_label.nii[.gz] (or <stem>_image_dicom/ + "
                         f"<stem>_label_seg.dcm) pairs in {folder}")
    return pairs, unpaired


def quality_report(folder: str | os.PathLike, check: Callable | None = None) -> dict:
    """Run the quality check on every pair in `folder`.

    Args:
        check: `(image_hu, label) -> result with .passed, .failed, .medians`; `fastmaisi.labels.quality_check` by
            default.

    Returns:
        {"volumes": [{"stem", "passed", "failed", "medians"}], "unpaired": [...], "passed": int, "total": int,
        "pass_rate": float}. A median is None when the organ is absent (an absent organ passes).
    """
    from fastmaisi.io import read_label_map

    if check is None:
        from fastmaisi.labels import quality_check as check
    pairs, unpaired = find_pairs(folder)
    rows = []
    for stem, image_path, label_path in pairs:
        image, _ = read_ras(image_path)
        label, _, _ = read_label_map(label_path)
        if image.shape != label.shape:
            raise ValueError(f"{stem}: image shape {image.shape} differs from label shape {label.shape}")
        result = check(image, label)
        medians = {str(k): (None if v is None or not np.isfinite(v) else float(v)) for k, v in result.medians.items()}
        rows.append({"stem": stem, "passed": bool(result.passed), "failed": [str(f) for f in result.failed],
                     "medians": medians})
    passed = sum(r["passed"] for r in rows)
    return {"volumes": rows, "unpaired": unpaired, "passed": passed, "total": len(rows),
            "pass_rate": passed / len(rows)}


def format_report(report: dict) -> str:
    """A fixed-width table: one row per volume (median HU per organ, '-' when absent), then the pass rate."""
    organs = list(dict.fromkeys(o for r in report["volumes"] for o in r["medians"]))
    width = max([len("volume")] + [len(r["stem"]) for r in report["volumes"]])
    lines = [f"{'volume':<{width}}  {'check':<5}" + "".join(f"  {o:>9}" for o in organs) + "  failed"]
    for r in report["volumes"]:
        cells = "".join(f"  {'-' if r['medians'].get(o) is None else format(r['medians'][o], '.1f'):>9}"
                        for o in organs)
        lines.append(f"{r['stem']:<{width}}  {'pass' if r['passed'] else 'FAIL':<5}{cells}  "
                     + (", ".join(r["failed"]) or "-"))
    lines.append(f"passed {report['passed']}/{report['total']} ({100 * report['pass_rate']:.1f}%)")
    if report["unpaired"]:
        lines.append(f"skipped (no label file): {', '.join(report['unpaired'])}")
    return "\n".join(lines)
