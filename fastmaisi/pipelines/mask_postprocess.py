"""Clean-up of a generated label map, as the reference does after the mask DM (general_mask_generation_post_process).

A decoded mask carries stray islands (a piece of liver beside the spleen, body specks in the air); the ControlNet
then paints tissue there. The steps, in the reference's order (shared/reference/pipeline.md, paired workflow 6):

1. the body: erode (3^3), keep the largest piece, dilate back; everything outside becomes background (0);
2. tumours other than the requested one (the last tumour slot of the organ-size vector that is not -1) go back to
   their host organ (lung tumour -> right lung lower lobe, pancreatic -> pancreas, hepatic -> liver, colon -> colon,
   bone lesion -> body);
3. the requested tumour is closed twice (3^3); lung / pancreatic / colon tumours keep their largest piece;
4. the solid organs, lung lobes and vessels, the vertebrae (unless a bone lesion was asked for) and the bowel keep
   their largest piece; the other pieces become body (200); then each is closed (3^3) into body voxels it encloses;
5. hepatic vessels become liver, the airway and the requested tumour are put back.

Left out: the reference's tumour-specific refills (the lobe ring around a lung tumour, liver/spleen refill, kidney
closing for label 129).
"""

from __future__ import annotations

import numpy as np

from fastmaisi.labels import ANATOMY_SIZE_TUMOURS, BODY

TUMOUR_LABELS = (23, 24, 26, 27, 128)  # the tumour slots of the organ-size vector, in slot order
TUMOUR_HOSTS = {23: 28, 24: 4, 26: 1, 27: 62, 128: BODY}
TUMOURS_ONE_PIECE = (23, 24, 27)  # hepatic tumours and bone lesions may have several
ORGANS = (1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9)
VERTEBRAE = tuple(range(33, 60))
BOWEL = (12, 13, 19, 62)
HEPATIC_VESSEL, AIRWAY = 25, 132
_CUBE = np.ones((3, 3, 3), bool)


def target_tumour(anatomy_sizes) -> int | None:
    """The tumour label the organ-size vector asks for: the last tumour slot that is not -1 (None if all are)."""
    assert len(ANATOMY_SIZE_TUMOURS) == len(TUMOUR_LABELS)
    wanted = [lab for lab, v in zip(TUMOUR_LABELS, list(anatomy_sizes)[5:]) if v is not None and v != -1]
    return wanted[-1] if wanted else None


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    pieces, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == sizes.argmax()


def _boxes(label: np.ndarray, ids, pad: int = 0) -> dict[int, tuple]:
    """id -> its bounding box grown by `pad` voxels (ids absent from `label` left out)."""
    from scipy import ndimage

    found = ndimage.find_objects(label.astype(np.int32, copy=False))
    out = {}
    for i in ids:
        if i <= len(found) and found[i - 1] is not None:
            out[i] = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(found[i - 1], label.shape))
    return out


def _keep_largest_piece(label: np.ndarray, ids, rest: int) -> None:
    for i, box in _boxes(label, ids).items():
        sub = label[box]
        mask = sub == i
        sub[mask & ~_largest(mask)] = rest


def _close_into_body(label: np.ndarray, ids) -> None:
    """Each organ's 3^3 closing claims the body voxels it encloses (the reference's closing-fill)."""
    from scipy import ndimage

    for i, box in _boxes(label, ids, pad=2).items():
        sub = label[box]
        closed = ndimage.binary_closing(sub == i, _CUBE)
        sub[closed & (sub == BODY)] = i


def postprocess_mask(label: np.ndarray, anatomy_sizes) -> np.ndarray:
    """A generated label map (X, Y, Z), 132-label vocabulary -> the cleaned map (same shape and dtype)."""
    from scipy import ndimage

    out = label.copy()
    vessel, airway = out == HEPATIC_VESSEL, out == AIRWAY
    # 1. body: one piece
    body = ndimage.binary_erosion(out > 0, _CUBE)
    body = ndimage.binary_dilation(_largest(body), _CUBE) if body.any() else body
    out[~body] = 0
    # 2-3. tumours
    target = target_tumour(anatomy_sizes)
    for tumour, host in TUMOUR_HOSTS.items():
        if tumour != target:
            out[out == tumour] = host
    tumour_mask = None
    if target is not None and (out == target).any():
        tumour_mask = ndimage.binary_closing(ndimage.binary_closing(out == target, _CUBE), _CUBE) & body
        if target in TUMOURS_ONE_PIECE:
            tumour_mask = _largest(tumour_mask)
            out[(out == target) & ~tumour_mask] = BODY
    # 4. organs, vertebrae and bowel in one piece, then closed
    one_piece = ORGANS + (VERTEBRAE if target != 128 else ())
    _keep_largest_piece(out, one_piece, BODY)
    _keep_largest_piece(out, BOWEL, BODY)
    _close_into_body(out, tuple(dict.fromkeys(one_piece + BOWEL)))
    # 5. vessels -> liver; airway and the target tumour back
    out[vessel & body] = 1
    out[airway & body] = AIRWAY
    if tumour_mask is not None:
        out[tumour_mask] = target
    return out
