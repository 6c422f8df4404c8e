"""DICOM outputs that validate and mean what they say: dciodvfy (dicom3tools) finds no errors and no warnings in the CT and MR series
and the SEG; each segment carries its organ's SNOMED CT code; every volume gets its own patient and study; the eval
commands read the DICOM outputs."""

import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from fastmaisi import io  # noqa: E402
from fastmaisi.io.dicom import snomed_codes  # noqa: E402
from fastmaisi.labels import LABEL_NAMES  # noqa: E402

SPACING = (10.0, 10.0, 10.0)


@pytest.fixture(scope="module")
def phantom():
    from fastmaisi.phantom import make_phantom

    image, label = make_phantom((32, 32, 16), SPACING, seed=3)
    return np.round(image).astype(np.int16), label


def write(folder, stem, phantom, modality="ct"):
    folder.mkdir(parents=True, exist_ok=True)
    image, label = phantom
    if modality != "ct":
        image = (image + 1000).clip(0, 1000).astype(np.int16)
    return io.write_outputs(folder, stem, image, label, SPACING, {"variant": "demo", "request": {}, "seed": 1},
                            modality=modality, fmt="dicom")


def dciodvfy_errors(path):
    """dciodvfy's errors and warnings for one file."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_dciodvfy_finds_no_errors_or_warnings(tmp_path, phantom, modality):
    paths = write(tmp_path, "s", phantom, modality)
    slices = sorted(paths["image"].iterdir())
    for path in (slices[0], slices[len(slices) // 2], paths["label"]):
        assert dciodvfy_errors(path) == [], path


def test_series_are_marked_synthetic_and_deidentified(tmp_path, phantom):
    paths = write(tmp_path, "s", phantom)
    for ds in (pydicom.dcmread(next(paths["image"].iterdir())), pydicom.dcmread(paths["label"])):
        assert ds.PatientIdentityRemoved == "YES" and "SYNTHETIC" in ds.DeidentificationMethod
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert str(ds.PatientID).startswith("SYNTHETIC-")
    assert pydicom.dcmread(next(paths["image"].iterdir())).PatientPosition == "HFS"


def test_each_sample_gets_its_own_patient_and_study_recorded(tmp_path, phantom):
    import json

    ids = []
    for stem in ("a", "b"):
        paths = write(tmp_path, stem, phantom)
        ds = pydicom.dcmread(next(paths["image"].iterdir()))
        recorded = json.loads(paths["record"].read_text())["outputs"]["image"]
        assert recorded["patient_id"] == ds.PatientID and recorded["study_instance_uid"] == ds.StudyInstanceUID
        assert pydicom.dcmread(paths["label"]).PatientID == ds.PatientID  # the SEG belongs to the same patient
        ids.append((ds.PatientID, ds.StudyInstanceUID))
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]


def test_segments_carry_their_organs_snomed_codes(tmp_path, phantom):
    image, label = phantom
    label = label.copy()
    label[0, 0, :2] = 2  # "dummy1": no concept, the generic code
    label[1, 0, :2] = 116  # left kidney cyst: a morphologically altered structure in the left kidney
    paths = write(tmp_path, "s", (image, label))
    seg = pydicom.dcmread(paths["label"])
    by_label = {sd.SegmentLabel: sd for sd in seg.SegmentSequence}
    liver = by_label["liver"].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodeValue, liver.CodingSchemeDesignator, liver.CodeMeaning) == ("10200004", "SCT", "Liver")
    kidney = by_label["left kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007" and kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    cyst = by_label["left kidney cyst"]
    assert cyst.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert cyst.AnatomicRegionSequence[0].CodeValue == "64033007"
    assert cyst.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "7771000"
    assert by_label["dummy1"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "123037004"
    # the labels still read back as the same map
    back, _, _ = io.read_label_map(paths["label"])
    assert set(np.unique(back)) == set(np.unique(label))


def test_snomed_table_covers_the_vocabulary_and_agrees_with_pydicom():
    from pydicom.sr.codedict import codes

    table = snomed_codes()
    named = [i for i, name in LABEL_NAMES.items() if not name.startswith("dummy")]
    assert sorted(table) == sorted(named)
    checked = 0
    for row in table.values():
        attr = "".join(w.capitalize() for w in row["type_meaning"].replace("-", " ").split())
        code = getattr(codes.SCT, attr, None) if attr in dir(codes.SCT) else None
        if code is not None:
            assert code.value == row["type_code"], row
            checked += 1
    assert checked >= 30


def test_eval_quality_reads_dicom_outputs(tmp_path, phantom, capsys):
    from fastmaisi.evaluation.cli import eval_main

    write(tmp_path, "s", phantom)
    assert eval_main(["quality", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "passed 1/1" in out


def test_read_ras_of_a_dicom_series_matches_the_nifti(tmp_path, phantom):
    from fastmaisi.evaluation.volumes import list_volumes, read_ras

    image, label = phantom
    write(tmp_path / "d", "s", phantom)
    (tmp_path / "n").mkdir()
    io.write_outputs(tmp_path / "n", "s", image, label, SPACING, {"variant": "demo", "request": {}, "seed": 1},
                     modality="ct")
    [dicom] = list_volumes(tmp_path / "d")
    [nifti] = list_volumes(tmp_path / "n")
    a, sa = read_ras(dicom)
    b, sb = read_ras(nifti)
    assert np.array_equal(a, b) and np.allclose(sa, sb)
