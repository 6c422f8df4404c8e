"""Clean-up of a generated label map, with the reference's rules (`general_mask_generation_post_process`).

A decoded mask carries stray islands (a piece of liver beside the spleen, body specks in the air); the ControlNet
then paints tissue there. The steps, in the reference's order (all morphology 3^3 cubes, outside the volume = 0;
"closing-fill of L": dilate then erode the mask of L twice and write L over whatever the result covers, any label):

1. body: erode (label > 0), keep the largest piece, dilate back; everything outside becomes background (0);
2. tumours other than the requested one (the last tumour slot of the organ-size vector that is not -1) go to their
   host (lung tumour 23 -> right lung lower lobe 28, pancreatic 24 -> pancreas 4, hepatic 26 -> liver 1, colon 27 ->
   colon 62, bone lesion 128 -> body 200); the requested one gets two closing-fills, and keeps its largest piece
   unless it is hepatic or a bone lesion (other pieces -> 200);
3. organs (1, 4, 10, 12, 3, lung lobes 28-32, 5, 14, 13, 6-9, 10 again) and vertebrae 33-59 (unless a bone lesion
   was asked for) keep their largest piece (others -> 200); of stomach, duodenum, small bowel and colon together the
   largest piece is kept, small bowel and colon outside it -> 200; then each organ of the list gets a closing-fill;
4. tumour refills: lung tumour (lobe ring, tumour regrowth into removed voxels, lobes closed 3x), hepatic tumour
   (liver and spleen regrowth into removed voxels, tumour regrowth, liver closed 3x), colon tumour (regrowth);
5. hepatic vessels (25) become liver and the airway (132) comes back, both wherever they were in the input; the
   requested tumour is written back.

"Largest piece" is the reference's rule: 26-connected pieces, and of the piece map (background included) the two
most frequent values are kept, which is the background and the largest piece unless a piece outnumbers the rest.

The rules are written once (`clean_label_map`) over a few array operations: `HostOps` here (numpy, scipy's
labelling) and `mask_postprocess_torch.DeviceOps` (tensors on the GPU).

Speed on the host, with the same voxels as scipy's binary morphology and one whole-volume labelling per organ (the
previous implementation, kept as the test oracle tests/mask_postprocess_oracle.py): the 3^3 cube dilation/erosion is
three 1-D passes of shifted boolean OR/AND; each organ's pieces are labelled on its box without its spare empty
planes, in a thread pool (scipy's labelling releases the GIL); the bowel union and the tumour regrowths work on
their boxes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastmaisi.cores import usable_cores
from fastmaisi.labels import ANATOMY_SIZE_TUMOURS, BODY

TUMOUR_LABELS = (23, 24, 26, 27, 128)  # the tumour slots of the organ-size vector, in slot order
TUMOUR_HOSTS = {23: 28, 24: 4, 26: 1, 27: 62, 128: BODY}
TUMOURS_SEVERAL_PIECES = (26, 128)  # hepatic tumours and bone lesions keep every piece
ORGANS = (1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9, 10)  # (10 twice, as the reference's list)
VERTEBRAE = tuple(range(33, 60))
BOWEL = (12, 13, 19, 62)
LUNG_LOBES = (28, 29, 30, 31, 32)
LIVER, SPLEEN, HEPATIC_VESSEL, AIRWAY = 1, 3, 25, 132
_CUBE = np.ones((3, 3, 3), bool)


def target_tumour(anatomy_sizes) -> int | None:
    """The tumour label the organ-size vector asks for: the last tumour slot that is not -1 (None if all are)."""
    assert len(ANATOMY_SIZE_TUMOURS) == len(TUMOUR_LABELS)
    wanted = [lab for lab, v in zip(TUMOUR_LABELS, list(anatomy_sizes)[5:]) if v is not None and v != -1]
    return wanted[-1] if wanted else None


def box_from_profiles(profiles, shape, pad: int = 0) -> tuple[slice, ...]:
    """The box of a mask from its per-axis occupancy profiles (one bool sequence per axis), grown by `pad` and
    clipped to `shape`; empty slices if the mask is empty."""
    out = []
    for hit, n in zip(profiles, shape):
        hit = np.flatnonzero(hit)
        out.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, n)) if hit.size else slice(0, 0))
    return tuple(out)


def occupancy(mask, axis: int):
    """Whether each plane across `axis` holds a voxel of `mask` (numpy array or tensor)."""
    return mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    """The smallest box holding `mask`'s voxels, grown by `pad` (clipped to the volume); empty slices if none."""
    return box_from_profiles([occupancy(mask, axis) for axis in range(mask.ndim)], mask.shape, pad)


def _axis_pairs(ndim: int, axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index tuples of `[1:]` and `[:-1]` along `axis` (the two shifted views of a 1-voxel step)."""
    hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(ndim))
    lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ndim))
    return hi, lo


def _copy(mask):
    """A copy of a numpy array or a torch tensor (the morphology below serves both paths)."""
    return mask.clone() if hasattr(mask, "clone") else mask.copy()


def _fill(label, where, value) -> None:
    """label[where] = value in place, for a numpy array or a tensor; on a tensor without the device sync that boolean
    indexing costs (masked_fill_ needs no count of the voxels)."""
    if hasattr(label, "masked_fill_"):
        label.masked_fill_(where, value)
    else:
        np.putmask(label, where, value)


def _dilate_once(mask):
    """Binary dilation by the 3^3 cube, outside = 0 (= scipy's binary_dilation with it): one 3-wide OR per axis.
    A bool numpy array or torch tensor (on its device)."""
    out = mask
    for axis in range(mask.ndim):
        hi, lo = _axis_pairs(mask.ndim, axis)
        grown = _copy(out)
        grown[hi] |= out[lo]
        grown[lo] |= out[hi]
        out = grown
    return out if out is not mask else _copy(mask)


def _erode_once(mask):
    """Binary erosion by the 3^3 cube, outside = 0 (= scipy's binary_erosion with it): one 3-wide AND per axis.
    A bool numpy array or torch tensor (on its device)."""
    out = mask
    for axis in range(mask.ndim):
        hi, lo = _axis_pairs(mask.ndim, axis)
        shrunk = _copy(out)
        shrunk[hi] &= out[lo]
        shrunk[lo] &= out[hi]
        edge = [slice(None)] * mask.ndim
        for end in (0, -1):
            edge[axis] = end
            shrunk[tuple(edge)] = False
        out = shrunk
    return out if out is not mask else _copy(mask)


def _close(mask):
    """Binary closing by the 3^3 cube, outside = 0 in both steps (= scipy's binary_closing with it)."""
    return _erode_once(_dilate_once(mask))


def _dilate(mask, times: int = 1):
    for _ in range(times):
        mask = _dilate_once(mask)
    return mask


def _workers(voxels: int = 0) -> int:
    """Threads for the per-organ labelling of a `voxels`-voxel map: the cores this process may use, at most 16, and
    at most as many as hold their scratch arrays (~16 bytes a voxel each) in 8 GiB."""
    return max(1, min(usable_cores(), 16, (8 << 30) // max(16 * voxels, 1)))


def _dropped_pieces(sub: np.ndarray, volume_size: int | None = None) -> tuple[np.ndarray | None, bool]:
    """What the reference's largest-piece rule drops from a mask given whole (`sub`) or as the box `sub` of a
    volume of `volume_size` voxels holding every mask voxel: (voxels of `sub` dropped, or None when none; whether
    the background goes too, which happens only when a piece outnumbers it)."""
    from scipy import ndimage

    pieces, n = ndimage.label(sub, _CUBE)
    if n < 1:
        return None, False
    inside = pieces[sub]  # (counting the mask's voxels only: cheaper than the whole box)
    counts = np.bincount(inside, minlength=n + 1)
    counts[0] = (volume_size or sub.size) - inside.size  # the background, the rest of the volume included
    values = np.nonzero(counts)[0]
    keep = values[np.argsort(counts[values])[::-1][:2]]
    if len(values) <= len(keep):
        return None, False
    dropped = pieces != keep[0]
    dropped &= pieces != keep[1]
    return dropped, bool(0 not in keep)


def _occupied_planes(mask: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Per axis, the plane indices that hold a voxel of `mask` plus the first of each run of empty planes after one:
    the box with the other empty planes left out has the same 26-connected pieces, numbered in the same (raster)
    order. None when no plane can go (nothing to gain)."""
    keep = []
    for axis in range(mask.ndim):
        hit = occupancy(mask, axis)
        kept = hit.copy()
        kept[1:] |= hit[:-1]
        keep.append(np.nonzero(kept)[0])
    return None if all(len(k) == n for k, n in zip(keep, mask.shape)) else tuple(keep)


def _dropped_pieces_boxed(sub: np.ndarray, volume_size: int) -> tuple[np.ndarray | None, bool]:
    """`_dropped_pieces` of a box `sub` holding every voxel of a mask, labelled without its spare empty planes."""
    planes = _occupied_planes(sub)
    if planes is None:
        return _dropped_pieces(sub, volume_size)
    dropped, background_too = _dropped_pieces(sub[np.ix_(*planes)], volume_size)
    if dropped is None:
        return None, background_too
    full = np.full(sub.shape, background_too)  # (the planes left out hold background only)
    full[np.ix_(*planes)] = dropped
    return full, background_too


def _keep_largest(label: np.ndarray, ids, fill: int) -> np.ndarray:
    """The reference's `supress_non_largest_components`: pieces are found on `label` as given, then every dropped
    voxel of every id becomes `fill`. Returns a new array. The ids are labelled in a thread pool."""
    from scipy import ndimage

    found = ndimage.find_objects(label if label.dtype.kind in "ui" else label.astype(np.int32))
    boxes = [found[i - 1] for i in dict.fromkeys(ids) if 0 < i <= len(found) and found[i - 1] is not None]
    ids = [i for i in dict.fromkeys(ids) if 0 < i <= len(found) and found[i - 1] is not None]

    def one(i_box):
        i, box = i_box
        return _dropped_pieces_boxed(label[box] == i, label.size)

    workers = min(_workers(label.size), len(boxes))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, zip(ids, boxes)))
    else:
        results = [one(ib) for ib in zip(ids, boxes)]
    dropped = np.zeros(label.shape, bool)
    for box, (sub_dropped, background_too) in zip(boxes, results):
        if sub_dropped is not None:
            dropped[box] |= sub_dropped
        if background_too:  # (outside the box: all background of this id)
            outside = np.ones(label.shape, bool)
            outside[box] = False
            dropped |= outside
    out = label.copy()
    out[dropped] = fill
    return out


def _grown(box: tuple[slice, ...], by: int, shape) -> tuple[slice, ...]:
    """`box` grown by `by` voxels on every side, clipped to a volume of `shape`."""
    return tuple(slice(max(s.start - by, 0), min(s.stop + by, n)) for s, n in zip(box, shape))


def _closing_fill(label, i: int, ops, box: tuple[slice, ...] | None = None, times: int = 1) -> tuple[slice, ...]:
    """The reference's `organ_fill_by_closing`, `times` times: the mask of `i`, dilated and eroded twice, is written
    as `i` over any label. `box`: a box known to hold every voxel of `i` (found when None). Returns a box that holds
    every voxel of `i` afterwards (two closings reach at most 2 voxels beyond the mask)."""
    for _ in range(times):
        if box is None:
            box = ops.bounding_box(label == i)
        if any(s.stop <= s.start for s in box):
            return box
        sub = label[_grown(box, 3, label.shape)]
        _fill(sub, _close(_close(sub == i)), i)
        box = _grown(box, 2, label.shape)
    return box


def _regrow(label, i: int, where, ops) -> None:
    """The reference's `organ_fill_by_removed_mask`: voxels of `where` within 3 voxels of `i` become `i`."""
    mask = label == i
    box = ops.bounding_box(mask, pad=3)  # (all that 3 dilations can reach)
    if any(s.stop <= s.start for s in box):
        return
    sub = label[box]
    _fill(sub, _dilate(mask[box], 3) & where[box], i)


class HostOps:
    """What the rules need from an array library, for numpy arrays (scipy's labelling, organs in a thread pool).
    `mask_postprocess_torch.DeviceOps` is the same for tensors on their device."""

    bounding_box = staticmethod(bounding_box)
    keep_largest = staticmethod(_keep_largest)

    @staticmethod
    def isin(label: np.ndarray, ids) -> np.ndarray:
        return np.isin(label, ids)

    @staticmethod
    def where_else_zero(mask: np.ndarray, label: np.ndarray) -> np.ndarray:
        return np.where(mask, label, 0).astype(label.dtype)

    @staticmethod
    def dropped(mask: np.ndarray) -> np.ndarray:
        """The voxels of `mask` that the largest-piece rule drops (the rule applied to the mask as one id)."""
        out = np.zeros(mask.shape, bool)
        box = bounding_box(mask)
        if all(s.stop > s.start for s in box):
            sub_dropped, _ = _dropped_pieces_boxed(mask[box], mask.size)
            if sub_dropped is not None:
                out[box] = sub_dropped & mask[box]
        return out

    @staticmethod
    def boxes(label: np.ndarray, ids) -> dict[int, tuple[slice, ...]]:
        """{id: its bounding box} for the ids present in `label`."""
        from scipy import ndimage

        found = ndimage.find_objects(label.astype(np.int32, copy=False))
        return {i: found[i - 1] for i in dict.fromkeys(ids) if i <= len(found) and found[i - 1] is not None}

    @staticmethod
    def most_frequent(values: np.ndarray) -> int:
        """The most frequent of non-negative integers (the smallest on ties)."""
        return int(np.bincount(values.astype(np.int64)).argmax())


def _ring_mode(label, tumour, ops) -> int | None:
    """Most frequent non-zero label in the 1-voxel ring around `tumour` (smallest on ties); None if none."""
    values = label[_dilate(tumour) & ~tumour]
    values = values[values != 0]
    return ops.most_frequent(values) if values.shape[0] else None


def clean_label_map(label, anatomy_sizes, ops):
    """The rules (module docstring), written once over the array operations `ops` (`HostOps` or the device one):
    a label map (X, Y, Z), 132-label vocabulary -> the cleaned map (same shape and dtype, a new array)."""
    vessel, airway = label == HEPATIC_VESSEL, label == AIRWAY
    # 1. body: one piece
    body = _erode_once(label > 0)
    body &= ~ops.dropped(body)
    out = ops.where_else_zero(_dilate_once(body), label)
    # 2. tumours: the others to their host, the requested one closed and (most) in one piece
    target = target_tumour(anatomy_sizes)
    for tumour in TUMOUR_LABELS:
        if tumour != target:
            _fill(out, out == tumour, TUMOUR_HOSTS[tumour])
        else:
            _closing_fill(out, tumour, ops, times=2)
    if target is not None and target not in TUMOURS_SEVERAL_PIECES:
        out = ops.keep_largest(out, [target], BODY)
    target_mask = out == target if target is not None else None
    # 3. organs and vertebrae in one piece, the bowel in one piece (only small bowel and colon leave it), then each
    # organ closed
    organs = ORGANS + (VERTEBRAE if target != 128 else ())
    data = ops.keep_largest(out, organs, BODY)
    organ_removed = out != data
    bowel_removed = ops.dropped(ops.isin(data, BOWEL)) & ops.isin(data, (19, 62))
    _fill(data, bowel_removed, BODY)
    boxes = ops.boxes(data, organs)
    for organ in organs:
        if organ in boxes:
            boxes[organ] = _closing_fill(data, organ, ops, boxes[organ])
    # 4. the requested tumour's refills
    if target == 23 and bool(target_mask.any()):
        tumour = data == 23
        ring = _dilate(tumour)
        mode = _ring_mode(data, tumour, ops)
        if mode in LUNG_LOBES:
            ring = _dilate(ring)
            _regrow(data, mode, ring & ~tumour, ops)
        ring = _dilate(ring)
        _regrow(data, 23, ring & organ_removed, ops)
        for lobe in LUNG_LOBES:
            _closing_fill(data, lobe, ops, times=3)
    elif target == 26 and bool(target_mask.any()):
        for _ in range(2):
            _regrow(data, LIVER, bowel_removed, ops)
        for _ in range(2):
            _regrow(data, SPLEEN, organ_removed, ops)
        _regrow(data, 26, _dilate(data == 26, 2) & organ_removed, ops)
        # The reference then keeps the largest piece of "tumour + vessel + liver" through a test (sum of the three
        # disjoint masks > 1) that no voxel passes: nothing becomes body, and the tumour mask it restores at the end
        # is empty. Reproduced: the hepatic tumour is not written back.
        target_mask = None
        _closing_fill(data, LIVER, ops, times=3)
    elif target == 27 and bool(target_mask.any()):
        _regrow(data, 27, _dilate(data == 27, 2) & organ_removed, ops)
    # 5. vessels -> liver; airway and the requested tumour back
    _fill(data, vessel, LIVER)
    _fill(data, airway, AIRWAY)
    if target_mask is not None:
        _fill(data, target_mask, target)
    return data


def postprocess_mask(label: np.ndarray, anatomy_sizes) -> np.ndarray:
    """A generated label map (X, Y, Z), 132-label vocabulary -> the cleaned map (same shape and dtype)."""
    return clean_label_map(label, anatomy_sizes, HostOps)
