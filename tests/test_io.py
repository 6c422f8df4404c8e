"""fastmaisi.io: NIfTI/DICOM outputs, atomic writes, provenance record, preview PNG, label-map reading."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastmaisi import io
from fastmaisi.weights import sha256_file

SHAPE = (40, 30, 20)
SPACING = (0.8, 1.2, 2.5)
ORIGIN = (-16.0, 10.0, 100.0)


def _volumes():
    """A small CT (HU int16) with a liver (1) on the patient's right-anterior and a kidney (5), inside a body (200)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    label = np.zeros(SHAPE, np.uint8)
    label[((x - 20) / 19) ** 2 + ((y - 15) / 14) ** 2 < 1] = 200
    label[(x >= 26) & (x < 34) & (y >= 18) & (y < 26) & (z >= 4) & (z < 16)] = 1  # high x = right, high y = anterior
    label[(x >= 8) & (x < 14) & (y >= 5) & (y < 11) & (z >= 6) & (z < 12)] = 5
    hu = np.where(label > 0, 40.0, -1000.0) + np.where(label == 1, 30.0, 0.0)
    unit = (hu + 1000) / 2000 + np.random.default_rng(0).normal(0, 0.01, SHAPE)  # as the decoder gives, noise included
    return io.hu_from_unit(unit, "ct"), label


def _record(**extra):
    rec = {"variant": "rflow-ct", "request": {"size": SHAPE, "spacing": SPACING, "modality": "ct", "seed": 7},
           "seed": 7, "resolved": {"size": list(SHAPE), "spacing": list(SPACING), "modality_code": 1, "steps": 30}}
    rec.update(extra)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# intensities

def test_hu_from_unit_ct_mr():
    x = np.array([[[-0.1, 0.0, 0.25, 0.5, 1.0, 1.2]]], np.float32)
    ct = io.hu_from_unit(x, "ct")
    assert ct.dtype == np.int16 and ct.shape == x.shape
    assert ct.ravel().tolist() == [-1000, -1000, -500, 0, 1000, 1000]
    mr = io.hu_from_unit(x, 9)  # MAISI modality id 9 = mri_t1
    assert mr.ravel().tolist() == [0, 0, 250, 500, 1000, 1200]
    assert io.hu_from_unit(np.array([0.50049], np.float32), 1).tolist() == [1]  # rounded, not truncated


def test_hu_from_unit_torch_and_errors():
    torch = pytest.importorskip("torch")
    out = io.hu_from_unit(torch.full((1, 1, 2, 2, 2), 0.75, dtype=torch.float16), "ct")
    assert out.dtype == np.int16 and np.all(out == 500)
    with pytest.raises(ValueError, match="non-finite"):
        io.hu_from_unit(np.array([0.5, np.nan]), "ct")
    with pytest.raises(ValueError, match="modality"):
        io.hu_from_unit(np.zeros(3), "pet")


# ---------------------------------------------------------------------------------------------------------------
# NIfTI

def test_write_nifti_image_and_label(tmp_path):
    image, label = _volumes()
    expected = np.diag([*SPACING, 1.0])
    expected[:3, 3] = ORIGIN
    for kind, data, dtype in (("image", image, np.int16), ("label", label, np.uint8)):
        path = io.write_nifti(tmp_path / f"{kind}.nii.gz", data.astype(np.int32), SPACING, kind=kind, origin=ORIGIN)
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
        assert arr.dtype == dtype and img.get_data_dtype() == dtype
        np.testing.assert_array_equal(arr, data)
        np.testing.assert_allclose(img.affine, expected)
        np.testing.assert_allclose(img.header.get_zooms(), SPACING, rtol=1e-6)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), expected, atol=1e-5)
    img = nib.load(tmp_path / "image.nii.gz")
    assert -1000 <= img.get_fdata().min() and img.get_fdata().max() <= 1000
    assert nib.load(tmp_path / "label.nii.gz").header.get_intent()[0] == "label"
    assert sorted(os.listdir(tmp_path)) == ["image.nii.gz", "label.nii.gz"]  # no temporary leftovers


def test_write_nifti_rejects_bad_input(tmp_path):
    image, label = _volumes()
    with pytest.raises(ValueError, match="hu_from_unit"):
        io.write_nifti(tmp_path / "a.nii.gz", image.astype(np.float32), SPACING)
    with pytest.raises(ValueError, match="0..255"):
        io.write_nifti(tmp_path / "a.nii.gz", label.astype(np.int16) + 300, SPACING, kind="label")
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        io.write_nifti(tmp_path / "a.nrrd", image, SPACING)
    with pytest.raises(ValueError, match="spacing"):
        io.write_nifti(tmp_path / "a.nii.gz", image, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3-D"):
        io.write_nifti(tmp_path / "a.nii.gz", image[0], SPACING)
    assert not any(tmp_path.iterdir())


def test_write_nifti_refuses_existing(tmp_path):
    image, _ = _volumes()
    path = io.write_nifti(tmp_path / "a.nii", image, SPACING)
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        io.write_nifti(path, image + 1, SPACING)
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), image)
    io.write_nifti(path, image + 1, SPACING, overwrite=True)
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), image + 1)


# ---------------------------------------------------------------------------------------------------------------
# failed and killed writes

def _fail_midway(monkeypatch, after_calls=0):
    """Make the NIfTI writer put some bytes on disk, then fail with ENOSPC (on the call after `after_calls`)."""
    real = nib.Nifti1Image.to_file_map
    calls = []

    def to_file_map(self, file_map=None, **kw):
        calls.append(1)
        if len(calls) <= after_calls:
            return real(self, file_map, **kw)
        file_map["image"].fileobj.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", to_file_map)


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    image, label = _volumes()
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="no space left on device") as info:
        io.write_nifti(tmp_path / "a.nii.gz", image, SPACING)
    assert info.value.errno == errno.ENOSPC and "a.nii.gz" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_midway_through_an_output_set(tmp_path, monkeypatch):
    image, label = _volumes()
    _fail_midway(monkeypatch, after_calls=1)  # the image is written, the label map fails
    with pytest.raises(OSError, match="no space left on device"):
        io.write_outputs(tmp_path, "s", image, label, SPACING, _record(), modality="ct")
    assert list(tmp_path.iterdir()) == []  # not even the finished image: the set is renamed into place together


def test_killed_write_leaves_no_final_file(tmp_path):
    image, _ = _volumes()
    np.save(tmp_path / "image.npy", image)
    out = tmp_path / "out"
    out.mkdir()
    child = textwrap.dedent(f"""
        import time, gzip, numpy as np
        from fastmaisi import io
        real = gzip.GzipFile.write
        def slow(self, data):
            n = real(self, data)
            self.fileobj.flush()
            time.sleep(60)  # killed here, with part of the file on disk
            return n
        gzip.GzipFile.write = slow
        io.nifti._gzip_class = lambda: gzip.GzipFile  # (zlib's writer, also where python-isal is installed)
        io.write_nifti({str(out / "a.nii.gz")!r}, np.load({str(tmp_path / "image.npy")!r}), (1, 1, 1))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=Path(io.__file__).resolve().parents[2])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not any(p.stat().st_size for p in out.iterdir()):
            time.sleep(0.05)
        names = os.listdir(out)
        assert names and all(n.startswith(".a.nii.gz.partial-") for n in names), names
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "a.nii.gz").exists()
    assert all(n.startswith(".") and ".partial-" in n for n in os.listdir(out))


# ---------------------------------------------------------------------------------------------------------------
# output sets, folder checks

def test_write_outputs_nifti(tmp_path):
    image, label = _volumes()
    paths = io.write_outputs(tmp_path, "case1", image, label, SPACING, _record(), origin=ORIGIN,
                             label_names={1: "my liver"}, modality="ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values()) == [
        "case1_image.nii.gz", "case1_label.nii.gz", "case1_labels.json", "case1_preview.png", "case1_record.json"]
    rec = io.read_record(paths["record"])
    assert rec["outputs"]["image"]["sha256"] == sha256_file(paths["image"])
    assert rec["outputs"]["label"]["sha256"] == sha256_file(paths["label"])
    assert rec["geometry"]["orientation"] == "RAS" and rec["geometry"]["shape"] == list(SHAPE)
    np.testing.assert_allclose(rec["geometry"]["affine"], nib.load(paths["image"]).affine)
    table = json.loads(paths["labels"].read_text())
    by_value = {e["value"]: e for e in table["labels"]}
    assert sorted(by_value) == [1, 5, 200] and by_value[1]["name"] == "my liver" and by_value[5]["name"] == "label_5"
    assert by_value[1]["voxels"] == int((label == 1).sum())
    assert by_value[5]["color"] == list(io.label_color(5))
    assert by_value[1]["volume_ml"] == pytest.approx((label == 1).sum() * np.prod(SPACING) / 1000, abs=1e-3)


def test_write_outputs_image_only(tmp_path):
    image, _ = _volumes()
    paths = io.write_outputs(tmp_path, "img", image, None, SPACING, _record(), preview=False, modality="ct")
    assert sorted(paths) == ["image", "record"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_image.nii.gz", "img_record.json"]
    assert "label" not in io.read_record(paths["record"])["outputs"]


def test_overwrite_refusal(tmp_path):
    image, label = _volumes()
    io.write_outputs(tmp_path, "s", image, label, SPACING, _record(seed=1), modality="ct")
    with pytest.raises(ValueError, match="already exist.*overwrite"):
        io.write_outputs(tmp_path, "s", image, label, SPACING, _record(seed=2), modality="ct")
    with pytest.raises(ValueError, match="s_image.nii.gz.*overwrite"):
        io.check_output_dir(tmp_path, ["s"])
    assert io.read_record(tmp_path / "s_record.json")["seed"] == 1
    io.check_output_dir(tmp_path, ["s", "t"], overwrite=True)
    io.write_outputs(tmp_path, "s", image, label, SPACING, _record(seed=2), overwrite=True, modality="ct")
    assert io.read_record(tmp_path / "s_record.json")["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_check_output_dir(tmp_path):
    out = io.check_output_dir(tmp_path / "new" / "deeper", ["a", "b"])
    assert out.is_dir() and list(out.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        io.check_output_dir(tmp_path / "afile" / "sub", ["a"])
    with pytest.raises(ValueError, match="output name"):
        io.check_output_dir(tmp_path, ["../escape"])
    with pytest.raises(ValueError, match="repeat"):
        io.check_output_dir(tmp_path, ["a", "a"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write to read-only folders")
def test_check_output_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable"):
            io.check_output_dir(ro, ["a"])
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------------------------
# record

def test_record_round_trip(tmp_path):
    attempts = [{"seed": np.int64(3), "quality_check": {"passed": np.bool_(False)}, "seconds": np.float32(1.5),
                 "timings": {"sample_s": 1.25, "decode_s": float("nan")}}, {"seed": 4, "quality_check": None}]
    weights = {"unet": {"path": tmp_path / "w.pt", "sha256": "ab" * 32}}
    rec = _record(seed=np.int64(4), attempts=attempts, weights=weights,
                  decode_plan={"tile": (64, 64, 32)}, quality_check={"passed": np.bool_(True)}, retries=1,
                  device="cpu", my_extra="kept")
    io.write_record(tmp_path / "r.json", rec)
    back = io.read_record(tmp_path / "r.json")
    assert back["schema"] == io.RECORD_SCHEMA and back["fastmaisi_version"] == io.__version__
    assert back["seed"] == 4 and back["retries"] == 1 and back["request"]["spacing"] == list(SPACING)
    assert back["attempts"][0] == {"seed": 3, "quality_check": {"passed": False}, "seconds": 1.5,
                                   "timings": {"sample_s": 1.25, "decode_s": None}}  # NaN is stored as null
    assert back["decode_plan"] == {"tile": [64, 64, 32]} and back["quality_check"] == {"passed": True}
    assert back["weights"]["unet"]["path"] == str(tmp_path / "w.pt") and back["my_extra"] == "kept"
    assert back == io.read_record(tmp_path / "r.json")  # stable (created_utc is kept, not renewed)
    minimal = io.validate_record(_record())
    assert all(minimal[k] is None for k in ("workflow", "mask", "weights", "device", "decode_plan", "attempts",
                                            "quality_check", "retries"))


def test_record_errors(tmp_path):
    with pytest.raises(ValueError, match=r"required keys \['seed'\]"):
        io.write_record(tmp_path / "r.json", {k: v for k, v in _record().items() if k != "seed"})
    with pytest.raises(ValueError, match="resolved.size"):
        io.validate_record(_record(resolved={"size": [1, 2], "spacing": [1, 1, 1]}))
    with pytest.raises(ValueError, match="spacing"):
        io.validate_record(_record(resolved={"size": [1, 2, 3], "spacing": [1, -1, 1]}))
    with pytest.raises(ValueError, match="'seed' must be an int"):
        io.validate_record(_record(seed="7"))
    with pytest.raises(ValueError, match="schema"):
        io.validate_record(_record(schema="fastmaisi-record/2"))
    with pytest.raises(TypeError, match=r"record\['device'\] holds a object"):
        io.validate_record(_record(device=object()))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON record"):
        io.read_record(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a fastmaisi record"):
        io.read_record(tmp_path / "other.json")
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# preview

def test_preview_png(tmp_path):
    from PIL import Image

    image, label = _volumes()
    path = io.preview_png(tmp_path / "p.png", image, label, SPACING)
    pic = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # isotropic display pixels; the largest extent (z: 20 * 2.5 mm) spans 256 pixels (small volumes are enlarged)
    d = 20 * 2.5 / 256
    assert pic.shape == (256, round(40 * 0.8 / d) + 4 + round(40 * 0.8 / d) + 4 + round(30 * 1.2 / d), 3)
    axial = pic[: round(30 * 1.2 / d), : round(40 * 0.8 / d)]
    assert axial.std() > 10  # not blank
    colored = np.abs(axial - axial[..., :1]).max(axis=2) > 10
    assert colored.any()
    liver = np.asarray(io.label_color(1))
    # gray*(1-a) + colour*a: channel differences are a*(colour differences), whatever the gray
    diff = axial - axial[..., 1:2]
    is_liver = np.abs(diff - 0.45 * (liver - liver[1])).max(axis=2) <= 2
    rows, cols = np.nonzero(is_liver & colored)
    assert rows.size > 20
    # radiological view: the liver (patient right, anterior) is in the upper left of the axial panel
    assert rows.mean() < axial.shape[0] / 2 and cols.mean() < axial.shape[1] / 2
    plain = np.asarray(io.preview_image(image, None, SPACING).convert("RGB")).astype(int)
    assert plain.shape == pic.shape and not (np.abs(plain - plain[..., :1]).max(axis=2) > 0).any()  # gray only
    body_only = np.asarray(io.preview_image(image, (label == 200).astype(np.uint8) * 200, SPACING)).astype(int)
    np.testing.assert_array_equal(body_only, plain)  # the body envelope is not tinted


def test_preview_window_and_mr():
    image, _ = _volumes()
    soft = np.asarray(io.preview_image(image, None, SPACING, window="soft"))
    lung = np.asarray(io.preview_image(image, None, SPACING, window=(-1350, 150)))
    assert not np.array_equal(soft, lung)
    mr = np.asarray(io.preview_image(np.abs(image), None, SPACING, modality="mr"))
    assert mr.max() == 255 and mr.std() > 10
    with pytest.raises(ValueError, match="window"):
        io.preview_image(image, None, SPACING, window="brain")


# ---------------------------------------------------------------------------------------------------------------
# reading label maps

def test_read_label_map_reorients_to_ras(tmp_path):
    _, label = _volumes()
    # the same label map stored in LPS order (x and y flipped), as DICOM-derived files often are
    ras = np.diag([*SPACING, 1.0])
    ras[:3, 3] = ORIGIN
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]  # voxel i' = X-1-i, j' = Y-1-j
    lps_affine = ras @ flip
    nib.save(nib.Nifti1Image(label[::-1, ::-1].astype(np.float32), lps_affine), tmp_path / "lps.nii.gz")
    array, spacing, affine = io.read_label_map(tmp_path / "lps.nii.gz")
    assert array.dtype == np.uint8 and nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_array_equal(array, label)
    np.testing.assert_allclose(affine, ras, atol=1e-5)
    assert spacing == pytest.approx(SPACING)
    nib.save(nib.Nifti1Image(label[..., None].astype(np.int16), ras), tmp_path / "one_channel.nii")
    np.testing.assert_array_equal(io.read_label_map(tmp_path / "one_channel.nii")[0], label)


def test_read_label_map_rejects_non_label_maps(tmp_path):
    image, label = _volumes()
    cases = {"float.nii.gz": np.where(label > 0, 0.37, 0.0).astype(np.float32),
             "channels.nii.gz": np.stack([label, label], axis=-1),
             "ct.nii.gz": image}
    for name, data in cases.items():
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name)
    with pytest.raises(ValueError, match="not whole numbers"):
        io.read_label_map(tmp_path / "float.nii.gz")
    with pytest.raises(ValueError, match="2 channels"):
        io.read_label_map(tmp_path / "channels.nii.gz")
    with pytest.raises(ValueError, match="negative values"):
        io.read_label_map(tmp_path / "ct.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match="cannot read"):
        io.read_label_map(tmp_path / "garbage.nii.gz")
    with pytest.raises(FileNotFoundError):
        io.read_label_map(tmp_path / "missing.nii.gz")


def test_dicom_missing_dependency_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'pip install "fastmaisi\[dicom\]"'):
        io._require_dicom()


# ---------------------------------------------------------------------------------------------------------------
# DICOM (optional extras)

def _ras_index(ds, affine):
    """Voxel indices (i, j, k) of every pixel of one DICOM slice, from its own header (independent of io's reader)."""
    rows, cols = np.mgrid[: ds.Rows, : ds.Columns]
    ipp = np.asarray(ds.ImagePositionPatient, float)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = ipp + cols[..., None] * dc * iop[:3] + rows[..., None] * dr * iop[3:]
    ras = lps * [-1, -1, 1]
    ijk = (np.linalg.inv(affine)[:3, :3] @ ras.reshape(-1, 3).T).T + np.linalg.inv(affine)[:3, 3]
    idx = np.rint(ijk).astype(int)
    np.testing.assert_allclose(ijk, idx, atol=1e-3)
    return tuple(idx[:, a].reshape(ds.Rows, ds.Columns) for a in range(3))


def test_dicom_series_geometry_and_header(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    image, label = _volumes()
    paths = io.write_outputs(tmp_path, "d", image, label, SPACING, _record(), fmt="dicom", origin=ORIGIN,
                             modality="ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d_image_dicom", "d_label_seg.dcm", "d_labels.json", "d_preview.png", "d_record.json"]
    files = sorted(paths["image"].iterdir())
    assert len(files) == SHAPE[2]
    affine = np.asarray(io.read_record(paths["record"])["geometry"]["affine"])
    rebuilt = np.full(SHAPE, -9999, np.int32)
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert str(ds.PatientName) == "SYNTHETIC^FASTMAISI" and ds.SeriesDescription == "SYNTHETIC - fastmaisi"
        assert ds.BurnedInAnnotation == "NO" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0
        assert float(ds.SliceThickness) == pytest.approx(SPACING[2])
        uids.add(ds.SeriesInstanceUID)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        i, j, k = _ras_index(ds, affine)
        rebuilt[i, j, k] = hu
    assert len(uids) == 1
    np.testing.assert_array_equal(rebuilt, image)  # every voxel found exactly where the NIfTI affine puts it


def test_dicom_series_read_back_as_label_map(tmp_path):
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    _, label = _volumes()
    paths = io.write_outputs(tmp_path, "l", label.astype(np.int16), None, SPACING, _record(), fmt="dicom",
                             origin=ORIGIN, preview=False, modality="ct")
    array, spacing, affine = io.read_label_map(paths["image"])
    np.testing.assert_array_equal(array, label)
    assert spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(affine, io.ras_affine(SPACING, ORIGIN), atol=1e-4)


def test_dicom_mr_series(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    image, _ = _volumes()
    paths = io.write_outputs(tmp_path, "mr", np.abs(image), None, SPACING, _record(variant="rflow-mr"), fmt="dicom",
                             preview=False, modality="mr")
    ds = pydicom.dcmread(sorted(paths["image"].iterdir())[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"


def test_dicom_seg(tmp_path):
    pytest.importorskip("pydicom")
    hd = pytest.importorskip("highdicom")
    image, label = _volumes()
    paths = io.write_outputs(tmp_path, "d", image, label, SPACING, _record(), fmt="dicom", origin=ORIGIN,
                             modality="ct")  # label names from the MAISI vocabulary
    seg = hd.seg.segread(paths["label"])
    assert seg.SeriesDescription == "SYNTHETIC - fastmaisi labels"
    descriptions = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.segment_label for d in descriptions] == ["liver", "right kidney", "body"]
    assert [d.tracking_id for d in descriptions] == ["label 1", "label 5", "label 200"]
    array, spacing, affine = io.read_label_map(paths["label"])
    assert spacing == pytest.approx(SPACING)
    # SEG stores only non-empty frames: the map read back covers the labelled slices, placed by its affine
    k0 = int(round(np.linalg.solve(io.ras_affine(SPACING, ORIGIN), affine[:, 3])[2]))
    assert array.shape[:2] == SHAPE[:2]
    np.testing.assert_array_equal(array, label[:, :, k0: k0 + array.shape[2]])
    assert not label[:, :, :k0].any() and not label[:, :, k0 + array.shape[2]:].any()


def test_overwrite_switching_format_removes_stale_set(tmp_path):
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    image, label = _volumes()
    io.write_outputs(tmp_path, "s", image, label, SPACING, _record(), fmt="dicom", modality="ct")
    with pytest.raises(ValueError, match="s_image_dicom"):
        io.write_outputs(tmp_path, "s", image, label, SPACING, _record(), fmt="nifti", modality="ct")
    paths = io.write_outputs(tmp_path, "s", image, label, SPACING, _record(), fmt="nifti", overwrite=True,
                             modality="ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_writer_layout_gives_the_same_files_and_quality_check(tmp_path):
    """generate hands the writer Fortran-ordered volumes (NIfTI's order on disk, transposed where the decode ran; the
    label as uint8 when its ids fit): same values, the same file bytes and label table as C-ordered input, the same
    quality check, and ids outside 0..255 still reach the writer's refusal."""
    import gzip

    import torch

    from fastmaisi.io import nifti
    from fastmaisi.labels import quality_check
    from fastmaisi.pipelines.generate import _for_writing

    image, label = _volumes()
    unit = torch.from_numpy((image.astype(np.float32) + 1000) / 2000)
    image_f, label_f = _for_writing(unit, label.astype(np.int16), "ct")
    assert image_f.flags.f_contiguous and label_f.flags.f_contiguous and label_f.dtype == np.uint8
    assert np.array_equal(image_f, image) and np.array_equal(label_f, label)
    assert quality_check(image_f, label_f).as_dict() == quality_check(image, label.astype(np.int16)).as_dict()
    for deflate in ("default", "zlib"):
        real = nifti._gzip_class
        if deflate == "zlib":
            nifti._gzip_class = lambda: gzip.GzipFile
        try:
            for layout in ("c", "f"):
                (tmp_path / deflate / layout).mkdir(parents=True)
            a = io.write_outputs(tmp_path / deflate / "c", "s", image, label, SPACING, _record(), modality="ct")
            b = io.write_outputs(tmp_path / deflate / "f", "s", image_f, label_f, SPACING, _record(), modality="ct")
        finally:
            nifti._gzip_class = real
        for kind in ("image", "label", "labels", "preview"):
            assert a[kind].read_bytes() == b[kind].read_bytes(), (deflate, kind)
        records = [json.loads(p["record"].read_text()) for p in (a, b)]
        for r in records:
            r.pop("created_utc")  # (the only field that may differ: the second it was written)
        assert records[0] == records[1]
    _, wide = _for_writing(unit, np.where(label == 5, 300, label.astype(np.int16)), "ct")
    assert wide.dtype == np.int16 and wide.flags.f_contiguous
    (tmp_path / "wide").mkdir()
    with pytest.raises(ValueError, match="0..255"):
        io.write_outputs(tmp_path / "wide", "s", image_f, wide, SPACING, _record(), modality="ct")
