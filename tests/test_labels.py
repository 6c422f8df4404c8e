"""Label vocabulary, conditioning encodings, validation, body envelope and the median-HU quality check."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmaisi import labels as L

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"


def _official(name):
    path = CONFIGS / name
    if not path.exists():
        pytest.skip("shared/reference/configs not beside the checkout")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ vocabulary
def test_import_is_torch_and_scipy_free():
    code = "import sys, fastmaisi.labels; print('torch' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_vocabulary_basics():
    assert len(L.LABELS) == 133 and L.BODY == 200 and L.LABELS["body"] == 200
    assert L.LABELS["liver"] == 1 and L.LABELS["aorta"] == 6 and L.LABELS["heart"] == 115
    assert L.label_name(0) == "background" and L.label_name(115) == "heart"
    assert L.VALID_IDS == set(range(1, 133)) | {200}
    with pytest.raises(ValueError, match="not in the MAISI vocabulary"):
        L.label_name(150)
    with pytest.raises(ValueError, match="did you mean 'liver'"):
        L.label_id("livr")


def test_vocabulary_equals_official_files():
    assert L.LABELS == _official("label_dict.json")
    assert L.MODALITIES == _official("modality_mapping.json")
    remap = _official("label_dict_124_to_132.json")
    for name, (src, dst) in remap.items():
        assert L.MASK_AE_TO_LABEL[src] == dst, name
    assert len(L.MASK_AE_TO_LABEL) == len(remap) == 125


def test_qc_thresholds_match_reference_rule():
    ours = L.qc_thresholds()
    official = _official("image_median_statistics_ct.json")
    assert ours == L.qc_thresholds(official) == L.qc_thresholds(CONFIGS / "image_median_statistics_ct.json")
    expected = {"liver": (-21.6, 162.0), "spleen": (-43.1, 184.1), "pancreas": (-56.6, 149.5),
                "kidney": (-130.6, 267.3), "lung": (-1088.6, -367.0), "bone": (71.4, 1000.0), "brain": (-951.0, 369.5)}
    for organ, (low, high) in expected.items():
        assert ours[organ] == pytest.approx((low, high), abs=0.06), organ


# ------------------------------------------------------------------------------------------------ modality
@pytest.mark.parametrize("given,code", [("ct", 1), ("CT", 1), ("mri_t1", 9), ("9", 9), (9, 9), (np.int64(3), 3),
                                        ("unknown", 0), ("mri_swi_skull_stripped", 32)])
def test_modality_code(given, code):
    assert L.modality_code(given) == code


@pytest.mark.parametrize("bad", ["pet", "5", 200, True, None])
def test_modality_code_unknown(bad):
    with pytest.raises(ValueError, match="unknown modality|expected a name") as err:
        L.modality_code(bad)
    if bad not in (True,):
        assert "mri_t1 (9)" in str(err.value)


def test_ct_modality_range():
    assert L.is_ct_modality(1) and L.is_ct_modality(3) and not L.is_ct_modality(0) and not L.is_ct_modality(9)


# ------------------------------------------------------------------------------------------------ anatomy sizes
def test_anatomy_size_vector():
    v = L.anatomy_size_vector({"liver": 0.5, "hepatic tumor": 0.2, "colon": -1})
    assert v == [-1.0, 0.5, -1.0, -1.0, -1.0, -1.0, -1.0, 0.2, -1.0, -1.0]
    assert L.anatomy_size_vector([("gallbladder", 1)], fill=None)[:2] == [1.0, None]
    assert len(L.ANATOMY_SIZE_SLOTS) == 10 and L.ANATOMY_SIZE_SLOTS[9] == "bone lesion"


@pytest.mark.parametrize("sizes,match", [
    ({"kidney": 0.5, "spleen": 0.2}, r"unknown name\(s\) \['kidney', 'spleen'\]; allowed: \['gallbladder'"),
    ({"lung tumor": 0.5, "bone lesion": 0.2}, "at most one tumour"),
    ({"liver": 1.5}, r"must be in \[0, 1\] or -1"),
    ({"liver": -0.5}, r"must be in \[0, 1\] or -1"),
    ({"liver": "big"}, "is not a number"),
    ([("liver", 0.5), ("liver", 0.6)], "more than once"),
])
def test_anatomy_size_vector_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        L.anatomy_size_vector(sizes)


def test_snap_anatomy_size_takes_nearest_entry_then_user_values():
    db = [{"organ_size": [0.1] * 10}, {"organ_size": [0.5, 0.6, 0.7, 0.8, 0.9, -1, -1, -1, -1, -1]}]
    assert L.snap_anatomy_size({"liver": 0.55}, db) == [0.5, 0.55, 0.7, 0.8, 0.9, -1, -1, -1, -1, -1]
    assert L.snap_anatomy_size({"liver": 0.12}, [e["organ_size"] for e in db])[0] == 0.1


# ------------------------------------------------------------------------------------------------ bit channels
def test_binarize_round_trip_all_ids():
    ids = torch.arange(256).view(1, 1, 4, 8, 8)
    bits = L.binarize_labels(ids)
    assert bits.shape == (1, 8, 4, 8, 8) and bits.dtype == torch.float32
    assert set(bits.unique().tolist()) == {0.0, 1.0}
    rebuilt = sum(bits[:, k].long() << k for k in range(8))  # LSB first
    assert torch.equal(rebuilt, ids[:, 0])
    assert torch.equal(L.unbinarize_labels(bits), ids)


def test_binarize_body_bits_shapes_and_inputs():
    body = L.binarize_labels(np.full((2, 3, 4), 200, dtype=np.uint8))  # bare (D, H, W) numpy map
    assert body.shape == (1, 8, 2, 3, 4)
    assert body[0, :, 0, 0, 0].tolist() == [0, 0, 0, 1, 0, 0, 1, 1]  # 200 = 0b11001000
    half = L.binarize_labels(torch.tensor([[[[[1.0, 132.0]]]]]), dtype=torch.float16)
    assert half.dtype == torch.float16 and half[0, :, 0, 0, 1].tolist() == [0, 0, 1, 0, 0, 0, 0, 1]
    assert body.is_contiguous()
    ids = torch.randint(0, 256, (2, 1, 3, 4, 5), dtype=torch.uint8)
    cl = L.binarize_labels(ids, channels_last=True)  # the expansion's own layout, as CUDA inference takes it
    assert cl.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(cl, L.binarize_labels(ids))
    nine = L.binarize_labels(ids, bits=9)
    assert torch.equal(nine, torch.cat([L.binarize_labels(ids), torch.zeros(2, 1, 3, 4, 5)], 1))


@pytest.mark.parametrize("bad,match", [(torch.tensor([256]).view(1, 1, 1, 1, 1), "ids above 255"),
                                       (torch.tensor([-1]).view(1, 1, 1, 1, 1), r"0\.\.255"),
                                       (torch.zeros(1, 2, 3, 3, 3, dtype=torch.long), "expected shape"),
                                       (torch.tensor([0.5]).view(1, 1, 1, 1, 1), "non-integer")])
def test_binarize_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        L.binarize_labels(bad)


# ------------------------------------------------------------------------------------------------ 124 -> 132
def test_remap_mask_labels():
    raw = np.arange(125, dtype=np.int16).reshape(5, 5, 5)
    out = L.remap_mask_labels(raw)
    assert out.dtype == np.uint8 and out.shape == raw.shape
    assert out.ravel()[[0, 1, 2, 17, 18, 121, 122, 123, 124]].tolist() == [0, 1, 3, 22, 23, 128, 129, 132, 200]
    t = L.remap_mask_labels(torch.from_numpy(raw))
    assert torch.equal(t, torch.from_numpy(out))
    with pytest.raises(ValueError, match=r"0\.\.124"):
        L.remap_mask_labels(np.array([125]))


# ------------------------------------------------------------------------------------------------ validation
def test_validate_label_map():
    lab = np.zeros((4, 4, 4), np.int32)
    lab[0], lab[1, 0, 0] = 200, 1
    info = L.validate_label_map(lab)
    assert info["has_body"] and info["ids"] == [0, 1, 200] and info["counts"][1] == 1
    assert not L.validate_label_map(np.ones((2, 2, 2), np.float32))["has_body"]


@pytest.mark.parametrize("values,match", [([1, 300], r"outside 0\.\.255"), ([1, -2], r"outside 0\.\.255"),
                                          ([1, 150, 160, 170], r"not in the MAISI vocabulary: \[150, 160, 170\]"),
                                          ([1.0, 2.5], "non-integer")])
def test_validate_label_map_errors(values, match):
    with pytest.raises(ValueError, match=match):
        L.validate_label_map(np.array(values).reshape(1, 1, -1))


def test_validate_lists_at_most_ten_unknown_ids():
    with pytest.raises(ValueError, match=r"12 id\(s\) .*\[133, 134, .*, 142\] \.\.\.") as err:
        L.validate_label_map(np.arange(133, 145).reshape(2, 2, 3))
    assert "143" not in str(err.value)


# ------------------------------------------------------------------------------------------------ body envelope
def _torso(shape=(40, 40, 12)):
    """Elliptic 'body' with a few organs inside, 1.5 mm voxels."""
    x, y, _ = np.indices(shape)
    body = ((x - 20) / 16.0) ** 2 + ((y - 20) / 12.0) ** 2 <= 1
    lab = np.where(body, 200, 0).astype(np.uint8)
    organs = ((x - 20) / 13.0) ** 2 + ((y - 20) / 9.0) ** 2 <= 1
    lab[organs & (x < 20)], lab[organs & (x >= 20)] = 1, 3
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    return lab, image


def test_body_envelope_keeps_labels_and_fills_body():
    lab, image = _torso()
    stripped = np.where(lab == 200, 0, lab).astype(np.uint8)
    for kwargs in ({"spacing": (1.5, 1.5, 1.5), "margin_mm": 4.5}, {"image_hu": image, "spacing": (1.5, 1.5, 1.5)}):
        out = L.add_body_envelope(stripped, **kwargs)
        assert out.dtype == stripped.dtype
        assert np.array_equal(out[stripped > 0], stripped[stripped > 0])
        body, got = lab > 0, out > 0
        assert 2 * (body & got).sum() / (body.sum() + got.sum()) > 0.95
        assert set(np.unique(out[got & (stripped == 0)])) == {200}


def test_body_envelope_hu_rule_drops_the_table():
    lab, image = _torso((40, 48, 12))
    image[:, 36:46, :] = 200.0  # a 15 mm table behind the body (axis 1 = posterior -> anterior), air between
    stripped = np.where(lab == 200, 0, lab).astype(np.uint8)
    out = L.add_body_envelope(stripped, image, spacing=(1.5, 1.5, 1.5))
    assert not (out[:, 36:46, :] > 0).any() and np.array_equal(out > 0, lab > 0)


def test_body_envelope_errors():
    lab, _ = _torso()
    with pytest.raises(ValueError, match="needs image_hu"):
        L.add_body_envelope(lab, rule="hu")
    with pytest.raises(ValueError, match="choose \"hull\""):
        L.add_body_envelope(lab, rule="closing")
    with pytest.raises(ValueError, match="differs"):
        L.add_body_envelope(lab, np.zeros((2, 2, 2)))


# ------------------------------------------------------------------------------------------------ body regions
def test_body_region_from_mask():
    lab = np.zeros((2, 2, 2), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 29, 14
    assert L.body_region_from_mask(lab) == ([0, 1, 0, 0], [0, 0, 1, 0])
    with pytest.raises(ValueError, match="no body-region landmark"):
        L.body_region_from_mask(np.full((2, 2, 2), 200))


# ------------------------------------------------------------------------------------------------ quality check
def test_qc_groups_fix_the_lung_typo():
    assert L.QC_ORGAN_GROUPS["lung"] == (28, 29, 30, 31, 32)
    bone = L.QC_ORGAN_GROUPS["bone"]
    assert len(bone) == 24 + 35 + 3 and {33, 56, 63, 97, 120, 122, 127} <= set(bone) and 114 not in bone


def test_quality_check_pass_fail_absent():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[:5], lab[5:, :5], lab[5:, 5:] = 1, 32, 40  # liver, right lower lobe, vertebra T9
    image = np.where(lab == 1, 60.0, np.where(lab == 32, -850.0, 450.0)).astype(np.float32)
    ok = L.quality_check(image, lab)
    assert ok.passed and ok.failed == [] and ok.medians["spleen"] is None and ok.organ_passed["spleen"]
    assert ok.medians["liver"] == 60.0 and ok.medians["lung"] == -850.0 and ok.medians["bone"] == 450.0
    image[lab == 32] = -200.0  # lung too dense; caught only because 32 is in the lung group
    image[lab == 1] = np.nan
    image[0, 0, 0] = 500.0  # liver: NaNs dropped, the one finite value decides
    bad = L.quality_check(image, lab)
    assert not bad.passed and bad.failed == ["liver", "lung"]
    assert bad.as_dict()["medians"]["liver"] == 500.0
    with pytest.raises(ValueError, match="differs"):
        L.quality_check(image[:5], lab)
