"""Label vocabularies of the segmentation tools people use, each mapped to MAISI ids by anatomical name (torch-free).

The data lives in `fastmaisi/data/vocabularies/NAME.json`: `classes` {id: [name, MAISI id or null]}, optional
`refused` {id: reason} (ids that cannot be mapped honestly, e.g. VISTA3D's "kidney" superclass), `aliases`
{class name: MAISI id or null} (other names a tool writes for the same structure) and `notes` {id: remark}.
Ids are the ones the tool writes, never the dataset-order tables some model cards publish (see docs/own-segmentation.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

NAMES: tuple[str, ...] = ("maisi", "total", "total_v3", "total_mr", "body", "liver_vessels", "lung_vessels",
                          "lung_nodules", "liver_lesions", "nv_segment_ct", "vista3d")
"""Every vocabulary `--vocabulary` accepts (besides "auto")."""
TOTALSEGMENTATOR_TASKS: tuple[str, ...] = tuple(n for n in NAMES if n not in ("maisi", "nv_segment_ct", "vista3d"))


@dataclass(frozen=True)
class Vocabulary:
    """One tool's label ids: id -> class name, id -> MAISI id (None: no MAISI equivalent), refused ids with reasons."""

    name: str
    title: str
    kind: str  # "maisi", "maisi-like" (NV-Segment, VISTA3D) or "totalsegmentator"
    classes: dict[int, str]
    to_maisi: dict[int, int | None]
    refused: dict[int, str] = field(default_factory=dict)
    aliases: dict[str, int | None] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(self.classes)

    def lookup_table(self) -> list[int]:
        """256-entry list: input id -> MAISI id (0 for background, unmapped and unknown ids)."""
        lut = [0] * 256
        for i, m in self.to_maisi.items():
            if 0 <= i < 256 and m is not None:
                lut[i] = m
        return lut


@lru_cache(maxsize=None)
def get_vocabulary(name: str) -> Vocabulary:
    """The vocabulary called `name` (one of NAMES); ValueError listing them otherwise."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in NAMES:
        raise ValueError(f"unknown vocabulary {name!r}; choose auto or one of: {', '.join(NAMES)}")
    doc = json.loads(resources.files("fastmaisi").joinpath(f"data/vocabularies/{key}.json").read_text())
    classes = {int(i): str(v[0]) for i, v in doc["classes"].items()}
    to_maisi = {int(i): (None if v[1] is None else int(v[1])) for i, v in doc["classes"].items()}
    return Vocabulary(name=key, title=doc["title"], kind=doc["kind"], classes=classes, to_maisi=to_maisi,
                      refused={int(i): r for i, r in doc.get("refused", {}).items()},
                      aliases={str(k): (None if v is None else int(v)) for k, v in doc.get("aliases", {}).items()},
                      notes={int(i): r for i, r in doc.get("notes", {}).items()})


def name_key(name: str) -> str:
    """Order- and separator-free form of an anatomical name: "kidney_right", "Right kidney" -> "kidney right"."""
    words = re.findall(r"[a-z0-9]+", str(name).lower())
    return " ".join(sorted(words))


@lru_cache(maxsize=None)
def _name_table() -> dict[str, int | None]:
    table: dict[str, int | None] = {}
    for vocab_name in (*TOTALSEGMENTATOR_TASKS, "maisi"):
        vocab = get_vocabulary(vocab_name)
        for i, cls in vocab.classes.items():
            table.setdefault(name_key(cls), vocab.to_maisi[i])
        for alias, m in vocab.aliases.items():
            table.setdefault(name_key(alias), m)
    for dummy in ("dummy1", "dummy2", "dummy3", "dummy4", "dummy5", "dummy6", "dummy7", "dummy8"):
        table.pop(name_key(dummy), None)  # a structure is never mapped onto MAISI's placeholder ids by name
    return table


def maisi_id_of_name(name: str) -> tuple[bool, int | None]:
    """(known, MAISI id) of a class name written by TotalSegmentator ("liver", "kidney_right") or MAISI ("right
    kidney"). known=False: not a name of any vocabulary; (True, None): a known structure without a MAISI id."""
    key = name_key(name)
    table = _name_table()
    return (key in table, table.get(key))


def describe(name: str) -> str:
    """A vocabulary as text: one line per id with its class name and MAISI id (for `fastmaisi labels list`)."""
    vocab = get_vocabulary(name)
    from fastmaisi.labels import LABEL_NAMES

    lines = [f"{vocab.name}: {vocab.title}", f"{'id':>4}  {'class':<34} MAISI"]
    for i in sorted(vocab.classes):
        m = vocab.to_maisi[i]
        if i in vocab.refused:
            target = f"refused: {vocab.refused[i]}"
        elif m is None:
            target = "-  (no MAISI id: zeroed)"
        else:
            target = f"{m:>3}  {LABEL_NAMES.get(m, '')}"
        lines.append(f"{i:>4}  {vocab.classes[i]:<34} {target}")
    return "\n".join(lines)
