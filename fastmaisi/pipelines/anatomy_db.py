"""Organ sizes the user did not set, filled as NVIDIA's pipeline does: from the closest entry of its database
`all_anatomy_size_conditions.json` (downloaded with the weights into `datasets/`), else left at -1."""

from __future__ import annotations

import json
from pathlib import Path

DB_NAME = "all_anatomy_size_conditions.json"


def find_anatomy_size_db(explicit: str | None, weights_dir: str | Path | None) -> Path | None:
    """`explicit` (--anatomy-size-db; must exist), else DB_NAME in the weights folder, its `datasets/` or a sibling
    `datasets/` folder (NVIDIA's download layout: models/ and datasets/ side by side); None if none is there."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"--anatomy-size-db {explicit}: no such file (NVIDIA's datasets/{DB_NAME})")
        return path
    if weights_dir is None:
        return None
    root = Path(weights_dir)
    for path in (root / DB_NAME, root / "datasets" / DB_NAME, root.parent / "datasets" / DB_NAME):
        if path.is_file():
            return path
    return None


def read_anatomy_size_db(path: Path) -> list[list[float]]:
    """The `organ_size` vectors of the database (a JSON list of {"organ_size": [10 numbers], ...})."""
    try:
        entries = json.loads(Path(path).read_text())
        table = [[float(v) for v in e["organ_size"]] for e in entries]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"anatomy-size database {path}: not a JSON list of {{\"organ_size\": [10 numbers]}} "
                         f"entries ({type(e).__name__})") from None
    if not table or any(len(row) != 10 for row in table):
        raise ValueError(f"anatomy-size database {path}: expected a non-empty list of 10-number organ_size vectors")
    return table


def complete_anatomy_sizes(organ_sizes, db_path: Path | None) -> tuple[list[float], dict | None]:
    """The 10-d anatomy-size vector: with the database, its entry closest (L1 over the slots the user set, first on
    ties) with the user's values on top; without it, -1 in the slots not set. Also what to record about it."""
    from fastmaisi.labels import anatomy_size_vector, snap_anatomy_size
    from fastmaisi.weights import sha256_file

    if db_path is None:
        return anatomy_size_vector(organ_sizes), None
    table = read_anatomy_size_db(db_path)
    vector = snap_anatomy_size(organ_sizes, table)
    return vector, {"path": str(db_path), "sha256": sha256_file(db_path), "entries": len(table)}
