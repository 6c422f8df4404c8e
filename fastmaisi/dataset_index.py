"""`fastmaisi index DIR`: index.csv, one row per complete sample of a generated dataset (its files, seed, inputs and
quality check), from the samples' records. Also written at the end of every `generate` run."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from fastmaisi.io.atomic import _staged, _write_file
from fastmaisi.io.locks import locked
from fastmaisi.argtypes import OneLineParser

INDEX_FILE = "index.csv"
INDEX_LOCK_FILE = ".fastmaisi-index.lock"
COLUMNS = ["name", "image", "label", "labels", "preview", "record", "seed", "retries", "quality_check", "failed_organs",
           "workflow", "variant", "size", "spacing", "modality_code", "steps", "guidance_scale", "organ_sizes", "mask",
           "mask_sha256", "manifest_line", "shard", "job_fingerprint", "sample_fingerprint"]


def _complete(folder: Path, record: dict, verify: bool) -> bool:
    """Every output the record names is there (with its recorded size; with `verify` its SHA-256 too)."""
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or "image" not in outputs:
        return False
    for entry in outputs.values():
        path = folder / entry["file"]
        if path.is_dir():
            continue
        if not path.is_file() or ("bytes" in entry and path.stat().st_size != entry["bytes"]):
            return False
        if verify and "sha256" in entry:
            from fastmaisi.weights import sha256_file

            if sha256_file(path) != entry["sha256"]:
                return False
    return True


def _row(record_path: Path, record: dict) -> dict:
    outputs, resolved = record.get("outputs") or {}, record.get("resolved") or {}
    request, qc = record.get("request") or {}, record.get("quality_check")
    sample, fp, mask = record.get("sample") or {}, record.get("fingerprint") or {}, record.get("mask") or {}
    join = lambda v: " ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)  # noqa: E731
    return {"name": sample.get("name", record_path.name[: -len("_record.json")]),
            **{kind: (outputs.get(kind) or {}).get("file", "") for kind in ("image", "label", "labels", "preview")},
            "record": record_path.name, "seed": record.get("seed"), "retries": record.get("retries"),
            "quality_check": "not run" if qc is None else ("passed" if qc.get("passed") else "failed"),
            "failed_organs": " ".join(qc.get("failed", [])) if qc else "",
            "workflow": record.get("workflow"), "variant": record.get("variant"),
            "size": join(resolved.get("size")), "spacing": join(resolved.get("spacing")),
            "modality_code": resolved.get("modality_code"), "steps": resolved.get("steps"),
            "guidance_scale": resolved.get("guidance_scale"),
            "organ_sizes": json.dumps(request.get("organ_sizes")) if request.get("organ_sizes") else "",
            "mask": mask.get("path", ""), "mask_sha256": mask.get("sha256", ""),
            "manifest_line": sample.get("manifest_line") or "", "shard": sample.get("shard", ""),
            "job_fingerprint": fp.get("job", ""), "sample_fingerprint": fp.get("sample", "")}


def index_rows(folder: str | Path, verify: bool = False) -> tuple[list[dict], list[str]]:
    """(rows of the complete samples, names of records whose files are missing or damaged), sorted by name."""
    folder = Path(folder)
    rows, incomplete = [], []
    for path in sorted(folder.glob("*_record.json")):
        try:
            record = json.loads(path.read_text())
            ok = isinstance(record, dict) and _complete(folder, record, verify)
        except (ValueError, KeyError, TypeError, OSError):
            ok = False
        if ok:
            rows.append(_row(path, record))
        else:
            incomplete.append(path.name)
    return rows, incomplete


def write_index(folder: str | Path, verify: bool = False) -> tuple[Path, list[dict], list[str]]:
    """Write FOLDER/index.csv atomically (under the folder's index lock); returns (path, rows, incomplete)."""
    folder = Path(folder)
    with locked(folder / INDEX_LOCK_FILE):  # processes of one job take turns; the last to finish lists all
        rows, incomplete = index_rows(folder, verify)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
        path = folder / INDEX_FILE
        with _staged(str(path), overwrite=True) as st:
            _write_file(st.path(path), lambda f: f.write(data))
    return path, rows, incomplete


def index_main(argv: list[str]) -> int:
    p = OneLineParser(prog="fastmaisi index", description="Write DIR/index.csv: one row per complete "
                                "sample of a generated dataset (files, seed, inputs, quality check).")
    p.add_argument("folder", help="a generate output folder")
    p.add_argument("--verify", action="store_true", help="also check every file's SHA-256 against its record")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"fastmaisi index: {args.folder}: not a folder", file=sys.stderr)
        return 2
    try:
        path, rows, incomplete = write_index(folder, args.verify)
    except OSError as exc:
        print(f"fastmaisi index: {exc}", file=sys.stderr)
        return 2
    failed = sum(r["quality_check"] == "failed" for r in rows)
    print(f"wrote {path}: {len(rows)} complete samples ({failed} failed the quality check)"
          + (f"; {len(incomplete)} incomplete (not listed): {', '.join(incomplete[:5])}" if incomplete else ""))
    return 0
