"""A user's segmentation(s) -> one MAISI label map on the input's grid, with a report of everything decided.

`convert_segmentation(paths, vocabulary="auto")` is the one entry point (`fastmaisi labels convert`, `generate --mask`).
Steps: read each input; decide its vocabulary (auto-detection refuses rather than guesses); map ids to MAISI ids by
anatomical name; merge (a later input wins where it labels a voxel, e.g. `liver_vessels` over `total`'s liver); body
200 from TotalSegmentator's `body` task, else kept from a MAISI map, else MAISI's envelope rule; refuse maps with no
organ left; per-class volumes (mL) of input and output so nothing is lost silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fastmaisi.labels import BODY, LABEL_NAMES, VALID_IDS
from fastmaisi.segmentations.read import Segmentation, read_segmentation
from fastmaisi.vocabularies import NAMES, Vocabulary, get_vocabulary, maisi_id_of_name

MIN_ORGAN_VOXELS = 64
"""Fewer labelled organ voxels than this (all ids but 0 and body 200) is refused: nothing to condition on."""
MAISI_PLACEHOLDERS = frozenset({2, 16, 18, 20, 21, 129, 130, 131})
TOTALSEGMENTATOR_MAX_ID = 117


def detect_vocabulary(ids: Sequence[int], where: str, option: str = "--vocabulary") -> tuple[str, str]:
    """(vocabulary, reason) for a multilabel map holding `ids` (0 excluded); ValueError when it could be more than one.

    MAISI, NV-Segment-CT and VISTA3D agree on every id but MAISI's placeholders and 200, so ids above 117 (beyond
    TotalSegmentator's) without placeholders are MAISI ids whichever of the three wrote them; ids <= 117 without 200
    could as well be TotalSegmentator's (its liver is 5, MAISI's 5 the right kidney): refused, never guessed.
    """
    ids = sorted(set(int(i) for i in ids) - {0})
    choices = f"pass {option} NAME (total, total_v3, total_mr, maisi, nv_segment_ct, vista3d, ...; fastmaisi labels list)"
    if not ids:
        raise ValueError(f"{where}: the label map is empty (all 0)")
    outside = [i for i in ids if i not in VALID_IDS]
    if outside:
        raise ValueError(f"{where}: ids {_short(outside)} are in no known vocabulary (MAISI: 1..132 and {BODY}; "
                         f"TotalSegmentator: 1..117); {choices} if this is a map of another tool")
    placeholders = sorted(MAISI_PLACEHOLDERS & set(ids))
    if BODY in ids and not placeholders:
        return "maisi", "body 200 and only MAISI ids"
    if ids[-1] > TOTALSEGMENTATOR_MAX_ID and not placeholders:
        return "maisi", (f"ids up to {ids[-1]} (above TotalSegmentator's 117) and none of MAISI's placeholders: "
                         "MAISI ids (also NV-Segment-CT's and VISTA3D's, which agree on these)")
    if ids[-1] <= TOTALSEGMENTATOR_MAX_ID and BODY not in ids:
        raise ValueError(f"{where}: ids {ids[0]}..{ids[-1]} without body 200 could be TotalSegmentator's (liver 5) or "
                         f"MAISI's (liver 1, right kidney 5): cannot tell which; {choices}")
    raise ValueError(f"{where}: ids {_short(placeholders)} are placeholders in MAISI but classes in VISTA3D "
                     f"(2 kidney, 20 lung, 21 bone, ...): cannot tell which tool wrote it; {choices}")


def _short(values, n: int = 10) -> str:
    values = list(values)
    return "[" + ", ".join(str(v) for v in values[:n]) + (" ..." if len(values) > n else "") + "]"


def id_counts(a: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """Voxel count per id (index = id), in slabs: no int64 copy of a whole 512^3 map."""
    flat = a.reshape(-1)
    counts = np.zeros(int(flat.max()) + 1 if flat.size else 1, np.int64)
    for start in range(0, flat.size, chunk):
        part = np.bincount(flat[start:start + chunk], minlength=counts.size)
        counts += part
    return counts


def _present(ids: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(id_counts(ids)) if i != 0}


def _voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


def _class_mapping(seg: Segmentation, vocabulary: str, option: str) -> tuple[dict, dict]:
    """(input id -> (class name, MAISI id or None), decision) for one input."""
    present = [int(i) for i in np.flatnonzero(id_counts(seg.array)) if i != 0]
    if seg.class_names is not None:  # the input names its classes: map by name whatever vocabulary was given
        mapping = {}
        for i, name in seg.class_names.items():
            known, maisi = maisi_id_of_name(name)
            mapping[i] = (name, maisi if known else None)
        unknown = [n for i, (n, m) in mapping.items() if not maisi_id_of_name(n)[0]]
        if unknown and len(unknown) == len(mapping):
            raise ValueError(f"{seg.path}: none of its class names ({', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}) is a TotalSegmentator, NV-Segment, VISTA3D or "
                             "MAISI class: not a segmentation this converter knows")
        by = "file name" if seg.kind in ("folder", "class-file") else "coded anatomy"
        return mapping, {"vocabulary": "by class name",
                         "reason": f"each class named by its {by}{_best_task(seg.class_names.values())}"}
    if vocabulary == "auto":
        name, reason = detect_vocabulary(present, seg.path, option)
    else:
        name, reason = get_vocabulary(vocabulary).name, f"{option} {vocabulary}"
    vocab = get_vocabulary(name)
    outside = [i for i in present if i not in vocab.classes]
    if outside:
        raise ValueError(f"{seg.path}: ids {_short(outside)} are not in the {vocab.name} vocabulary "
                         f"({vocab.title}); wrong {option}? (fastmaisi labels list {option} NAME shows one)")
    refused = [i for i in present if i in vocab.refused]
    if refused:
        raise ValueError(f"{seg.path}: id {refused[0]}: {vocab.refused[refused[0]]}")
    mapping = {i: (vocab.classes[i], vocab.to_maisi[i]) for i in present}
    return mapping, {"vocabulary": vocab.name, "reason": reason, **_vocab_notes(vocab, present)}


def _best_task(names) -> str:
    """", the names of TotalSegmentator's `total` (117 of 117)": the vocabulary holding most of `names`."""
    names = set(names)
    best, hits = None, 0
    for vocab_name in NAMES:
        vocab = get_vocabulary(vocab_name)
        n = len(names & set(vocab.classes.values()))
        if n > hits:
            best, hits = vocab, n
    return f"; {hits} of {len(names)} are class names of {best.name} ({best.title})" if best else ""


def _vocab_notes(vocab: Vocabulary, present) -> dict:
    notes = [vocab.notes[i] for i in present if i in vocab.notes]
    return {"notes": notes} if notes else {}


def convert_segmentation(paths, vocabulary: str | Sequence[str] = "auto", *, add_body: bool = True,
                         strict_body: bool = False, option: str = "--vocabulary"):
    """One or more segmentations -> (MAISI label map uint8 on the input grid, 4x4 affine, report dict).

    `vocabulary`: "auto", a name of `fastmaisi.vocabularies.NAMES`, or one per path. All inputs must share one grid.
    Raises ValueError (one line) for every refusal: unknown or ambiguous ids, grids that differ, an empty or
    organ-less map, a missing body label with `strict_body`.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("no segmentation given")
    if isinstance(vocabulary, str):
        vocabulary = vocabulary.split(",") if "," in vocabulary else [vocabulary] * len(paths)
    vocabs = [v.strip() for v in vocabulary]
    if len(vocabs) != len(paths):
        raise ValueError(f"{option}: give one vocabulary, or one per input ({len(paths)})")
    for v in vocabs:
        if v != "auto" and v not in NAMES:
            get_vocabulary(v)  # raises with the list of names
    out = affine = None
    body_from_task = None
    inputs, segs = [], []
    for path, vocab_name in zip(paths, vocabs):
        seg = read_segmentation(path)
        mapping, decision = _class_mapping(seg, vocab_name, option)
        if out is None:
            out, affine = np.zeros(seg.array.shape, np.uint8), seg.affine
        elif seg.array.shape != out.shape or not np.allclose(seg.affine, affine, atol=1e-3):
            raise ValueError(f"{seg.path} is on another grid than {paths[0]} (shape {seg.array.shape} vs {out.shape}"
                             "); inputs to merge must share one grid (the CT they were made from)")
        lut = np.zeros(256, np.uint8)
        for i, (_, m) in mapping.items():
            if m is not None and m != BODY:
                lut[i] = m
        ids = seg.array if seg.array.dtype == np.uint8 else np.clip(seg.array, 0, 255).astype(np.uint8)
        mapped = lut[ids]
        out[mapped > 0] = mapped[mapped > 0]
        body_ids = [i for i, (_, m) in mapping.items() if m == BODY]
        if body_ids:
            body = np.isin(ids, body_ids)
            if decision.get("vocabulary") == "maisi" or seg.class_names is not None and len(mapping) > len(body_ids):
                out[body & (out == 0)] = BODY  # a map's own body label
            body_from_task = body if body_from_task is None else (body_from_task | body)
        segs.append((seg, ids, mapping))
        notes = [*seg.notes, *decision.pop("notes", [])]
        inputs.append({"path": str(path), "kind": seg.kind, **decision, **({"notes": notes} if notes else {})})
    # body 200: from TotalSegmentator's body task, a MAISI map's own, else the envelope rule
    has_body = bool((out == BODY).any())
    organs = int(np.count_nonzero((out != 0) & (out != BODY)))
    if organs == 0:
        raise ValueError(f"{', '.join(map(str, paths))}: no organ label after mapping to MAISI ids "
                         f"({'only the body label' if has_body or body_from_task is not None else 'empty map'}); "
                         "MAISI needs organs to condition on")
    if organs < MIN_ORGAN_VOXELS:
        raise ValueError(f"{', '.join(map(str, paths))}: only {organs} organ voxel(s) after mapping to MAISI ids "
                         f"(at least {MIN_ORGAN_VOXELS} needed): not a segmentation to condition on")
    unmapped = sorted({mapping[i][0] for _, ids, mapping in segs for i in _present(ids)
                       if i in mapping and mapping[i][1] is None})
    if body_from_task is not None and not has_body:
        out[body_from_task & (out == 0)] = BODY
        body = {"added": True, "method": "TotalSegmentator body task (body_trunc + body_extremities) where no organ"}
    elif has_body:
        body = {"added": False, "method": "present in the input"}
    elif strict_body:
        raise ValueError(f"{paths[0]}: no body label (200) and --strict-mask was given")
    elif add_body:
        body = {"added": True, "method": "envelope rule (fastmaisi.labels.add_body_envelope) after mapping"}
        out = _envelope(out, affine)
    else:
        body = {"added": False, "method": "none (not requested)"}
    if unmapped and body["added"]:
        body["unmapped_became_body"] = unmapped
    report = {"inputs": inputs, "unmapped": unmapped, "body": body,
              "volumes_ml": _volumes(segs, out, affine)}
    return out, affine, report


def _envelope(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """MAISI's envelope rule runs in RAS index order (axis 2 = inferior -> superior): reorient, fill, reorient back."""
    import nibabel as nib

    from fastmaisi.labels import add_body_envelope

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(label, ornt)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    filled = add_body_envelope(ras, spacing=tuple(float(s) for s in spacing))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(filled, back)).astype(np.uint8)


def _volumes(segs, out: np.ndarray, affine: np.ndarray) -> list[dict]:
    """Per input class: mL in the input, its MAISI id, mL of it that carries that id in the output (faithfulness)."""
    ml = _voxel_ml(affine)
    rows = []
    for seg, ids, mapping in segs:
        counts = np.pad(id_counts(ids), (0, 256))[:256]
        lut = np.zeros(256, np.uint8)
        for i, (_, m) in mapping.items():
            lut[i] = 0 if m is None else m
        target = lut[ids]
        kept = id_counts(np.where((target > 0) & (out == target), ids, 0).astype(np.uint8))
        kept = np.pad(kept, (0, 256))[:256]
        for i, (name, m) in sorted(mapping.items()):
            if counts[i] == 0:
                continue
            rows.append({"input": os.path.basename(seg.path.rstrip("/")), "id": int(i), "class": name,
                         "ml_in": round(counts[i] * ml, 3), "maisi_id": m,
                         "maisi_name": None if m is None else LABEL_NAMES.get(m),
                         "ml_out": round(kept[i] * ml, 3) if m is not None else 0.0})
    return rows


def report_lines(report: dict) -> list[str]:
    """The report as the lines `fastmaisi labels convert` prints."""
    lines = []
    for inp in report["inputs"]:
        lines.append(f"{inp['path']}: {inp['kind']}, vocabulary {inp['vocabulary']} ({inp['reason']})")
        lines += [f"  note: {n}" for n in inp.get("notes", [])]
    mapped = [r for r in report["volumes_ml"] if r["maisi_id"] is not None]
    lines.append(f"mapped {len(mapped)} class(es) to MAISI ids:")
    for r in mapped:
        lost = "" if abs(r["ml_out"] - r["ml_in"]) < 1e-6 else f"  ({r['ml_in'] - r['ml_out']:.1f} mL overwritten)"
        lines.append(f"  {r['class']:<30} -> {r['maisi_id']:>3} {r['maisi_name']:<30} {r['ml_in']:>10.1f} mL{lost}")
    if report["unmapped"]:
        lines.append(f"no MAISI id (zeroed): {', '.join(report['unmapped'])}")
    body = report["body"]
    lines.append(f"body 200: {'added' if body['added'] else 'not added'}, {body['method']}")
    if body.get("unmapped_became_body"):
        lines.append(f"  the structures without a MAISI id lie inside the body and became body 200: "
                     f"{', '.join(body['unmapped_became_body'])}")
    return lines
