"""Body envelope, table removal (NVIDIA's add_body_envelope step 8): air inside the envelope that is >= 5 % of the
body (a hollow CT table) goes, only when the segmentation labels the lungs."""

import numpy as np
import pytest

from fastmaisi.labels import BODY, add_body_envelope, remove_table


def _phantom_with_table():
    """(label, image_hu): an elliptic torso (40 HU) with labelled air-filled lungs (28) and a liver (1), a small
    unlabelled gas pocket, lying on a hollow table (0 HU shell round an air core) that touches it along its back."""
    X, Y, Z = 48, 48, 16
    x, y = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    torso = ((x - 24) / 18.0) ** 2 + ((y - 22) / 13.0) ** 2 <= 1.0  # back at y = 35
    hu = np.full((X, Y, Z), -1000.0, np.float32)
    label = np.zeros((X, Y, Z), np.uint8)
    hu[torso] = 40.0
    lung = ((x - 16) / 5.0) ** 2 + ((y - 20) / 5.0) ** 2 <= 1.0
    hu[lung], label[lung] = -850.0, 28
    liver = ((x - 30) / 5.0) ** 2 + ((y - 22) / 5.0) ** 2 <= 1.0
    hu[liver], label[liver] = 60.0, 1
    hu[24:26, 14:16, 6:8] = -950.0  # bowel gas: enclosed, unlabelled, tiny
    hu[6:42, 34:44, :] = 0.0  # the table: a shell ...
    hu[8:40, 36:42, 1:-1] = -1000.0  # ... round an air core (enclosed: not connected to the outside air)
    core = np.zeros_like(torso[..., None].repeat(Z, 2))
    core[8:40, 36:42, 1:-1] = True
    return label, hu, core


def test_table_air_is_removed_when_the_lungs_are_labelled():
    label, hu, core = _phantom_with_table()
    out = add_body_envelope(label, hu, spacing=(3.0, 3.0, 3.0), table_mm=1.0)
    assert (out[core] == 0).all()  # the table's air core is out of the body
    assert out[25, 15, 7] == BODY  # the small gas pocket stays inside
    assert (out[label > 0] == label[label > 0]).all()  # labels untouched
    assert (out[24, 22 - 10, :] == BODY).all()  # torso wall is body


@pytest.mark.parametrize("kwargs", [dict(seg_has_lung=False), dict(table_fraction=None), dict(table_fraction=0.9)])
def test_table_kept_without_lungs_or_with_removal_off(kwargs):
    label, hu, core = _phantom_with_table()
    out = add_body_envelope(label, hu, spacing=(3.0, 3.0, 3.0), table_mm=1.0, **kwargs)
    assert (out[core] == BODY).all()


def test_no_lung_labels_means_no_removal_by_default():
    label, hu, core = _phantom_with_table()
    label[label == 28] = 0  # lungs not segmented: their air would look like a table
    out = add_body_envelope(label, hu, spacing=(3.0, 3.0, 3.0), table_mm=1.0)
    assert (out[core] == BODY).all()


def test_remove_table_counts_every_table_sized_piece():
    out = np.full((20, 20, 4), BODY, np.uint8)
    hu = np.zeros(out.shape, np.float32)
    hu[0:4, :, :] = hu[16:20, :, :] = -1000.0  # two rails, each 20 % of the body
    hu[10, 10, 0] = -1000.0  # one air voxel: kept
    assert remove_table(out, hu, fraction=0.05) == 2 * 4 * 20 * 4
    assert (out[0:4] == 0).all() and (out[16:20] == 0).all() and out[10, 10, 0] == BODY
