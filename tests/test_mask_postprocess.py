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
