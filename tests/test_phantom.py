"""Procedural CT phantoms: shapes, labels, HU per organ, quality check, determinism, grid independence, dataset."""

import json

import nibabel as nib
import numpy as np
import pytest

from fastmaisi import labels as L
from fastmaisi.phantom import make_phantom, phantom_main, write_dataset

LOBES = (28, 29, 30, 31, 32)


@pytest.fixture(scope="module")
def default():
    return make_phantom(seed=0)


def _volume_ml(label, ids, spacing):
    return np.isin(label, ids).sum() * float(np.prod(spacing)) / 1000.0


def test_shape_dtype_and_range(default):
    image, label = default
    assert image.shape == label.shape == (96, 96, 64)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert -1024.0 <= image.min() and image.max() <= 3071.0
    L.validate_label_map(label)  # every id is in the vocabulary


def test_labels_present(default):
    _, label = default
    present = set(np.unique(label).tolist())
    wanted = {L.BODY, 1, 3, 4, 5, 14, 12, 6, 115, *LOBES, L.LABELS["sternum"], L.LABELS["spinal cord"]}
    assert wanted <= present, sorted(wanted - present)
    vertebrae = present & set(range(33, 57))
    ribs = present & set(range(63, 87))
    assert len(vertebrae) >= 6 and len(ribs) >= 12
    assert not present & {23, 26}  # no tumour unless asked


def test_anatomy_sides_and_order(default):
    """RAS index order: liver on the patient's right (high x), spine posterior (low y), lungs superior (high z)."""
    _, label = default
    centre = {i: np.argwhere(label == i).mean(0) for i in (1, 3, 5, 14, 115, 30, 29, 37)}
    assert centre[1][0] > 48 > centre[3][0]  # liver right, spleen left
    assert centre[5][0] > 48 > centre[14][0]  # right kidney right, left kidney left
    assert centre[37][1] < centre[1][1] < centre[115][1] + 10  # L1 vertebra behind the organs
    assert centre[30][2] > centre[1][2] > centre[5][2]  # lung above liver above kidney


def test_hu_per_organ(default):
    image, label = default
    nominal = {1: 105, 3: 120, 5: 165, 14: 165, 115: 150, 6: 160, 4: 85}
    for organ, hu in nominal.items():
        assert abs(np.median(image[label == organ]) - hu) < 35, L.label_name(organ)
    assert np.median(image[np.isin(label, LOBES)]) == pytest.approx(-850, abs=80)
    assert 250 < np.median(image[np.isin(label, range(33, 57))]) < 800
    body = label > 0
    from scipy import ndimage

    far_outside = ~ndimage.binary_dilation(body, np.ones((3, 3, 3), bool), iterations=2)  # beyond the blur
    assert far_outside.any() and np.all(image[far_outside] == -1000.0)
    assert 5.0 < image[label == 1].std() < 40.0  # noise + texture, not flat


@pytest.mark.parametrize("seed,tumour", [(0, None), (1, "liver"), (2, "lung"), (3, None), (4, "liver"),
                                         (5, "lung")])
def test_quality_check_passes(seed, tumour):
    image, label = make_phantom(seed=seed, tumour=tumour)
    result = L.quality_check(image, label)
    assert result.passed, (result.failed, result.medians)
    assert all(result.medians[o] is not None for o in ("liver", "spleen", "pancreas", "kidney", "lung", "bone"))


@pytest.mark.parametrize("tumour,label_id,hosts", [("liver", 26, (1,)), ("lung", 23, LOBES)])
def test_tumour(tumour, label_id, hosts):
    image, label = make_phantom(seed=7, tumour=tumour)
    lesion = label == label_id
    assert lesion.sum() > 10
    from scipy import ndimage

    ring = ndimage.binary_dilation(lesion) & ~lesion
    assert np.isin(label[ring], hosts).mean() > 0.9  # surrounded by its host organ
    assert abs(np.median(image[lesion]) - np.median(image[label == hosts[0]])) > 20


def test_bad_tumour():
    with pytest.raises(ValueError, match="tumour='kidney'"):
        make_phantom(tumour="kidney")


def test_determinism_and_variation(default):
    image, label = default
    again_image, again_label = make_phantom(seed=0)
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    other_image, other_label = make_phantom(seed=1)
    assert (other_label != label).mean() > 0.02 and not np.allclose(other_image, image)
    liver = [_volume_ml(make_phantom(seed=s)[1], [1], (3, 3, 4)) for s in range(4)]
    assert np.ptp(liver) > 50.0  # organ sizes vary with the seed


def test_same_patient_on_any_grid():
    """One seed = one patient: organ volumes in mm^3 agree across grids covering the same field of view."""
    a_sp, b_sp = (3.0, 3.0, 4.0), (2.0, 2.0, 256.0 / 96)
    _, a = make_phantom((96, 96, 64), a_sp, seed=5)
    _, b = make_phantom((144, 144, 96), b_sp, seed=5)
    assert b.size > 3 * a.size
    for ids in ([1], [115], [5], [14], [12], list(LOBES), [L.BODY] + list(range(1, 200))):
        va, vb = _volume_ml(a, ids, a_sp), _volume_ml(b, ids, b_sp)
        assert vb == pytest.approx(va, rel=0.05), ids
    # a coarser grid of the same shape sees a 2x wider field of view: same organs, more of the body
    _, wide = make_phantom((96, 96, 64), (6.0, 6.0, 8.0), seed=5)
    assert _volume_ml(wide, [1], (6, 6, 8)) == pytest.approx(_volume_ml(a, [1], a_sp), rel=0.15)
    assert _volume_ml(wide, [3], (6, 6, 8)) > 0


@pytest.mark.parametrize("seed", [0, 3])
def test_body_envelope_recovers_the_body(seed):
    spacing = (3.0, 3.0, 4.0)
    image, label = make_phantom(seed=seed)
    stripped = np.where(label == L.BODY, 0, label).astype(np.uint8)
    body = label > 0

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(L.add_body_envelope(stripped, spacing=spacing) > 0, body) > 0.9  # labels only
    assert dice(L.add_body_envelope(stripped, image, spacing=spacing) > 0, body) > 0.97  # with the CT


def test_write_dataset_and_cli(tmp_path):
    path = write_dataset(tmp_path / "ds", 2, shape=(48, 48, 32), spacing=(6.0, 6.0, 8.0), seed=3, tumour="mixed")
    data = json.loads(path.read_text())["training"]
    assert [e["image"] for e in data] == ["phantom_0000_image.nii.gz", "phantom_0001_image.nii.gz"]
    first = data[0]
    assert first["dim"] == [48, 48, 32] and first["spacing"] == [6.0, 6.0, 8.0] and first["modality"] == "ct"
    assert first["top_region_index"] == [0, 1, 0, 0] and first["bottom_region_index"] == [0, 0, 1, 0]
    img = nib.load(tmp_path / "ds" / first["image"])
    lab = nib.load(tmp_path / "ds" / first["label"])
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, np.diag([6.0, 6.0, 8.0, 1.0])) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    ref_image, ref_label = make_phantom((48, 48, 32), (6.0, 6.0, 8.0), seed=3)
    assert np.array_equal(np.asarray(lab.dataobj), ref_label)
    assert np.abs(np.asarray(img.dataobj) - ref_image).max() <= 0.5
    assert (np.asarray(nib.load(tmp_path / "ds" / data[1]["label"]).dataobj) == 26).any()  # mixed: 2nd has liver tumour

    from fastmaisi.cli import main

    assert main(["phantom", "-o", str(tmp_path / "cli"), "-n", "1", "--size", "32", "32", "24",
                 "--spacing", "9", "9", "10"]) == 0
    assert (tmp_path / "cli" / "phantom_0000_label.nii.gz").exists()
    assert phantom_main(["-o", str(tmp_path / "x"), "-n", "1", "--size", "16", "16", "8", "--tumour", "lung"]) == 0
    with pytest.raises(SystemExit):
        phantom_main(["-o", str(tmp_path / "y"), "-n", "0"])
