"""`fastmaisi labels`: convert a segmentation to MAISI ids (`convert`), print a vocabulary (`list`). Exit 2, one line,
nothing written on bad input."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fastmaisi.argtypes import OneLineParser
from fastmaisi.vocabularies import NAMES


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastmaisi labels", description=(
        "Label maps of other tools in MAISI ids. convert: a TotalSegmentator / NV-Segment / VISTA3D / MAISI "
        "segmentation (multilabel NIfTI, per-class folder, DICOM SEG, DICOM folder; several are merged) -> a MAISI "
        "label map on the same grid and affine. list: a vocabulary's ids and their MAISI ids."))
    sub = p.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    c = sub.add_parser("convert", help="convert a segmentation to MAISI ids")
    c.add_argument("-i", "--input", action="append", required=True, metavar="SEG",
                   help="segmentation file or folder (repeat to merge: a later input wins where it labels a voxel)")
    c.add_argument("-o", "--output", required=True, help="MAISI label map to write (.nii.gz)")
    c.add_argument("--vocabulary", default="auto", help=f"auto (default) or, per input in order (comma-separated) "
                   f"or for all: {', '.join(NAMES)}")
    c.add_argument("--no-body", action="store_true", help="do not add body 200 when the input has none")
    c.add_argument("--report", help="also write the conversion report (JSON) to this file")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ls = sub.add_parser("list", help="print a vocabulary (default: all their names)")
    ls.add_argument("--vocabulary", choices=NAMES)
    return p


def labels_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        if args.action == "list":
            _list(args.vocabulary)
        else:
            _convert(args)
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as exc:
        print(f"fastmaisi labels: {exc}", file=sys.stderr)
        return 2
    return 0


def _list(name: str | None) -> None:
    from fastmaisi.vocabularies import describe, get_vocabulary

    if name:
        print(describe(name))
        return
    for n in NAMES:
        v = get_vocabulary(n)
        print(f"{n:<14} {v.title} ({len(v.classes)} ids)")


def _convert(args) -> None:
    from fastmaisi.io.atomic import _staged, _write_file
    from fastmaisi.io.nifti import _nifti_suffix, _write_nifti_to
    from fastmaisi.segmentations.convert import convert_segmentation, report_lines

    out = Path(args.output)
    compress = _nifti_suffix(out)
    for path in (out, *([Path(args.report)] if args.report else [])):
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise ValueError(f"folder {str(path.parent)!r} does not exist")
    vocab = args.vocabulary.split(",") if "," in args.vocabulary else args.vocabulary
    label, affine, report = convert_segmentation(args.input, vocab, add_body=not args.no_body)
    img = _label_image(label, affine)
    with _staged(str(out), args.overwrite) as st:
        _write_nifti_to(st.path(out), img, compress)
        if args.report:
            text = (json.dumps(report, indent=1) + "\n").encode()
            _write_file(st.path(Path(args.report)), lambda f: f.write(text))
    print("\n".join(report_lines(report)))
    print(f"wrote {out}")


def _label_image(label, affine):
    """uint8 label NIfTI on the input's grid: the input's affine in both qform and sform (code 1, scanner)."""
    import nibabel as nib

    img = nib.Nifti1Image(label, affine)
    img.header.set_data_dtype("uint8")
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"MAISI label ids - fastmaisi labels convert"
    img.header.set_intent("label")
    return img
