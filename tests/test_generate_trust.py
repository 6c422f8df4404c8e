"""`fastmaisi generate` refuses what it cannot do right: records that reproduce or refuse (`--from-record`), odd
values at parse time, runs too big for the machine, faults in one line (exit 2) with no folder left behind."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastmaisi.nets import build
from fastmaisi.pipelines import preflight
from fastmaisi.pipelines.generate_cli import generate_main
from fastmaisi.tiny import TINY_NETWORK_CONFIG

FILES = {"autoencoder_def": "autoencoder_v1.pt", "diffusion_unet_def": "diff_unet_3d_rflow-ct.pt",
         "controlnet_def": "controlnet_3d_rflow-ct.pt"}
GRID = ["--size", "32", "32", "64", "--spacing", "10", "10", "5", "--steps", "2", "-q"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random rflow-ct networks (autoencoder, UNet, ControlNet) and their official-format config."""
    from fastmaisi.config import resolve_network_definition

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    for key, name in FILES.items():
        torch.save(build(resolve_network_definition(TINY_NETWORK_CONFIG, key)).state_dict(), root / name)
    (root / "config_network.json").write_text(json.dumps(TINY_NETWORK_CONFIG))
    return root


def mask_file(path):
    from fastmaisi.phantom import make_phantom

    _, label = make_phantom((32, 32, 64), (10.0, 10.0, 5.0), seed=3)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.diag([10.0, 10.0, 5.0, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def made(weights, tmp_path_factory):
    """One from-mask sample (seed 7) written with relative input paths; returns its folder and the inputs' folder."""
    import os

    root = tmp_path_factory.mktemp("made")
    inputs = root / "inputs"
    shutil.copytree(weights, inputs / "w")
    mask_file(inputs / "mask.nii.gz")
    cwd = os.getcwd()
    os.chdir(inputs)
    try:
        code = generate_main(["-o", str(root / "out"), "--weights", "w", "--network-config", "w/config_network.json",
                              "--mask", "mask.nii.gz", "--seed", "7", "--max-retries", "0", *GRID])
    finally:
        os.chdir(cwd)
    assert code in (0, 3)  # 3: written; the random networks fail the HU quality check
    return root / "out", inputs


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmaisi generate:"), err
    return err[0]


def edited_record(made, tmp_path, edit):
    record = json.loads((made[0] / "sample_000007_record.json").read_text())
    edit(record)
    path = tmp_path / "sample_000007_record.json"
    path.write_text(json.dumps(record))
    return path


def test_record_reproduces_from_another_folder_under_the_original_name(made, tmp_path, monkeypatch):
    out, _ = made
    record = json.loads((out / "sample_000007_record.json").read_text())
    assert Path(record["request"]["mask"]).is_absolute() and Path(record["request"]["weights"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # another folder than the one the inputs were named from
    shutil.copy(out / "sample_000007_record.json", tmp_path / "moved.json")
    assert generate_main(["-o", "again", "--from-record", "moved.json", "-q"]) in (0, 3)
    again = tmp_path / "again"
    for kind in ("image", "label"):  # the same files, byte for byte (no temporary name or time in the gzip header)
        assert (out / f"sample_000007_{kind}.nii.gz").read_bytes() == \
            (again / f"sample_000007_{kind}.nii.gz").read_bytes()
    replay = json.loads((again / "sample_000007_record.json").read_text())["request"]["replay"]
    assert replay["changed_inputs"] == [] and replay["record"].endswith("moved.json")


def test_record_with_relative_paths_reads_them_beside_the_record(made, tmp_path, capsys):
    out, inputs = made
    shutil.copytree(inputs, tmp_path / "bundle")

    def relative(r):
        r["request"].update(mask="bundle/mask.nii.gz", weights="bundle/w",
                            network_config="bundle/w/config_network.json")
    path = edited_record(made, tmp_path, relative)
    assert generate_main(["-o", str(tmp_path / "o"), "--from-record", str(path), "--dry-run"]) == 0


def test_changed_mask_is_refused_unless_allowed(made, tmp_path, capsys):
    out, inputs = made
    shutil.copytree(inputs, tmp_path / "bundle")
    label = np.asarray(nib.load(tmp_path / "bundle/mask.nii.gz").dataobj).copy()
    label[label == 1] = 0  # no liver
    nib.save(nib.Nifti1Image(label, np.diag([10.0, 10.0, 5.0, 1.0])), tmp_path / "bundle/mask.nii.gz")
    path = edited_record(made, tmp_path, lambda r: r["request"].update(mask="bundle/mask.nii.gz"))
    target = tmp_path / "o"
    assert generate_main(["-o", str(target), "--from-record", str(path), "-q"]) == 2
    assert "differ from the recorded SHA-256" in one_line(capsys) and not target.exists()
    assert generate_main(["-o", str(target), "--from-record", str(path), "--allow-changed-inputs", "--dry-run"]) == 0


def test_changed_weights_are_refused(made, tmp_path, capsys):
    out, inputs = made
    shutil.copytree(inputs / "w", tmp_path / "w")
    sd = torch.load(tmp_path / "w/autoencoder_v1.pt")
    next(iter(sd.values())).add_(1.0)
    torch.save(sd, tmp_path / "w/autoencoder_v1.pt")
    path = edited_record(made, tmp_path, lambda r: None)
    assert generate_main(["-o", str(tmp_path / "o"), "--from-record", str(path), "--weights", str(tmp_path / "w")]) == 2
    assert "autoencoder weights" in one_line(capsys) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda r: r["request"].update(colour="blue"), "unknown request key(s) 'colour'"),
    (lambda r: r["request"].update(size="64"), "request 'size' must be 3 integers"),
    (lambda r: r["request"].update(guidance_scale=[1]), "request 'guidance_scale' must be a number"),
    (lambda r: r.update(seed="7"), "'seed' must be an int"),
])
def test_edited_record_is_refused_in_one_line(made, tmp_path, capsys, edit, words):
    path = edited_record(made, tmp_path, edit)
    assert generate_main(["-o", str(tmp_path / "o"), "--from-record", str(path)]) == 2
    assert words in one_line(capsys) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--seed", "5"], ["--num-samples", "3"], ["--size", "64", "64", "64"],
                                   ["--mask", "x.nii.gz"]])
def test_flags_that_change_the_volume_are_refused_with_a_record(made, tmp_path, capsys, flags):
    path = made[0] / "sample_000007_record.json"
    assert generate_main(["-o", str(tmp_path / "o"), "--from-record", str(path), *flags]) == 2
    assert f"{flags[0]} would change it" in one_line(capsys) and not (tmp_path / "o").exists()


def test_device_override_is_recorded(made, tmp_path, capsys):
    from fastmaisi.pipelines.generate_cli import build_parser
    from fastmaisi.pipelines.record_replay import request_from_record

    parser = build_parser()
    args = parser.parse_args(["-o", str(tmp_path), "--from-record", str(made[0] / "sample_000007_record.json"),
                              "-d", "cpu"])
    request = request_from_record(args, parser)
    assert request.device == "cpu" and request.replay["overrides"] == {"device": "cpu"}
    assert request.output_stem == "sample_000007" and request.seed == 7 and request.num_samples == 1


@pytest.mark.parametrize("flags, words", [
    (["--guidance-scale", "nan"], "finite"), (["--seed", "-1"], "must be in 0.."),
    (["--memory-budget-gb", "-1"], "must be > 0"), (["--memory-budget-gb", "0"], "must be > 0"),
    (["--body-region", "brain", "toes"], "invalid choice: 'brain'"), (["--device", "tpu"], "'tpu': choose auto"),
    (["--max-retries", "-1"], "must be >= 0"), (["--body-region", "pelvis", "head"], "TOP must be above BOTTOM"),
    (["--workflow", "paired", "--mask", "MASK"], "--workflow paired generates its own mask"),
    (["--workflow", "image", "--organ-size", "liver=0.1"], "--workflow image uses no --organ-size"),
    (["--organ-size", "liver=nan"], "must be in [0, 1] or -1"),
    (["--allow-changed-inputs"], "goes with --from-record"),
])
def test_odd_values_refused_before_anything(weights, tmp_path, capsys, flags, words):
    out = tmp_path / "new" / "out"
    flags = [str(mask_file(tmp_path / "m.nii.gz")) if f == "MASK" else f for f in flags]
    args = ["-o", str(out), "--weights", str(weights), "--network-config", str(weights / "config_network.json")]
    assert generate_main([*args, *GRID, *flags]) == 2
    assert words in one_line(capsys) and not (tmp_path / "new").exists()


def test_run_too_big_for_ram_is_refused_with_what_fits(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_ram", lambda: 3 << 30)
    out = tmp_path / "out"
    args = ["-o", str(out), "--weights", str(weights), "--network-config", str(weights / "config_network.json"),
            "-d", "cpu", "--size", "512", "512", "512", "--spacing", "1", "1", "1", "-q"]
    assert generate_main(args) == 2
    line = one_line(capsys)
    assert "of RAM" in line and "3.0 GiB available" in line and "would fit" in line and not out.exists()
    assert generate_main([*args, "--dry-run"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_full_disk_is_refused_before_compute(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk", lambda folder: 1000)
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "--weights", str(weights), "--network-config",
                          str(weights / "config_network.json"), *GRID]) == 2
    assert "free space" in one_line(capsys) and not out.exists()


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(weights, tmp_path, capsys, monkeypatch):
    import errno

    from fastmaisi.io import atomic

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic, "_write_file", full)
    monkeypatch.setattr("fastmaisi.io.outputs._write_file", full)
    monkeypatch.setattr("fastmaisi.io.nifti._write_file", full)
    out = tmp_path / "new"
    assert generate_main(["-o", str(out), "--weights", str(weights), "--network-config",
                          str(weights / "config_network.json"), "--max-retries", "0", *GRID]) == 2
    assert "no space left on device" in one_line(capsys).lower() and not out.exists()


def test_dicom_without_pydicom_is_refused_before_compute(weights, tmp_path, capsys, monkeypatch):
    from fastmaisi import io

    def missing(highdicom=False):
        raise ImportError('DICOM support needs pydicom and highdicom (No module named pydicom); pip install x')
    monkeypatch.setattr(io, "_require_dicom", missing)
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "--weights", str(weights), "--network-config",
                          str(weights / "config_network.json"), "--format", "dicom", *GRID]) == 2
    assert "--format dicom: DICOM support needs pydicom" in one_line(capsys) and not out.exists()


def test_cpu_decode_estimate_grows_with_the_volume():
    """1024^3 on a CPU (whole-volume passes) needs more than 512^3: about 8x, as the voxels."""
    from fastmaisi.decode import plan_decode

    small = plan_decode((1, 4, 128, 128, 128), "cpu", None, torch.float32).peak_bytes
    large = plan_decode((1, 4, 256, 256, 256), "cpu", None, torch.float32).peak_bytes
    assert 7 * small < large < 9 * small


def test_original_stem_from_nifti_dicom_or_record_name():
    from fastmaisi.pipelines.record_replay import original_stem

    def record(file):
        return {"outputs": {"image": {"file": file}}, "seed": 100006}
    assert original_stem(record("sample_000003_image.nii.gz"), Path("any.json")) == "sample_000003"
    assert original_stem(record("ct_7_image_dicom"), Path("any.json")) == "ct_7"
    assert original_stem({"seed": 100006}, Path("d/sample_000003_record.json")) == "sample_000003"
    assert original_stem({"seed": 5}, Path("edited.json")) == "sample_000005"
