"""Every command that writes refuses to replace earlier results without --overwrite (train: --resume continues),
and refuses odd input in one line with exit code 2 before any work, leaving the folder as it was."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    return err[-1]


def test_phantom_refuses_an_existing_dataset_then_overwrites(tmp_path, capsys):
    from fastmaisi.phantom import phantom_main

    args = ["-o", str(tmp_path / "ds"), "-n", "1", "--size", "16", "16", "8"]
    assert phantom_main(args) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "ds")
    assert phantom_main([*args, "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "datalist.json" in err[0]
    assert snapshot(tmp_path / "ds") == before
    assert phantom_main([*args, "--seed", "5", "--overwrite"]) == 0
    assert snapshot(tmp_path / "ds") != before
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_convert_refuses_an_existing_output_then_overwrites(tmp_path, capsys):
    from fastmaisi.weights import convert_main

    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    out = tmp_path / "a.safetensors"
    assert convert_main([str(tmp_path / "a.pt"), "-o", str(out)]) == 0
    before = out.read_bytes()
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    assert convert_main([str(tmp_path / "a.pt"), "-o", str(out)]) == 2
    assert "--overwrite" in last_line(capsys) and out.read_bytes() == before
    assert convert_main([str(tmp_path / "a.pt"), "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_train_refuses_a_folder_with_an_earlier_run(tmp_path, capsys):
    from fastmaisi.train.cli import train_main

    out = tmp_path / "run"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"an earlier run")
    (out / "diff_unet_3d_rflow-ct.pt").write_bytes(b"its checkpoint")
    before = snapshot(out)
    assert train_main(["diffusion", "-i", str(tmp_path / "latents"), "-o", str(out), "--steps", "1"]) == 2
    line = last_line(capsys)
    assert "earlier run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_train_vae_patch_size_refused_before_work(tmp_path, capsys):
    from fastmaisi.train.cli import train_main

    out = tmp_path / "new" / "run"
    assert train_main(["vae", "-i", str(tmp_path), "-o", str(out), "--patch-size", "30", "--steps", "1"]) == 2
    assert "multiple of 4" in last_line(capsys) and not (tmp_path / "new").exists()


@pytest.mark.parametrize("main", ["train", "encode"])
def test_unknown_device_refused_at_parse_time(tmp_path, capsys, main):
    from fastmaisi.train.cli import encode_main, train_main

    with pytest.raises(SystemExit) as exc:
        if main == "train":
            train_main(["diffusion", "-i", "x", "-o", str(tmp_path / "o"), "-d", "tpu"])
        else:
            encode_main(["-i", "x", "-o", str(tmp_path / "o"), "--autoencoder", "a.pt", "-d", "tpu"])
    assert exc.value.code == 2 and "choose auto, cpu, cuda or cuda:N" in last_line(capsys)


def test_encode_refuses_a_4d_file_before_encoding(tmp_path, capsys):
    from fastmaisi.train.cli import encode_main

    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), tmp_path / "images" / "a.nii.gz")
    out = tmp_path / "latents"
    assert encode_main(["-i", str(tmp_path / "images"), "-o", str(out), "--autoencoder", str(tmp_path / "ae.pt")]) == 2
    assert "4-D file of 3 volumes" in last_line(capsys) and not out.exists()


def test_encode_refuses_mr_intensities_labelled_ct():
    from fastmaisi.train.encode import _check_intensities

    mr = np.random.default_rng(0).uniform(0, 1000, (8, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="holds no air"):
        _check_intensities(mr, "ct", "mr.nii.gz")
    _check_intensities(mr, "mri_t1", "mr.nii.gz")  # labelled MR: scaled by percentiles, fine
    _check_intensities(mr - 1000, "ct", "ct.nii.gz")


def test_eval_recon_refuses_mr_volumes(tmp_path):
    from fastmaisi.evaluation.recon import evaluate_reconstruction

    mr = np.random.default_rng(0).uniform(0, 1000, (16, 16, 16)).astype(np.int16)
    nib.save(nib.Nifti1Image(mr, np.eye(4)), tmp_path / "mr.nii.gz")
    with pytest.raises(ValueError, match="does not look like CT in HU"):
        evaluate_reconstruction([tmp_path / "mr.nii.gz"], lambda x: x)


def test_eval_fid_warns_on_one_volume_a_side(tmp_path, capsys):
    from fastmaisi.evaluation.cli import eval_main

    for side in ("real", "fake"):
        (tmp_path / side).mkdir()
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / side / "a.nii.gz")
    (tmp_path / "resnet.pth").write_bytes(b"not a state dict")
    assert eval_main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--weights",
                      str(tmp_path / "resnet.pth")]) == 2  # the weights are refused after the warning
    err = capsys.readouterr().err
    assert "warning: FID from 1 real and 1 fake volumes says little" in err


def test_eval_refuses_to_replace_a_report(tmp_path, capsys):
    from fastmaisi.evaluation.cli import eval_main
    from fastmaisi.phantom import write_dataset

    write_dataset(tmp_path / "ds", 1, shape=(16, 16, 8), spacing=(20.0, 20.0, 30.0))
    (tmp_path / "report.json").write_text("{}")
    assert eval_main(["quality", str(tmp_path / "ds"), "--json", str(tmp_path / "report.json")]) == 2
    assert "--overwrite" in last_line(capsys) and (tmp_path / "report.json").read_text() == "{}"
    assert eval_main(["quality", str(tmp_path / "ds"), "--json", str(tmp_path / "report.json"), "--overwrite"]) == 0
    assert "volumes" in json.loads((tmp_path / "report.json").read_text())


def test_phantom_ctrl_c_exit_130_keeps_complete_files(tmp_path, capsys, monkeypatch):
    from fastmaisi import phantom

    real, calls = phantom.make_phantom, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(phantom, "make_phantom", interrupt_second)
    out = tmp_path / "ds"
    assert phantom.phantom_main(["-o", str(out), "-n", "3", "--size", "16", "16", "8"]) == 130
    assert "interrupted" in last_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["phantom_0000_image.nii.gz", "phantom_0000_label.nii.gz"]
    nib.load(out / "phantom_0000_label.nii.gz").get_fdata()  # complete and readable
