"""The JSON provenance record: validation, stable formatting, reading and writing (schema in `fastmaisi.io`)."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastmaisi import __version__
from fastmaisi.io.atomic import _staged, _write_file
from fastmaisi.io.volumes import _spacing

RECORD_SCHEMA = "fastmaisi-record/1"
_REQUIRED = ("variant", "request", "seed")
_OPTIONAL = ("workflow", "resolved", "mask", "weights", "device", "decode_plan", "attempts", "quality_check", "retries")


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
