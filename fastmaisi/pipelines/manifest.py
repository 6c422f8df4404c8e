"""`generate --manifest FILE`: one sample per row (CSV with a header, or JSON Lines), read into request fields.

Columns are GenerateRequest field names (any field, so fields added to the request work in manifests too) plus
the aliases below and `name` (the output name; default sample_<seed>). Empty cells / missing keys take the command
line's value. Relative `mask` / `mask_db` paths are relative to the manifest's folder. Fields that fix the networks
or the run (variant, weights, device, output folder, ...) are per run and refused in a row.

CSV values: numbers as text; sizes and spacings as "256 256 128" (or "256x256x128", or a JSON list); dicts (organ
sizes, demographics) as a JSON object or "liver=0.5 spleen=0.2" (";" or spaces between pairs, "_" in a name is a space,
as on the command line). JSON Lines: one object per line with native JSON values.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALIASES = {"guidance": "guidance_scale", "workflow": "workflow_name", "organ_size": "organ_sizes",
           "format": "fmt", "mask_guidance": "mask_guidance_scale"}
PER_RUN = {"output_dir", "variant", "weights", "network_config", "num_samples", "device", "memory_budget_gb",
           "overwrite", "fmt", "cuda_graphs", "decode_devices", "force"}
PATH_FIELDS = {"mask", "mask_db"}
NAME_COLUMN = "name"


@dataclass
class ManifestRow:
    """One row: its line in the file, the request fields it sets, and its output name (None: sample_<seed>)."""

    line: int
    values: dict
    name: str | None = None
    error: str | None = None  # why the row cannot be read (reported with the rows that fail validation)


def read_manifest(path: str | Path, request_type: type) -> list[ManifestRow]:
    """Parse and type-check every row against `request_type`'s fields; a bad row carries its `error` (so that all bad
    rows are reported together, with those the request's validation refuses). Raises ValueError for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--manifest {path}: no such file")
    try:
        raw_rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"--manifest {path}: not a CSV / JSON Lines text file ({exc})") from None
    if not raw_rows:
        raise ValueError(f"--manifest {path}: no rows")
    hints = typing.get_type_hints(request_type)
    fields = {f.name for f in dataclasses.fields(request_type)}
    rows = []
    for line, raw in raw_rows:
        if isinstance(raw, str):  # a line that is not a row
            rows.append(ManifestRow(line, {}, error=raw))
            continue
        try:
            rows.append(_row(line, raw, fields, hints, path.parent))
        except ValueError as exc:
            rows.append(ManifestRow(line, {}, error=str(exc)))
    return rows


def bad_rows_message(path: Path, errors: list[str]) -> str:
    shown = "; ".join(errors[:8]) + (f"; and {len(errors) - 8} more" if len(errors) > 8 else "")
    return f"--manifest {path}: {len(errors)} bad row(s), nothing was generated: {shown}"


def _csv_rows(path: Path) -> list[tuple[int, Any]]:
    with open(path, newline="", encoding="utf-8") as f:  # "#" lines are comments (kept as empty lines: numbering)
        reader = csv.reader("\n" if line.lstrip().startswith("#") else line for line in f)
        header, rows = None, []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            line = reader.line_num  # the file's line (the last one of a record with a quoted line break)
            if len(cells) > len(header):
                rows.append((line, f"{len(cells)} cells, more than the header's {len(header)} columns"))
                continue
            rows.append((line, {k: v for k, v in zip(header, cells) if k and v.strip() != ""}))
        return rows


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            rows.append((line, f"not JSON ({exc.msg})"))
            continue
        rows.append((line, obj if isinstance(obj, dict) else f"not a JSON object: {text.strip()[:40]}"))
    return rows


def _row(line: int, raw: dict, fields: set, hints: dict, base: Path) -> ManifestRow:
    values, name = {}, None
    for key, value in raw.items():
        if value is None:
            continue
        if key == NAME_COLUMN:
            name = str(value).strip()
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
                raise ValueError(f"name {name!r}: use letters, digits and _ . + - (no '/', no leading '.')")
            continue
        field = ALIASES.get(key, key)
        if field not in fields:
            raise ValueError(f"unknown column {key!r}")
        if field in PER_RUN:
            raise ValueError(f"column {key!r} is set per run (command line), not per sample")
        try:
            values[field] = _coerce(value, hints[field], field)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{key} {value!r}: {exc}") from None
        if field in PATH_FIELDS and isinstance(values[field], str) and not Path(values[field]).is_absolute():
            values[field] = str(base / values[field])
    return ManifestRow(line=line, values=values, name=name)


def _coerce(value: Any, hint: Any, field: str) -> Any:
    """`value` (text from a CSV cell, or a JSON value) as type `hint` (int, float, str, bool, tuple[...], dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        errors = []
        # numbers first ("5" is an int where an int is allowed), then text, then lists ("a.nii.gz" is one path
        # where a path or a list of paths is allowed; a JSON list still becomes a list)
        containers = (list, tuple, dict)
        for option in sorted(options, key=lambda a: (a is dict or typing.get_origin(a) in containers, a is str)):
            try:
                return _coerce(value, option, field)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else "expected " + " or ".join(map(_name, options)))
    if origin is tuple:
        items = _list(value)
        if args and args[-1] is not Ellipsis and len(items) != len(args):
            raise ValueError(f"expected {len(args)} values")
        kinds = [args[0]] * len(items) if args and args[-1] is Ellipsis else list(args) or [str] * len(items)
        return tuple(_coerce(v, k, field) for v, k in zip(items, kinds))
    if origin is list:
        return [_coerce(v, args[0] if args else str, field) for v in _list(value)]
    if hint is dict or origin is dict:
        return _dict(value, field)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "y"):
            return True
        if text in ("0", "false", "no", "n"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError("expected text")
        return str(value).strip()
    return value  # a type this reader does not know: passed through, checked by the request's own validation


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        parsed = json.loads(text)
        if isinstance(parsed, list):
            return parsed
    return [v for v in re.split(r"[\sx,;]+", text) if v]


def _dict(value: Any, field: str) -> dict:
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.startswith("{"):
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            return parsed
    out = {}
    for pair in (p for p in re.split(r"[;\s]+", text) if p):
        key, sep, val = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r}: expected NAME=VALUE pairs or a JSON object")
        key = key.strip().replace("_", " ") if field == "organ_sizes" else key.strip()  # as --organ-size does
        try:
            out[key] = float(val)
        except ValueError:
            out[key] = val.strip()
    return out
