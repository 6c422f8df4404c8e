"""Bring your own segmentation: vocabularies, readers, conversion to MAISI ids, auto-detection and its refusals,
world geometry through `generate --mask` (real TotalSegmentator output from ../shared when present)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastmaisi.segmentations import convert_segmentation, detect_vocabulary
from fastmaisi.segmentations.cli import labels_main
from fastmaisi.segmentations.geometry import obliquity_deg, to_ras
from fastmaisi.vocabularies import NAMES, get_vocabulary, maisi_id_of_name

SHARED = Path(os.environ.get("FASTMAISI_SHARED") or Path(__file__).resolve().parents[2] / "shared")
TS_DATA = SHARED / "data" / "totalsegmentator"
TS_TABLE = SHARED / "reference" / "totalsegmentator_to_maisi.tsv"
needs_ts_data = pytest.mark.skipif(not (TS_DATA / "example_seg.nii.gz").exists(), reason="no ../shared TS data")


def save(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def organ_map(ids, shape=(24, 20, 16)):
    """A label map holding each id of `ids` in its own block of 4x4x4 voxels."""
    a = np.zeros(shape, np.uint8)
    for n, i in enumerate(ids):
        x, y = 4 * (n % 5), 4 * (n // 5)
        a[x:x + 4, y:y + 4, 4:8] = i
    return a


def cli(*args):
    return labels_main([str(a) for a in args])


# ------------------------------------------------------------------------------------------------- vocabularies
def test_registry_is_torch_free_and_lists_every_vocabulary():
    code = "import sys, fastmaisi.vocabularies as v; [v.get_vocabulary(n) for n in v.NAMES]; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
    assert {"maisi", "total", "total_v3", "total_mr", "body", "liver_vessels", "lung_vessels", "lung_nodules",
            "liver_lesions", "nv_segment_ct", "vista3d"} <= set(NAMES)
    assert len(get_vocabulary("maisi").classes) == 133 and get_vocabulary("maisi").to_maisi[200] == 200


@pytest.mark.skipif(not TS_TABLE.exists(), reason="no ../shared name table")
def test_totalsegmentator_vocabularies_follow_the_name_table():
    rows = list(csv.DictReader(TS_TABLE.open(), delimiter="\t"))
    for task in ("total", "total_v3", "total_mr"):
        vocab = get_vocabulary(task)
        table = {int(r["ts_id"]): (r["ts_name"], int(r["maisi_id"]) if r["maisi_id"] else None)
                 for r in rows if r["ts_task"] == task}
        assert {i: (vocab.classes[i], vocab.to_maisi[i]) for i in vocab.classes} == table, task
    # the dataset-order trap: TotalSegmentator's id 7 is the pancreas (MAISI 4), not the aorta
    assert get_vocabulary("total").to_maisi[7] == 4 and get_vocabulary("total").to_maisi[5] == 1


def test_nv_segment_and_vista3d_vocabularies():
    nv = get_vocabulary("nv_segment_ct")
    assert len(nv.classes) == 124 and all(nv.to_maisi[i] == i for i in nv.classes)
    assert not {2, 16, 18, 20, 21, 129, 130, 131, 200} & set(nv.classes)
    vista = get_vocabulary("vista3d")
    assert set(vista.refused) == {2, 20, 21} and vista.to_maisi[130] == 26 and vista.to_maisi[131] is None
    assert maisi_id_of_name("kidney_right") == (True, 5) and maisi_id_of_name("Right kidney") == (True, 5)
    assert maisi_id_of_name("lung_left") == (True, None) and maisi_id_of_name("banana")[0] is False


# -------------------------------------------------------------------------------------------------- auto-detection
@pytest.mark.parametrize("ids, expected", [((1, 3, 200), "maisi"), ((1, 5, 118, 126), "maisi"),
                                           ((1, 5, 14), None), ((1, 2, 120), None), ((1, 300), None)])
def test_auto_detection_decides_or_refuses(ids, expected):
    if expected:
        assert detect_vocabulary(ids, "m")[0] == expected
    else:
        with pytest.raises(ValueError, match="--vocabulary"):
            detect_vocabulary(ids, "m")


# -------------------------------------------------------------------------------------------------- real TS data
def _ts_lut():
    vocab = get_vocabulary("total")
    lut = np.zeros(256, np.int64)
    for i, m in vocab.to_maisi.items():
        lut[i] = m
    return lut


@needs_ts_data
def test_multilabel_total_converts_voxel_for_voxel_in_the_input_geometry():
    src = nib.load(TS_DATA / "example_seg.nii.gz")
    ts = np.asarray(src.dataobj)
    label, affine, report = convert_segmentation(TS_DATA / "example_seg.nii.gz", "total")
    assert label.shape == ts.shape and np.allclose(affine, src.affine)
    organ = ts > 0
    np.testing.assert_array_equal(label[organ], _ts_lut()[ts[organ]])  # the name table, voxel for voxel
    assert set(np.unique(label[~organ])) <= {0, 200} and (label == 200).any()
    assert (label[ts == 5] == 1).all()  # TotalSegmentator's liver (5) is MAISI's liver (1), not the right kidney
    assert report["body"]["added"] and report["unmapped"] == []
    rows = {r["class"]: r for r in report["volumes_ml"]}
    assert rows["liver"]["maisi_id"] == 1 and rows["liver"]["ml_out"] == rows["liver"]["ml_in"] > 500


@needs_ts_data
def test_class_folder_converts_by_file_name_and_equals_the_equivalent_multilabel(tmp_path):
    folder = TS_DATA / "example_seg_fast"
    label, affine, report = convert_segmentation(folder)
    first = nib.load(folder / "liver.nii.gz")
    assert label.shape == first.shape and np.allclose(affine, first.affine)
    assert report["inputs"][0]["kind"] == "folder"
    total = get_vocabulary("total")
    ids = {name: i for i, name in total.classes.items()}
    multilabel = np.zeros(first.shape, np.uint8)
    for f in sorted(folder.glob("*.nii.gz")):  # the same later-file-wins order as the folder reader
        name = f.name[:-7]
        mask = np.asarray(nib.load(f).dataobj) > 0
        multilabel[mask] = ids[name]
        assert (label[mask & (multilabel == ids[name])] == total.to_maisi[ids[name]]).all(), name
    save(tmp_path / "ml.nii.gz", multilabel, first.affine)
    same, _, _ = convert_segmentation(tmp_path / "ml.nii.gz", "total")
    np.testing.assert_array_equal(same, label)
    assert (label[np.asarray(first.dataobj) > 0] == 1).all()


def _demo_generate(tmp_path, *mask_args):
    from fastmaisi.pipelines.generate_cli import generate_main

    out = tmp_path / "out"
    code = generate_main(["-o", str(out), "--steps", "2", "--max-retries", "0", "-q", "--mask", *map(str, mask_args)])
    return code, out


@needs_ts_data
@pytest.mark.parametrize("kind", ["multilabel", "folder"])
def test_generate_from_totalsegmentator_output_holds_the_liver_as_maisi_1(tmp_path, kind):
    if kind == "multilabel":
        args = [TS_DATA / "example_seg.nii.gz", "--mask-vocabulary", "total"]
    else:
        args = [TS_DATA / "example_seg_fast"]
    code, out = _demo_generate(tmp_path, *args)
    assert code in (0, 3)  # 3: written; the toy networks may fail the HU quality check
    label = nib.load(out / "sample_000000_label.nii.gz")
    lab = np.asarray(label.dataobj)
    assert (lab == 1).sum() > 1000 and (lab == 200).any()
    # the liver's world centroid: where it is in the user's segmentation
    src = nib.load(TS_DATA / ("example_seg.nii.gz" if kind == "multilabel" else "example_seg_fast/liver.nii.gz"))
    src_liver = np.asarray(src.dataobj) == (5 if kind == "multilabel" else 1)
    centroid = lambda m, aff: (aff @ [*np.argwhere(m).mean(axis=0), 1.0])[:3]  # noqa: E731
    assert np.abs(centroid(lab == 1, label.affine) - centroid(src_liver, src.affine)).max() < 5.0
    record = json.loads((out / "sample_000000_record.json").read_text())
    conversion = record["mask"]["conversion"]
    assert conversion["inputs"][0]["vocabulary"] == ("total" if kind == "multilabel" else "by class name")
    assert any(r["class"] == "liver" and r["maisi_id"] == 1 for r in conversion["volumes_ml"])


# ------------------------------------------------------------------------------------------- other vocabularies
def test_vista3d_map_remaps_deprecated_ids_and_refuses_superclasses(tmp_path):
    save(tmp_path / "v.nii.gz", organ_map([1, 3, 5, 14, 130, 120]))
    label, _, report = convert_segmentation(tmp_path / "v.nii.gz", "vista3d")
    assert set(np.unique(label)) == {0, 1, 3, 5, 14, 26, 120, 200}
    assert report["inputs"][0]["vocabulary"] == "vista3d"
    save(tmp_path / "k.nii.gz", organ_map([1, 2, 3]))
    with pytest.raises(ValueError, match="covers both kidneys"):
        convert_segmentation(tmp_path / "k.nii.gz", "vista3d")


def test_nv_segment_map_keeps_ids_and_auto_detects_as_maisi(tmp_path):
    save(tmp_path / "nv.nii.gz", organ_map([1, 3, 5, 14, 118, 121, 126]))
    label, _, report = convert_segmentation(tmp_path / "nv.nii.gz", "nv_segment_ct")
    assert set(np.unique(label)) == {0, 1, 3, 5, 14, 118, 121, 126, 200}
    auto, _, report = convert_segmentation(tmp_path / "nv.nii.gz")
    np.testing.assert_array_equal(auto, label)
    assert report["inputs"][0]["vocabulary"] == "maisi" and "NV-Segment" in report["inputs"][0]["reason"]
    save(tmp_path / "bad.nii.gz", organ_map([1, 2]))
    with pytest.raises(ValueError, match="not in the nv_segment_ct vocabulary"):
        convert_segmentation(tmp_path / "bad.nii.gz", "nv_segment_ct")


def test_total_mr_map_reports_structures_without_maisi_id(tmp_path):
    save(tmp_path / "mr.nii.gz", organ_map([5, 1, 10, 19, 22]))  # liver, spleen, lung_left, vertebrae, heart
    label, _, report = convert_segmentation(tmp_path / "mr.nii.gz", "total_mr")
    assert set(np.unique(label)) == {0, 1, 3, 115, 200}
    assert report["unmapped"] == ["lung_left", "vertebrae"]
    assert report["body"]["unmapped_became_body"] == ["lung_left", "vertebrae"]
    rows = {r["class"]: r for r in report["volumes_ml"]}
    assert rows["lung_left"]["maisi_id"] is None and rows["liver"]["ml_out"] == rows["liver"]["ml_in"] == 64 * 0.012


def test_merged_inputs_total_liver_vessels_and_body(tmp_path):
    total = organ_map([5, 1])  # liver, spleen
    vessels = np.zeros_like(total)
    vessels[1:3, 1:3, 5:7] = 1  # inside the liver
    body = np.zeros_like(total)
    body[:, :, 2:10] = 1
    save(tmp_path / "total.nii.gz", total)
    save(tmp_path / "liver_vessels.nii.gz", vessels)  # a per-class mask, named by class
    save(tmp_path / "body_ml.nii.gz", body)
    label, _, report = convert_segmentation([tmp_path / "total.nii.gz", tmp_path / "liver_vessels.nii.gz",
                                             tmp_path / "body_ml.nii.gz"], "total,auto,body")
    assert (label[vessels == 1] == 25).all() and (label[(total == 5) & (vessels == 0)] == 1).all()
    assert (label[(body == 1) & (total == 0)] == 200).all() and (label[body == 0] == 0).all()
    assert report["body"]["method"].startswith("TotalSegmentator body task")
    liver = next(r for r in report["volumes_ml"] if r["class"] == "liver")
    assert liver["ml_out"] == pytest.approx(liver["ml_in"] - 8 * 0.012)  # the vessels took 8 voxels


# ----------------------------------------------------------------------------------------------------- geometry
def test_lps_input_keeps_grid_and_affine(tmp_path):
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    lps[:3, 3] = [100.0, 120.0, -300.0]  # LPS origin (-100, -120, -300)
    ts = organ_map([5, 1, 2])
    save(tmp_path / "lps.nii.gz", ts, lps)
    assert cli("convert", "-i", tmp_path / "lps.nii.gz", "-o", tmp_path / "m.nii.gz",
               "--vocabulary", "total") == 0
    out = nib.load(tmp_path / "m.nii.gz")
    assert np.allclose(out.affine, lps) and nib.aff2axcodes(out.affine) == ("L", "P", "S")
    assert np.allclose(out.header.get_qform(), lps) and np.allclose(out.header.get_sform(), lps)
    lab = np.asarray(out.dataobj)
    assert (lab[ts == 5] == 1).all() and (lab[ts == 1] == 3).all() and (lab[ts == 2] == 5).all()
    ras, ras_aff, note = to_ras(lab, out.affine)
    assert note is None and nib.aff2axcodes(ras_aff) == ("R", "A", "S")
    point = np.argwhere(lab == 1)[0]
    assert ras[tuple(np.round(np.linalg.solve(ras_aff, out.affine @ [*point, 1.0])[:3]).astype(int))] == 1


def test_oblique_input_is_resampled_to_closest_axes_with_a_note():
    theta = np.radians(12)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]) * 2
    lab = organ_map([1, 3])
    ras, ras_aff, note = to_ras(lab, aff)
    assert obliquity_deg(aff) == pytest.approx(12, abs=0.01) and "oblique" in note
    assert obliquity_deg(ras_aff) == 0 and 0.6 < (ras == 1).sum() / (lab == 1).sum() < 1.4
    centroid = lambda m, a: (a @ [*np.argwhere(m).mean(axis=0), 1.0])[:3]  # noqa: E731
    assert np.abs(centroid(ras == 1, ras_aff) - centroid(lab == 1, aff)).max() < 2.0  # within a voxel (2 mm)


def test_generate_from_dicom_folder_keeps_lps_origin(tmp_path):
    """A DICOM label series (LPS, first slice at (-100, -120, -300)) on the demo grid: outputs lie where it lies."""
    pytest.importorskip("highdicom")
    from fastmaisi.io import ras_affine
    from fastmaisi.io.dicom import _write_dicom_series
    from fastmaisi.phantom import make_phantom
    from fastmaisi.variants import get_variant

    demo = get_variant("demo")
    size, spacing = demo.size, demo.spacing
    _, label = make_phantom(size, spacing, seed=2)
    origin = (100.0 - (size[0] - 1) * spacing[0], 120.0 - (size[1] - 1) * spacing[1], -300.0)
    _write_dicom_series(tmp_path / "dcm", label.astype(np.int16), ras_affine(spacing, origin), "ct",
                        {"variant": "label", "seed": 0})
    code, out = _demo_generate(tmp_path, tmp_path / "dcm")
    assert code in (0, 3)
    img = nib.load(out / "sample_000000_image.nii.gz")
    lab = nib.load(out / "sample_000000_label.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert np.allclose(img.affine[:3, 3], [100.0, 120.0, -300.0])  # LPS (-100, -120, -300)
    assert np.allclose(img.affine, lab.affine) and np.allclose(img.header.get_qform(), img.affine)
    lps_label = np.asarray(lab.dataobj)
    np.testing.assert_array_equal(lps_label[::-1, ::-1, :], label)  # the same voxels at the same world points
    record = json.loads((out / "sample_000000_record.json").read_text())
    assert record["geometry"]["orientation"] == "LPS" and len(record["mask"]["sha256"]) == 64


def test_dicom_seg_segments_mapped_by_coded_anatomy(tmp_path):
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    from fastmaisi.io import ras_affine
    from fastmaisi.io.dicom import _dicom_series

    image = np.zeros((16, 16, 8), np.int16)
    datasets = _dicom_series(image, ras_affine((2, 2, 3)), "ct", {"variant": "x", "seed": 0})
    algorithm = hd.AlgorithmIdentificationSequence(name="t", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=f"segment {n}", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=code, algorithm_type="AUTOMATIC", algorithm_identification=algorithm)
        for n, code in ((1, codes.SCT.Spleen), (2, codes.SCT.Liver))]
    frames = np.zeros((8, 16, 16), np.uint8)
    frames[2:6, 2:8, 2:8] = 1
    frames[2:6, 8:14, 8:14] = 2
    seg = hd.seg.Segmentation(source_images=datasets, pixel_array=frames,
                              segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
                              series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
                              instance_number=1, manufacturer="t", manufacturer_model_name="t",
                              software_versions="1", device_serial_number="0")
    seg.save_as(tmp_path / "seg.dcm")
    label, _, report = convert_segmentation(tmp_path / "seg.dcm")
    counts = {int(v): int((label == v).sum()) for v in np.unique(label)}
    assert counts[3] == counts[1] == 4 * 6 * 6  # segment 1 coded Spleen -> MAISI 3 (not "liver"), 2 Liver -> 1
    assert report["inputs"][0]["kind"] == "dicom-seg"
    from fastmaisi.io import read_label_map

    again, _, _ = read_label_map(tmp_path / "seg.dcm")  # the generic reader maps by coded anatomy too
    assert sorted(np.unique(again).tolist()) == [0, 1, 3] and (again == 3).sum() == 4 * 6 * 6


# ------------------------------------------------------------------------------------------------------ refusals
def _refusal(tmp_path, capsys, *inputs, vocabulary=None):
    out = tmp_path / "out.nii.gz"
    args = ["convert", "-o", out] + [a for i in inputs for a in ("-i", i)]
    code = cli(*args, *(["--vocabulary", vocabulary] if vocabulary else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fastmaisi labels:"), err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    return err[0]


@pytest.mark.parametrize("case", ["ambiguous", "outside_vocabulary", "float_image", "empty_folder", "not_masks",
                                  "text_folder", "all_zero", "body_only", "one_voxel"])
def test_refusals_exit_2_one_line_nothing_written(tmp_path, capsys, case):
    vocabulary = None
    if case == "ambiguous":
        inp, expect = save(tmp_path / "a.nii.gz", organ_map([1, 5, 14])), "--vocabulary"
    elif case == "outside_vocabulary":
        inp, vocabulary, expect = save(tmp_path / "a.nii.gz", organ_map([1, 150])), "total", "not in the total"
    elif case == "float_image":
        inp, expect = save(tmp_path / "f.nii.gz", np.random.rand(8, 8, 8).astype(np.float32)), "not a label map"
    elif case == "empty_folder":
        (inp := tmp_path / "empty").mkdir()
        expect = "is empty"
    elif case == "not_masks":
        (inp := tmp_path / "imgs").mkdir()
        save(inp / "liver.nii.gz", organ_map([1, 7]))
        expect = "not a binary class mask"
    elif case == "text_folder":
        (inp := tmp_path / "texts").mkdir()
        (inp / "notes.txt").write_text("hello")
        expect = "neither NIfTI class masks nor a DICOM"
    elif case == "all_zero":
        inp, vocabulary, expect = save(tmp_path / "z.nii.gz", np.zeros((8, 8, 8), np.uint8)), "maisi", "no organ"
    elif case == "body_only":
        inp, expect = save(tmp_path / "b.nii.gz", np.full((8, 8, 8), 200, np.uint8)), "only the body"
    else:
        a = np.full((8, 8, 8), 200, np.uint8)
        a[4, 4, 4] = 1
        inp, expect = save(tmp_path / "o.nii.gz", a), "only 1 organ voxel"
    assert expect in _refusal(tmp_path, capsys, inp, vocabulary=vocabulary)


def test_generate_refuses_an_ambiguous_or_empty_mask_before_compute(tmp_path, capsys):
    from fastmaisi.pipelines.generate_cli import generate_main

    save(tmp_path / "a.nii.gz", organ_map([1, 5, 14]))
    save(tmp_path / "z.nii.gz", np.zeros((8, 8, 8), np.uint8))
    for mask, expect in (("a.nii.gz", "--mask-vocabulary"), ("z.nii.gz", "empty")):
        out = tmp_path / "out"
        assert generate_main(["-o", str(out), "-q", "--mask", str(tmp_path / mask)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and err[0].startswith("no --weights") and expect in err[1], err  # demo line + refusal
        assert not out.exists() or not any(out.iterdir())


def test_labels_list_prints_a_vocabulary(capsys):
    assert cli("list", "--vocabulary", "total") == 0
    text = capsys.readouterr().out
    import re

    assert re.search(r"^ +5  liver +1  liver$", text, re.M) and re.search(r"^ +7  pancreas +4  pancreas$", text, re.M)
    assert cli("list", "--vocabulary", "nope") == 2


def test_write_outputs_with_an_lps_affine_nifti_as_given_dicom_and_preview_in_ras(tmp_path):
    pytest.importorskip("highdicom")
    from fastmaisi import io

    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    lps[:3, 3] = [100.0, 120.0, -300.0]
    image = np.zeros((16, 12, 8), np.int16)
    image[2:6, 3:5, 1:4] = 500
    label = (image > 0).astype(np.uint8)
    record = {"variant": "demo", "request": {}, "seed": 0}
    paths = io.write_outputs(tmp_path, "n", image, label, (2, 2, 3), record, modality="ct", affine=lps)
    img = nib.load(paths["image"])
    assert np.allclose(img.affine, lps) and np.array_equal(np.asarray(img.dataobj), image)
    assert json.loads(paths["record"].read_text())["geometry"]["orientation"] == "LPS"
    paths = io.write_outputs(tmp_path, "d", image, label, (2, 2, 3), record, modality="ct", affine=lps, fmt="dicom")
    series, _, ras_aff = io.read_label_map(paths["image"])  # the DICOM series read back, RAS
    np.testing.assert_array_equal(series, image[::-1, ::-1, :])
    assert np.allclose(ras_aff @ [15, 11, 0, 1.0], lps @ [0, 0, 0, 1.0])  # same world point


def test_fastmaisi_labels_is_a_command(capsys):
    from fastmaisi.cli import main

    assert main(["labels", "list"]) == 0
    out = capsys.readouterr().out
    assert "total_mr" in out and "vista3d" in out and "nv_segment_ct" in out
