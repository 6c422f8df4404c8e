"""The mask post-process as it was before its speed-up (scipy binary morphology and one labelling per organ over
its whole box, one thread): the voxel-for-voxel oracle of `fastmaisi.pipelines.mask_postprocess`. Test-only."""


from __future__ import annotations

import numpy as np

from fastmaisi.labels import BODY
from fastmaisi.pipelines.mask_postprocess import (  # the rules' facts; the oracle is the way of applying them
    AIRWAY,
    BOWEL,
    HEPATIC_VESSEL,
    LIVER,
    LUNG_LOBES,
    ORGANS,
    SPLEEN,
    TUMOUR_HOSTS,
    TUMOUR_LABELS,
    TUMOURS_SEVERAL_PIECES,
    VERTEBRAE,
    target_tumour,
)

_CUBE = np.ones((3, 3, 3), bool)


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    """The smallest box holding `mask`'s voxels, grown by `pad` (clipped to the volume); empty slices if none."""
    out = []
    for axis in range(mask.ndim):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        n = mask.shape[axis]
        out.append(slice(max(hit[0] - pad, 0), min(hit[-1] + 1 + pad, n)) if hit.size else slice(0, 0))
    return tuple(out)


def _dilate(mask: np.ndarray, times: int = 1) -> np.ndarray:
    from scipy import ndimage

    for _ in range(times):
        mask = ndimage.binary_dilation(mask, _CUBE)
    return mask


def _dropped_pieces(sub: np.ndarray, volume_size: int | None = None) -> tuple[np.ndarray | None, bool]:
    """What the reference's largest-piece rule drops from a mask given whole (`sub`) or as the box `sub` of a
    volume of `volume_size` voxels holding every mask voxel: (voxels of `sub` dropped, or None when none; whether
    the background goes too, which happens only when a piece outnumbers it)."""
    from scipy import ndimage

    pieces, n = ndimage.label(sub, _CUBE)
    if n < 1:
        return None, False
    counts = np.bincount(pieces.ravel(), minlength=n + 1)
    counts[0] += (volume_size or sub.size) - sub.size  # the rest of the volume is background too
    values = np.nonzero(counts)[0]
    keep = values[np.argsort(counts[values])[::-1][:2]]
    if len(values) <= len(keep):
        return None, False
    kept = pieces == keep[0]
    kept |= pieces == keep[1]
    return ~kept, bool(0 not in keep)


def _keep_largest(label: np.ndarray, ids, fill: int) -> np.ndarray:
    """The reference's `supress_non_largest_components`: pieces are found on `label` as given, then every dropped
    voxel of every id becomes `fill`. Returns a new array."""
    from scipy import ndimage

    found = ndimage.find_objects(label.astype(np.int32, copy=False))
    dropped = np.zeros(label.shape, bool)
    for i in dict.fromkeys(ids):
        if i > len(found) or found[i - 1] is None:
            continue
        box = found[i - 1]
        sub_dropped, background_too = _dropped_pieces(label[box] == i, label.size)
        if sub_dropped is not None:
            dropped[box] |= sub_dropped
        if background_too:  # (outside the box: all background of this id)
            outside = np.ones(label.shape, bool)
            outside[box] = False
            dropped |= outside
    out = label.copy()
    out[dropped] = fill
    return out


def _closing_fill(label: np.ndarray, i: int, box: tuple[slice, ...] | None = None, times: int = 1) -> None:
    """The reference's `organ_fill_by_closing`, `times` times: the mask of `i`, dilated and eroded twice, is written
    as `i` over any label. `box`: a box known to hold every voxel of `i` (found when None)."""
    from scipy import ndimage

    for _ in range(times):
        if box is None:
            box = bounding_box(label == i)
        if any(s.stop <= s.start for s in box):
            return
        grown = tuple(slice(max(s.start - 3, 0), min(s.stop + 3, n)) for s, n in zip(box, label.shape))
        sub = label[grown]
        closed = ndimage.binary_closing(ndimage.binary_closing(sub == i, _CUBE), _CUBE)
        sub[closed] = i
        box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, label.shape))


def _regrow(label: np.ndarray, i: int, where: np.ndarray) -> None:
    """The reference's `organ_fill_by_removed_mask`: voxels of `where` within 3 voxels of `i` become `i`."""
    label[_dilate(label == i, 3) & where] = i


def _ring_mode(label: np.ndarray, tumour: np.ndarray) -> int | None:
    """Most frequent non-zero label in the 1-voxel ring around `tumour` (smallest on ties); None if none."""
    values = label[_dilate(tumour) & ~tumour]
    values = values[values != 0].astype(np.int64)
    return int(np.bincount(values).argmax()) if values.size else None


def postprocess_mask_reference(label: np.ndarray, anatomy_sizes) -> np.ndarray:
    """A generated label map (X, Y, Z), 132-label vocabulary -> the cleaned map (same shape and dtype)."""
    from scipy import ndimage

    vessel, airway = label == HEPATIC_VESSEL, label == AIRWAY
    # 1. body: one piece
    body = ndimage.binary_erosion(label > 0, _CUBE)
    removed, _ = _dropped_pieces(body)
    if removed is not None:
        body &= ~removed
    out = np.where(ndimage.binary_dilation(body, _CUBE), label, 0).astype(label.dtype)
    # 2. tumours: the others to their host, the requested one closed and (most) in one piece
    target = target_tumour(anatomy_sizes)
    for tumour in TUMOUR_LABELS:
        if tumour != target:
            out[out == tumour] = TUMOUR_HOSTS[tumour]
        else:
            _closing_fill(out, tumour, times=2)
    if target is not None and target not in TUMOURS_SEVERAL_PIECES:
        out = _keep_largest(out, [target], BODY)
    target_mask = out == target if target is not None else None
    # 3. organs and vertebrae in one piece, the bowel in one piece, then each organ closed
    organs = ORGANS + (VERTEBRAE if target != 128 else ())
    data = _keep_largest(out, organs, BODY)
    organ_removed = out != data
    bowel = (data == BOWEL[0]) | (data == BOWEL[1]) | (data == BOWEL[2]) | (data == BOWEL[3])
    dropped, _ = _dropped_pieces(bowel)
    bowel_removed = np.zeros(data.shape, bool) if dropped is None else dropped & ((data == 19) | (data == 62))
    data[bowel_removed] = BODY
    found = ndimage.find_objects(data.astype(np.int32, copy=False))
    boxes = {i: found[i - 1] for i in set(organs) if i <= len(found) and found[i - 1] is not None}
    for organ in organs:
        if organ in boxes:
            _closing_fill(data, organ, boxes[organ])
            boxes[organ] = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(boxes[organ],
                                                                                              data.shape))
    # 4. the requested tumour's refills
    if target == 23 and target_mask.any():
        tumour = data == 23
        ring = _dilate(tumour)
        mode = _ring_mode(data, tumour)
        if mode in LUNG_LOBES:
            ring = _dilate(ring)
            _regrow(data, mode, ring & ~tumour)
        ring = _dilate(ring)
        _regrow(data, 23, ring & organ_removed)
        for lobe in LUNG_LOBES:
            _closing_fill(data, lobe, times=3)
    elif target == 26 and target_mask.any():
        for _ in range(2):
            _regrow(data, LIVER, bowel_removed)
        for _ in range(2):
            _regrow(data, SPLEEN, organ_removed)
        _regrow(data, 26, _dilate(data == 26, 2) & organ_removed)
        # The reference then keeps the largest piece of "tumour + vessel + liver" through a test (sum of the three
        # disjoint masks > 1) that no voxel passes: nothing becomes body, and the tumour mask it restores at the end
        # is empty. Reproduced: the hepatic tumour is not written back.
        target_mask = np.zeros(data.shape, bool)
        _closing_fill(data, LIVER, times=3)
    elif target == 27 and target_mask.any():
        _regrow(data, 27, _dilate(data == 27, 2) & organ_removed)
    # 5. vessels -> liver; airway and the requested tumour back
    data[vessel] = LIVER
    data[airway] = AIRWAY
    if target_mask is not None:
        data[target_mask] = target
    return data
