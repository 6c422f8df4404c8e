"""Clean-up of generated label maps (the reference's post-process after the mask DM)."""

from __future__ import annotations

import numpy as np

from fastmaisi.labels import BODY
from fastmaisi.pipelines.mask_postprocess import postprocess_mask, target_tumour

NO_TUMOUR = [0.1, 0.1, 0.1, 0.1, 0.1, -1, -1, -1, -1, -1]


def _torso():
    """A 40^3 box of body with a liver cube and a spine column of vertebra L1 (37)."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:35, 5:35, 5:35] = BODY
    label[8:20, 8:20, 8:20] = 1
    label[18:22, 28:32, 5:35] = 37
    return label


def test_target_tumour_is_the_last_requested_slot():
    assert target_tumour(NO_TUMOUR) is None
    assert target_tumour([0.1] * 5 + [0.01, -1, -1, -1, -1]) == 23
    assert target_tumour([0.1] * 5 + [0.01, -1, 0.02, -1, -1]) == 26


def test_clean_mask_is_unchanged():
    label = _torso()
    assert np.array_equal(postprocess_mask(label, NO_TUMOUR), label)


def test_stray_pieces_are_removed():
    label = _torso()
    label[25:27, 10:12, 25:27] = 1  # a liver island inside the body -> body
    label[0:2, 0:2, 0:2] = BODY  # a speck of body in the air -> background
    label[38:40, 38:40, 0:3] = 1  # an organ speck in the air -> background
    label[12, 12, 12] = BODY  # a one-voxel hole in the liver -> closed
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out[25:27, 10:12, 25:27] == BODY).all()
    assert (out[0:2, 0:2, 0:2] == 0).all() and (out[38:40, 38:40, 0:3] == 0).all()
    assert out[12, 12, 12] == 1
    assert (out == 1).sum() == 12 ** 3
    assert out.dtype == label.dtype and out.shape == label.shape


def test_tumours_other_than_the_requested_go_back_to_their_host():
    label = _torso()
    label[10:13, 10:13, 10:13] = 26  # hepatic tumour inside the liver
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out[10:13, 10:13, 10:13] == 1).all() and not (out == 26).any()
    asked = [0.1] * 5 + [-1, -1, 0.01, -1, -1]  # the hepatic tumour requested: kept
    out = postprocess_mask(label, asked)
    assert (out[10:13, 10:13, 10:13] == 26).all()


def test_hepatic_vessel_becomes_liver():
    label = _torso()
    label[14:16, 14:16, 8:20] = 25
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out[14:16, 14:16, 8:20] == 1).all()


def test_phantom_mask_barely_changes():
    """A real (phantom) label map is already clean: at most 1 % of its voxels move."""
    from fastmaisi.phantom import make_phantom

    _, label = make_phantom((64, 64, 64), (4.5, 4.5, 4.0), seed=3)
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out != label).mean() < 0.01
    assert set(np.unique(out)) <= set(np.unique(label))


# ---- the reference's rules, one hand-built map each (general_mask_generation_post_process in NVIDIA's utils.py)
LUNG_TUMOUR_ASKED = [0.1] * 5 + [0.01, -1, -1, -1, -1]
HEPATIC_TUMOUR_ASKED = [0.1] * 5 + [-1, -1, 0.01, -1, -1]


def test_rule_airway_and_hepatic_vessel_are_restored_everywhere():
    """Rule: the airway (132) and hepatic-vessel (25 -> liver) masks of the input are written back at the end,
    wherever they were, also outside the body (the body clean-up had zeroed them)."""
    label = _torso()
    label[0:2, 0:2, 30:33] = 132  # in the air
    label[38:40, 0:2, 30:33] = 25
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out[0:2, 0:2, 30:33] == 132).all() and (out[38:40, 0:2, 30:33] == 1).all()


def test_rule_pieces_are_26_connected():
    """Rule: largest piece with 26-connectivity: a block touching the liver only at a corner is part of it."""
    label = _torso()
    label[20:23, 20:23, 20:23] = 1  # corner (19,19,19)-(20,20,20): 26- but not 6-connected
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out[20:23, 20:23, 20:23] == 1).all()


def test_rule_closing_fill_writes_the_organ_over_any_label():
    """Rule (organ_fill_by_closing): an organ's closed mask is written over other labels and background alike."""
    label = _torso()
    label[12, 12, 12] = 100  # another label inside the liver
    label[15, 15, 15] = 0  # background inside the liver
    out = postprocess_mask(label, NO_TUMOUR)
    assert out[12, 12, 12] == 1 and out[15, 15, 15] == 1


def test_rule_bowel_keeps_the_largest_piece_of_the_union():
    """Rule: of stomach + duodenum + small bowel + colon together only the largest piece stays; small bowel and
    colon outside it become body, even when they are one piece each."""
    label = _torso()
    label[22:30, 8:16, 22:30] = 12  # stomach
    label[22:30, 16:20, 22:30] = 19  # small bowel touching it
    label[8:12, 24:28, 24:28] = 62  # colon, one piece, away from them
    out = postprocess_mask(label, NO_TUMOUR)
    assert (out[8:12, 24:28, 24:28] == BODY).all()
    assert (out[22:30, 16:20, 22:30] == 19).all() and (out[22:30, 8:16, 22:30] == 12).all()


def _rod_in(host: int, tumour: int):
    """A torso whose host organ holds a one-voxel-thin tumour rod (a hole the host's closing fills)."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:35, 5:35, 5:35] = BODY
    label[8:20, 8:20, 8:20] = host
    label[13, 13, 11:16] = tumour
    return label


def test_rule_requested_tumour_is_written_back_but_not_the_hepatic_one():
    """Rule: the requested tumour's mask (taken before the organ closing-fills) is written back at the end. For a
    hepatic tumour the reference first intersects it with its 'tumour + vessel + liver' mask, which is empty (a sum of
    three disjoint masks > 1), so the liver's closing-fill keeps the voxels it took."""
    lung = postprocess_mask(_rod_in(29, 23), LUNG_TUMOUR_ASKED)
    assert (lung[13, 13, 11:16] == 23).all()
    liver = postprocess_mask(_rod_in(1, 26), HEPATIC_TUMOUR_ASKED)
    assert (liver[13, 13, 11:16] == 1).all()
    other = postprocess_mask(_rod_in(1, 26), NO_TUMOUR)  # not asked for: back to the liver anyway
    assert (other[13, 13, 11:16] == 1).all()


def test_rule_lung_tumour_refills():
    """Rules (lung tumour asked): (1) voxels within 2 of the tumour, not tumour, within 3 of the majority lobe of its
    ring become that lobe; (2) voxels the organ rule dropped (stray pieces -> body) within 3 of the tumour become
    tumour. Without the request (tumour -> lobe 28) neither happens."""
    label = _torso()
    label[8:30, 8:30, 8:20] = 29
    label[14:18, 14:18, 16:20] = 23  # tumour in the lobe's top layers
    label[14:18, 14:18, 21:23] = 29  # a separate lobe piece 2 voxels above it: dropped by the organ rule
    asked = postprocess_mask(label, LUNG_TUMOUR_ASKED)
    assert (asked[12:20, 12:20, 20] == 29).all()  # (1): the body layer between tumour and piece
    assert (asked[14:18, 14:18, 21:23] == 23).all()  # (2)
    plain = postprocess_mask(label, NO_TUMOUR)
    assert (plain[12:20, 12:20, 20:23] == BODY).all()


def _plain_rules(label, target):
    """The same rules written plainly on whole volumes with MONAI's morphology (the reference's own ops) and no
    bounding boxes: the oracle for the boxed implementation."""
    import torch
    from monai.transforms.utils_morphological_ops import dilate, erode
    from scipy import ndimage

    def dil(m, n=1):
        t = torch.from_numpy(np.asarray(m, np.float32))[None, None]
        for _ in range(n):
            t = dilate(t, 3, pad_value=0.0)
        return t[0, 0].numpy() > 0

    def ero(m):
        return erode(torch.from_numpy(np.asarray(m, np.float32))[None, None], 3, pad_value=0.0)[0, 0].numpy() > 0

    def close_fill(d, i):
        m = d == i
        for _ in range(2):
            m = ero(dil(m))
        d[m] = i

    def dropped(mask):
        comp, _ = ndimage.label(mask, np.ones((3, 3, 3)))
        uv, uc = np.unique(comp, return_counts=True)
        if len(uv) < 2:
            return np.zeros(mask.shape, bool)
        keep = uv[np.argsort(uc)[::-1][:2]]
        return ~np.isin(comp, keep)

    def keep_largest(d, ids, fill):
        drop = np.zeros(d.shape, bool)
        for i in ids:
            drop |= dropped(d == i)
        out = d.copy()
        out[drop] = fill
        return out

    vessel, airway = label == 25, label == 132
    body = ero(label > 0)
    body &= ~dropped(body)
    v = label * dil(body)
    for t, host in {23: 28, 24: 4, 26: 1, 27: 62, 128: 200}.items():
        if t != target:
            v[v == t] = host
        else:
            close_fill(v, t)
            close_fill(v, t)
    if target not in (None, 26, 128):
        v = keep_largest(v, [target], 200)
    tumour = v == target
    organs = [1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9, 10] + (
        list(range(33, 60)) if target != 128 else [])
    d = keep_largest(v, organs, 200)
    removed = v != d
    gut_removed = dropped(np.isin(d, (12, 13, 19, 62))) & np.isin(d, (19, 62))
    d[gut_removed] = 200
    for o in organs:
        close_fill(d, o)
    if target == 23 and tumour.any():
        t23 = d == 23
        ring = dil(t23)
        vals = d[ring & ~t23]
        vals = vals[vals > 0]
        mode = int(np.bincount(vals).argmax()) if vals.size else None
        if mode in (28, 29, 30, 31, 32):
            ring = dil(ring)
            d[dil(d == mode, 3) & ring & ~t23] = mode
        ring = dil(ring)
        d[dil(d == 23, 3) & ring & removed] = 23
        for lobe in (28, 29, 30, 31, 32):
            for _ in range(3):
                close_fill(d, lobe)
    d[vessel] = 1
    d[airway] = 132
    if target is not None:
        d[tumour] = target
    return d


def test_boxed_implementation_equals_the_plain_rules_on_a_noisy_phantom():
    """A phantom label map with salt noise (stray voxels of organs, vertebrae, bowel, body) and a lung tumour."""
    from fastmaisi.phantom import make_phantom

    _, label = make_phantom((48, 48, 48), (6.0, 6.0, 5.5), seed=5)
    rng = np.random.default_rng(0)
    ids = np.array([1, 3, 4, 5, 12, 19, 28, 29, 37, 62, 25, 132, 200])
    noise = rng.random(label.shape) < 0.01
    label[noise] = rng.choice(ids, noise.sum())
    lobe = np.argwhere(label == 28)
    c = lobe[len(lobe) // 2]
    label[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2] = 23
    for sizes, target in ((NO_TUMOUR, None), (LUNG_TUMOUR_ASKED, 23)):
        assert np.array_equal(postprocess_mask(label, sizes), _plain_rules(label, target))
