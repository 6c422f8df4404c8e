"""MAISI label vocabulary and the conditioning encodings built on it (torch-free at import time).

- the 132-organ CT vocabulary (ids 1..132, body = 200) and the modality codes of the class embedding;
- the anatomy-size vector (10 slots) that conditions the mask diffusion model;
- label map -> 8 bit-channels (LSB first), the ControlNet input;
- the mask autoencoder's 125 classes -> vocabulary ids (the "124 -> 132" remap);
- label-map validation and the body envelope (label 200) for masks that lack it;
- the per-organ median-HU quality check of generated CT.

The facts live in `fastmaisi/data/vocabulary.json` (our layout; the values follow NVIDIA's MAISI configs).
numpy is the only import at module load; torch (binarize_labels) and scipy (add_body_envelope) load on first use.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

_VOCAB = json.loads(resources.files("fastmaisi").joinpath("data/vocabulary.json").read_text())

# ----------------------------------------------------------------------------------------------------------- vocabulary
LABELS: dict[str, int] = {name: int(i) for i, name in _VOCAB["labels"].items()}
"""Label name -> id (133 entries: ids 1..132 and body = 200; 2, 16, 18, 20, 21, 129-131 are dummies)."""
LABEL_NAMES: dict[int, str] = {i: name for name, i in LABELS.items()}
BODY: int = int(_VOCAB["body_label"])
VALID_IDS: frozenset[int] = frozenset(LABELS.values())
"""Ids of the vocabulary. Background 0 is allowed in a label map in addition to these."""
MAX_LABEL = 255  # the 8 bit-channel encoding represents ids 0..255 only

MODALITIES: dict[str, int] = {name: int(code) for name, code in _VOCAB["modalities"].items()}
"""Modality name -> class-embedding id. 0 = unknown, also the null class of classifier-free guidance."""


def label_name(label_id: int) -> str:
    """Name of a label id (0 -> "background"); ValueError for an id outside the vocabulary."""
    i = int(label_id)
    if i == 0:
        return "background"
    if i not in LABEL_NAMES:
        raise ValueError(f"label id {label_id} is not in the MAISI vocabulary (ids 1..132 and {BODY})")
    return LABEL_NAMES[i]


def label_id(name: str) -> int:
    """Id of a label name (exact names of the vocabulary, e.g. "right kidney"); ValueError suggests close names."""
    if name in LABELS:
        return LABELS[name]
    close = difflib.get_close_matches(str(name), LABELS, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown label name {name!r}{hint} (the vocabulary has {len(LABELS)} names)")


def modality_code(modality: str | int) -> int:
    """Class-embedding id of a modality given by name ("ct", "mri_t1"), code (9) or code string ("9")."""
    if isinstance(modality, bool):
        raise ValueError(f"modality {modality!r}: expected a name or a code")
    if isinstance(modality, (int, np.integer)) or (isinstance(modality, str) and modality.strip().isdigit()):
        code = int(modality)
        if code in MODALITIES.values():
            return code
    elif isinstance(modality, str) and modality.strip().lower() in MODALITIES:
        return MODALITIES[modality.strip().lower()]
    allowed = ", ".join(f"{n} ({c})" for n, c in MODALITIES.items())
    raise ValueError(f"unknown modality {modality!r}; choose a name or code from: {allowed}")


def is_ct_modality(code: int) -> bool:
    """Codes 1..7 are CT (HU range [-1000, 1000], quality check, CT input checks); 8 and above are MR."""
    return 1 <= int(code) <= 7


# -------------------------------------------------------------------------------------------- anatomy-size conditioning
ANATOMY_SIZE_SLOTS: tuple[str, ...] = (
    "gallbladder", "liver", "stomach", "pancreas", "colon",
    "lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion",
)
"""The 10 slots of the mask DM's cross-attention context (1 token of 10 values), in order."""
ANATOMY_SIZE_TUMOURS: tuple[str, ...] = ANATOMY_SIZE_SLOTS[5:]
ABSENT = -1.0


def _size_items(organ_sizes) -> list[tuple[str, float]]:
    items = list(organ_sizes.items()) if isinstance(organ_sizes, Mapping) else [tuple(p) for p in organ_sizes]
    if any(len(p) != 2 for p in items):
        raise ValueError("organ sizes: expected {name: size} or [(name, size), ...]")
    return [(str(n), p) for n, p in items]


def anatomy_size_vector(organ_sizes, fill: float | None = ABSENT) -> list[float]:
    """Organ sizes -> the 10-d anatomy-size vector of the mask DM (slot order ANATOMY_SIZE_SLOTS).

    Args:
        organ_sizes: `{name: size}` or `[(name, size), ...]`. A size is a normalised size in [0, 1], or -1 for
            "absent / don't care". Names are slot names; at most one tumour; no repeats (the reference's rules).
        fill: value of the slots not given. The reference fills them from the closest entry of its organ-size
            database (see `snap_anatomy_size`); without the database we use -1. `None` leaves them as None.
    Raises:
        ValueError: unknown names (listed with the allowed ones), a repeated name, more than one tumour, a size
            outside [0, 1] that is not -1, more than 10 entries.
    """
    items = _size_items(organ_sizes)
    if len(items) > len(ANATOMY_SIZE_SLOTS):
        raise ValueError(f"organ sizes: at most {len(ANATOMY_SIZE_SLOTS)} entries, got {len(items)}")
    unknown = [n for n, _ in items if n not in ANATOMY_SIZE_SLOTS]
    if unknown:
        raise ValueError(f"organ sizes: unknown name(s) {unknown}; allowed: {list(ANATOMY_SIZE_SLOTS)}")
    names = [n for n, _ in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"organ sizes: {repeated} given more than once")
    tumours = [n for n in names if n in ANATOMY_SIZE_TUMOURS]
    if len(tumours) > 1:
        raise ValueError(f"organ sizes: at most one tumour can be controlled, got {tumours}")
    vector: list[Any] = [fill] * len(ANATOMY_SIZE_SLOTS)
    for name, size in items:
        try:
            value = float(size)
        except (TypeError, ValueError):
            raise ValueError(f"organ sizes: {name}={size!r} is not a number") from None
        if value != ABSENT and not 0.0 <= value <= 1.0:
            raise ValueError(f"organ sizes: {name}={size} must be in [0, 1] or -1 (absent)")
        vector[ANATOMY_SIZE_SLOTS.index(name)] = value
    return vector


def snap_anatomy_size(organ_sizes, candidates) -> list[float]:
    """The reference's completion of a partial size request: nearest database vector, then the user's values on top.

    `candidates`: the 10-d `organ_size` vectors of NVIDIA's `all_anatomy_size_conditions.json` (a list of vectors or
    of `{"organ_size": [...]}` entries). Distance = L1 over the slots the user set.
    """
    wanted = anatomy_size_vector(organ_sizes, fill=None)
    table = np.asarray([c["organ_size"] if isinstance(c, Mapping) else c for c in candidates], dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != len(ANATOMY_SIZE_SLOTS) or len(table) == 0:
        raise ValueError(f"candidates: expected a non-empty list of {len(ANATOMY_SIZE_SLOTS)}-d size vectors")
    given = [i for i, v in enumerate(wanted) if v is not None]
    if given:
        best = table[int(np.argmin(np.abs(table[:, given] - [wanted[i] for i in given]).sum(axis=1)))]
    else:
        best = table[0]
    return [float(w) if w is not None else float(b) for w, b in zip(wanted, best)]


# ----------------------------------------------------------------------------------------------- 8 bit-channel encoding
def binarize_labels(label, bits: int = 8, dtype=None, channels_last: bool = False):
    """Label map -> bit-channels, channel k = bit k of the id (LSB first), values 0/1: the ControlNet condition.

    (B, 1, D, H, W) -> (B, bits, D, H, W); a bare (D, H, W) map -> (1, bits, D, H, W). Accepts a torch tensor or a
    numpy array of integer ids. Body 200 = 0b11001000 lights channels 3, 6 and 7. The reference returns uint8 and
    casts later (fp16 at inference, fp32 in training); here `dtype` defaults to float32. channels_last: return the
    channels-last layout the expansion makes (what CUDA inference runs in) instead of a contiguous copy.
    Raises ValueError for ids < 0 or >= 2**bits (the reference silently aliases them).
    """
    import torch

    x = torch.as_tensor(label)
    if x.ndim == 3:
        x = x[None, None]
    elif x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"label: expected shape (B, 1, D, H, W) or (D, H, W), got {tuple(x.shape)}")
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise ValueError("label: non-integer values in a label map")
    elif x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"label: expected integer ids, got dtype {x.dtype}")
    if x.numel() and not (x.dtype == torch.uint8 and bits >= 8):  # (uint8 ids always fit 8 bits: no pass)
        lo, hi = (int(v) for v in torch.aminmax(x))
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"label: ids must be in 0..{2**bits - 1} for a {bits}-bit encoding, got {lo}..{hi}"
                             + (" (ids above 255 cannot be represented by MAISI's 8 channels)" if hi > 255 else ""))
    x = x[:, 0].to(torch.int32 if bits > 8 else torch.uint8)
    shifts = torch.arange(bits, dtype=x.dtype, device=x.device)
    out = ((x.unsqueeze(-1) >> shifts) & 1).to(dtype or torch.float32)  # (B, D, H, W, bits): one pass per op
    out = out.permute(0, 4, 1, 2, 3)  # (B, bits, D, H, W) with channels-last strides
    return out if channels_last else out.contiguous()


def unbinarize_labels(channels):
    """Inverse of `binarize_labels`: (B, bits, D, H, W) 0/1 channels -> (B, 1, D, H, W) int64 ids (threshold 0.5)."""
    import torch

    c = torch.as_tensor(channels)
    weights = (2 ** torch.arange(c.shape[1], device=c.device)).view(1, -1, *([1] * (c.ndim - 2)))
    return ((c > 0.5).long() * weights).sum(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------- mask autoencoder classes
MASK_AE_TO_LABEL: np.ndarray = np.asarray(_VOCAB["mask_autoencoder_classes"], dtype=np.uint8)
"""Lookup table: mask-AE class index (0..124, the argmax of its 125 channels) -> vocabulary id (124 -> body 200)."""


def remap_mask_labels(raw):
    """Mask-AE class indices (0..124) -> vocabulary ids, as a lookup table; numpy in -> uint8 numpy, torch -> torch."""
    n = len(MASK_AE_TO_LABEL)
    if hasattr(raw, "detach"):  # torch tensor: stay on its device
        import torch

        if raw.numel() and (int(raw.min()) < 0 or int(raw.max()) >= n):
            raise ValueError(f"mask classes must be in 0..{n - 1}, got {int(raw.min())}..{int(raw.max())}")
        return torch.as_tensor(MASK_AE_TO_LABEL, device=raw.device)[raw.long()]
    raw = np.asarray(raw)
    if raw.size and (raw.min() < 0 or raw.max() >= n):
        raise ValueError(f"mask classes must be in 0..{n - 1}, got {raw.min()}..{raw.max()}")
    return MASK_AE_TO_LABEL[raw.astype(np.intp, copy=False)]


# ------------------------------------------------------------------------------------------------------- validation
def _group_medians(img: np.ndarray, group: np.ndarray, n: int) -> list[float | None]:
    """np.median of `img` over the voxels of each group 1..n (None where empty; NaNs dropped). Integer images (the
    generated int16 HU) take one histogram pass instead of a masked copy and a partition per group: at 512^3 the
    check takes about a tenth of the time, with the same values."""
    if img.dtype.kind in "iu":
        inside = group > 0
        g, v = group[inside], img[inside]
        if v.size == 0:
            return [None] * n
        lo, hi = int(v.min()), int(v.max())
        width = hi - lo + 1
        if width * (n + 1) <= 50_000_000:
            hist = np.bincount(g.astype(np.int64) * width + (v.astype(np.int64) - lo),
                               minlength=(n + 1) * width).reshape(n + 1, width)
            out: list[float | None] = []
            for counts in hist[1:]:
                total = int(counts.sum())
                if total == 0:
                    out.append(None)
                    continue
                cum = np.cumsum(counts)  # the middle value(s): ranks (total - 1) // 2 and total // 2
                a, b = (int(np.searchsorted(cum, r, side="right")) for r in ((total - 1) // 2, total // 2))
                out.append((a + b) / 2 + lo)
            return out
    out = []
    for k in range(1, n + 1):
        values = img[group == k]
        values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
        out.append(float(np.median(values)) if values.size else None)
    return out


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _label_counts(label: np.ndarray) -> np.ndarray:
    """Voxel count per id 0..255 (after the caller has checked the range)."""
    flat = label.ravel()
    return np.bincount(flat.astype(np.uint8, copy=False) if flat.dtype != np.uint8 else flat, minlength=256)


def validate_label_map(label) -> dict:
    """Check a label map against the vocabulary; returns {"ids", "has_body", "shape", "counts"}.

    Raises ValueError for non-integer values, ids outside 0..255 (not representable by the 8 bit-channels) and ids
    that are not in the vocabulary (up to 10 listed). A missing body label is not an error: see `add_body_envelope`.
    """
    a = _numpy(label)
    if a.dtype.kind == "f":
        if not np.array_equal(a, np.round(a)):
            raise ValueError("label map: non-integer values (a label map holds integer ids)")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"label map: expected integer ids, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError("label map: empty array")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > MAX_LABEL:
        bad = np.unique(a[(a < 0) | (a > MAX_LABEL)])
        raise ValueError(f"label map: {len(bad)} id(s) outside 0..{MAX_LABEL} (the 8 bit-channel encoding cannot "
                         f"represent them): {[int(v) for v in bad[:10]]}{' ...' if len(bad) > 10 else ''}")
    counts = _label_counts(a)
    ids = [int(i) for i in np.nonzero(counts)[0]]
    unknown = [i for i in ids if i != 0 and i not in VALID_IDS]
    if unknown:
        raise ValueError(f"label map: {len(unknown)} id(s) not in the MAISI vocabulary: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''} (valid: 1..132 and {BODY}; map new classes onto "
                         "the dummy ids 2, 16, 18, 20, 21, 129-131)")
    return {"ids": ids, "has_body": bool(counts[BODY]), "shape": tuple(a.shape),
            "counts": {i: int(counts[i]) for i in ids}}


# ------------------------------------------------------------------------------------------------------ body envelope
def add_body_envelope(label, image_hu=None, spacing=None, rule: str | None = None, margin_mm: float = 20.0,
                      hu_threshold: float = -800.0, table_mm: float = 5.0, body_label: int = BODY,
                      table_fraction: float | None = 0.05, seg_has_lung: bool | None = None) -> np.ndarray:
    """Fill the body envelope: unlabelled voxels inside the body get `body_label` (200); other voxels are unchanged.

    MAISI's ControlNet expects every body voxel that no organ claims to carry 200 (its generator sets everything
    outside the labels to -1000 HU). Two rules; `rule=None` picks "hu" when an image is given, else "hull".

    - "hull" (labels only): per axial slice (axis 2), the convex hull of the labelled voxels of that slice and its
      two neighbours, grown by `margin_mm` in-plane: the body wall and subcutaneous fat outside the outermost
      labels (ribs, colon, back muscles), which no label covers; 20 mm suits an average adult. Good for convex
      torsos (Dice 0.93-0.98 against the true body of our phantoms); it cannot know the true fat thickness, and
      it bridges the air between arms and torso when the arms are labelled.
    - "hu" (needs `image_hu`, same shape): body = everything except the air (HU < `hu_threshold`) connected to the
      in-plane border of the volume, labelled voxels forced inside; then an erosion by `table_mm`, the largest
      connected component and a dilation back remove a CT table that touches the body only thinly. Enclosed air
      (lungs, bowel gas) stays inside. Our variant of the reference's HU rule (which takes the largest air
      component and removes table-sized air pockets); Dice > 0.99 on our phantoms.
      Then table removal (NVIDIA's step 8, July 2026): every connected piece of body-label voxels that is air
      (HU < `hu_threshold`) and at least `table_fraction` (default 0.05) of the body-label voxels goes back to 0 (a
      CT table or bed the envelope took in; legitimate enclosed air is far smaller). Only when the segmentation
      labels the lungs (`seg_has_lung`; None: any lung lobe 28-32 present), since unlabelled lung air would
      otherwise be removed too. `table_fraction` None or 0 turns it off.

    Args:
        label: (X, Y, Z) integer label map (numpy or torch), RAS index order (axis 2 = inferior -> superior).
        spacing: voxel size in mm (default 1.5 mm isotropic, the mask-generation grid).
    Returns:
        numpy array of the input's dtype and shape.
    """
    from scipy import ndimage

    lab = _numpy(label)
    if lab.ndim != 3:
        raise ValueError(f"label: expected an (X, Y, Z) map, got shape {lab.shape}")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.5, 1.5, 1.5)))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing: expected 3 positive values in mm, got {spacing}")
    rule = rule or ("hu" if image_hu is not None else "hull")
    fg = lab > 0
    if rule == "hull":
        body = _hull_envelope(fg, spacing, margin_mm)
    elif rule == "hu":
        if image_hu is None:
            raise ValueError('rule "hu" needs image_hu (the CT in HU, same shape as the label map)')
        img = _numpy(image_hu)
        if img.shape != lab.shape:
            raise ValueError(f"image_hu shape {img.shape} differs from the label map's {lab.shape}")
        air = (img < hu_threshold) & ~fg
        comp, _ = ndimage.label(air)
        border = np.unique(np.concatenate([comp[0].ravel(), comp[-1].ravel(), comp[:, 0].ravel(), comp[:, -1].ravel()]))
        body = ~np.isin(comp, border[border > 0]) | fg
        radius = np.maximum(1, np.round(table_mm / np.asarray(spacing))).astype(int)
        pad = [(int(r) + 1, int(r) + 1) for r in radius]  # edge padding: a body cut by the volume's faces
        core = ndimage.binary_erosion(np.pad(body, pad, mode="edge"), _ellipsoid_structure(radius))
        comp, n = ndimage.label(core)
        if n > 1:
            core = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
        # dilate back one voxel further than the erosion, so the opening does not shave the body's own outline
        core = ndimage.binary_dilation(core, _ellipsoid_structure(radius + 1))
        body = (core[tuple(slice(a, a + size) for (a, _), size in zip(pad, body.shape))] & body) | fg
    else:
        raise ValueError(f'rule {rule!r}: choose "hull" (labels only) or "hu" (needs the CT image)')
    out = lab.copy()
    out[body & ~fg] = body_label
    if rule == "hu" and table_fraction:
        if seg_has_lung is None:
            seg_has_lung = bool(np.isin(lab, LUNG_LOBE_LABELS).any())
        if seg_has_lung:
            remove_table(out, img, hu_threshold, table_fraction, body_label)
    return out


LUNG_LOBE_LABELS = (28, 29, 30, 31, 32)


def remove_table(out: np.ndarray, image_hu: np.ndarray, hu_threshold: float = -800.0, fraction: float = 0.05,
                 body_label: int = BODY) -> int:
    """In place: body-label voxels that are air and form a piece >= `fraction` of the body-label voxels -> 0 (a CT
    table or bed inside the envelope). Returns the number of voxels removed."""
    from scipy import ndimage

    body = out == body_label
    n_body = int(body.sum())
    air = body & (image_hu < hu_threshold)
    if not n_body or not air.any():
        return 0
    pieces, n = ndimage.label(air)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    sizes[0] = 0
    table = np.isin(pieces, np.nonzero(sizes >= fraction * n_body)[0]) if n else np.zeros_like(air)
    out[table] = 0
    return int(table.sum())


def _ellipsoid_structure(radius) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius)) <= 1.0


def _hull_envelope(fg: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """Per axial slice: convex hull of labelled voxels (slice +-1) dilated by margin_mm, rasterised row by row."""
    from scipy.spatial import ConvexHull

    X, Y, Z = fg.shape
    slab = fg.copy()
    slab[:, :, 1:] |= fg[:, :, :-1]
    slab[:, :, :-1] |= fg[:, :, 1:]
    # the hull of a slice equals the hull of each row's first and last labelled voxel
    any_row = slab.any(axis=1)  # (X, Z)
    first = np.argmax(slab, axis=1)
    last = Y - 1 - np.argmax(slab[:, ::-1, :], axis=1)
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = np.stack([margin_mm / spacing[0] * np.cos(angles), margin_mm / spacing[1] * np.sin(angles)], axis=1)
    rows = np.arange(X, dtype=np.float64)
    cols = np.arange(Y, dtype=np.float64)
    body = np.zeros_like(fg)
    for k in range(Z):
        xs = np.nonzero(any_row[:, k])[0]
        if xs.size == 0:
            continue
        pts = np.concatenate([np.stack([xs, first[xs, k]], 1), np.stack([xs, last[xs, k]], 1)]).astype(np.float64)
        pts = (pts[:, None, :] + ring[None]).reshape(-1, 2)  # Minkowski sum with a 16-gon of radius margin
        eq = ConvexHull(pts).equations  # inside: n0*x + n1*y + c <= 0 for every facet
        n0, n1, c = eq[:, 0], eq[:, 1], eq[:, 2]
        bound = -(c[None, :] + n0[None, :] * rows[:, None])  # n1 * y <= bound
        with np.errstate(divide="ignore", invalid="ignore"):
            lim = bound / n1[None, :]
        hi = np.where(n1[None, :] > 1e-12, lim, np.inf).min(axis=1)
        lo = np.where(n1[None, :] < -1e-12, lim, -np.inf).max(axis=1)
        flat_ok = np.where(np.abs(n1)[None, :] <= 1e-12, bound >= 0, True).all(axis=1)
        inside = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None]) & flat_ok[:, None]
        body[:, :, k] = inside
    return body


# -------------------------------------------------------------------------------------------------- body regions
BODY_REGIONS: tuple[str, ...] = ("head", "chest", "abdomen", "pelvis")
REGION_LANDMARKS: dict[str, tuple[int, ...]] = {
    "head": (22, 120),  # brain, skull
    "chest": (28, 29, 30, 31, 32),  # lung lobes
    "abdomen": (1, 2, 3, 4, 5, 14),  # liver, dummy1, spleen, pancreas, kidneys (the reference's set)
    "pelvis": (93, 94),  # femurs
}


def body_region_from_mask(label) -> tuple[list[int], list[int]]:
    """Top and bottom body region (one-hot over head, chest, abdomen, pelvis) from the landmark labels present.

    The ddpm-ct UNet's region inputs (the caller multiplies them by 100). ValueError when no landmark is present
    (the reference crashes there).
    """
    a = _numpy(label)
    present = set(np.unique(a[(a >= 0) & (a <= MAX_LABEL)]).tolist())
    hits = [i for i, name in enumerate(BODY_REGIONS) if present & set(REGION_LANDMARKS[name])]
    if not hits:
        raise ValueError("label map: no body-region landmark (brain/skull, lungs, liver/spleen/pancreas/kidneys, "
                         "femurs); give the body region explicitly")
    eye = np.eye(len(BODY_REGIONS), dtype=int)
    return eye[min(hits)].tolist(), eye[max(hits)].tolist()


# ---------------------------------------------------------------------------------------------------- quality check
QC_ORGAN_GROUPS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "kidney": (5, 14),
    # the reference lists [28, 29, 30, 31, 31]: 31 twice and the right lower lobe (32) missing; fixed here
    "lung": (28, 29, 30, 31, 32),
    "bone": tuple(range(33, 57)) + tuple(range(63, 98)) + (120, 122, 127),  # spine, ribs..sacrum, skull, sternum, S1
    "brain": (22,),
}
QC_STATISTICS: dict[str, dict[str, float]] = _VOCAB["qc_median_hu_statistics"]
"""Per organ: 6-sigma and 0.5/99.5-percentile bounds of the median HU over MAISI's real training CTs."""


def qc_thresholds(stats: Mapping | str | Path | None = None) -> dict[str, tuple[float, float]]:
    """Accepted [low, high] median HU per organ: [min(sigma_6_low, p0.5), max(sigma_6_high, p99.5)], bone high = 1000.

    `stats`: None (packaged), a dict in the layout of NVIDIA's `image_median_statistics_ct.json`, or a path to it.
    """
    if stats is None:
        stats = QC_STATISTICS
    elif isinstance(stats, (str, Path)):
        stats = json.loads(Path(stats).read_text())
    out = {}
    for organ, s in stats.items():
        low = min(s["sigma_6_low"], s["percentile_0_5"])
        high = 1000.0 if organ == "bone" else max(s["sigma_6_high"], s["percentile_99_5"])
        out[organ] = (float(low), float(high))
    return out


@dataclass
class QCResult:
    """Outcome of `quality_check`: per-organ median HU (None when the organ is absent), bounds, pass/fail."""

    medians: dict[str, float | None]
    thresholds: dict[str, tuple[float, float]]
    organ_passed: dict[str, bool]
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"passed": self.passed, "failed": list(self.failed), "medians": dict(self.medians),
                "thresholds": {k: list(v) for k, v in self.thresholds.items()}}


def quality_check(image_hu, label, stats: Mapping | str | Path | None = None) -> QCResult:
    """Per-organ median-HU check of a generated CT against real-CT statistics (MAISI's pass/fail gate).

    For each organ of `stats` (liver, spleen, pancreas, kidney, lung, bone, brain) the median HU over the voxels of
    its label group (QC_ORGAN_GROUPS, NaNs dropped) must lie inside `qc_thresholds(stats)` (inclusive). An organ
    absent from the label map passes. image_hu and label: same shape, numpy or CPU torch.
    """
    img = _numpy(image_hu)
    lab = _numpy(label)
    if img.shape != lab.shape:
        raise ValueError(f"image_hu shape {img.shape} differs from the label map's {lab.shape}")
    if img.flags.f_contiguous and lab.flags.f_contiguous:  # (medians ignore the order: walk both in memory order)
        img, lab = img.T, lab.T
    thresholds = qc_thresholds(stats)
    # one pass: id -> index of its QC group (groups are disjoint); ids outside 0..255 belong to none
    lut = np.zeros(MAX_LABEL + 2, dtype=np.uint8)
    organs = list(thresholds)
    for g, organ in enumerate(organs, start=1):
        lut[[i for i in QC_ORGAN_GROUPS.get(organ, ()) if i <= MAX_LABEL]] = g
    if lab.dtype == np.uint8:  # every id is in the table: no range test, no 8-byte copy of the map
        group = lut[lab]
    elif lab.dtype in (np.int16, np.uint16):  # one gather through a 2^16 table (negative ids: its upper half, none)
        wide = np.zeros(1 << 16, dtype=np.uint8)
        wide[:MAX_LABEL + 1] = lut[:MAX_LABEL + 1]
        group = wide[lab.view(np.uint16)]
    else:
        idx = lab.astype(np.int64, copy=False)
        group = lut[np.where((idx >= 0) & (idx <= MAX_LABEL), idx, MAX_LABEL + 1)]
    medians, passed, failed = {}, {}, []
    for organ, med in zip(organs, _group_medians(img, group, len(organs))):
        if med is None:
            medians[organ], passed[organ] = None, True
            continue
        low, high = thresholds[organ]
        medians[organ], passed[organ] = med, low <= med <= high
        if not passed[organ]:
            failed.append(organ)
    return QCResult(medians=medians, thresholds=thresholds, organ_passed=passed, failed=failed)
