"""`fastmaisi generate` end to end on CPU: tiny random networks saved in NVIDIA's checkpoint layouts, an official-format
network config, the three workflows, reproduction from the record, and bad input (exit 2, one line, nothing written)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastmaisi.nets import build
from fastmaisi.pipelines.generate import GenerateRequest, resolve
from fastmaisi.pipelines.generate_cli import generate_main
from fastmaisi.tiny import TINY_NETWORK_CONFIG

CONFIG = TINY_NETWORK_CONFIG
FILES = {"autoencoder_def": ("autoencoder_v1.pt", None), "diffusion_unet_def": ("diff_unet_3d_rflow-ct.pt", "unet"),
         "controlnet_def": ("controlnet_3d_rflow-ct.pt", "controlnet"),
         "mask_generation_autoencoder_def": ("mask_generation_autoencoder.pt", None),
         "mask_generation_diffusion_def": ("mask_generation_diffusion_unet.pt", "unet")}
SIZE = ["32", "32", "64"]
SPACING = ["10", "10", "5"]  # field of view inside the trained range: no warning noise


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder in NVIDIA's layouts (raw / unet_state_dict+scale_factor / controlnet_state_dict) + config."""
    from fastmaisi.config import resolve_network_definition

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    for key, (name, layout) in FILES.items():
        net = build(resolve_network_definition(CONFIG, key))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        sd = net.state_dict()
        obj = {"unet": {"unet_state_dict": sd, "scale_factor": torch.tensor(1.3)},
               "controlnet": {"controlnet_state_dict": sd, "epoch": 1}}.get(layout, sd)
        torch.save(obj, root / name)
    (root / "config_network.json").write_text(json.dumps(CONFIG))
    return root


def run(weights, out, *extra):
    args = ["-o", str(out), "--weights", str(weights), "--network-config", str(weights / "config_network.json"),
            "--size", *SIZE, "--spacing", *SPACING, "--steps", "3", "-q", *extra]
    return generate_main(args)


def phantom_mask(path, body=True, bad=None):
    from fastmaisi.phantom import make_phantom

    _, label = make_phantom((32, 32, 64), (10.0, 10.0, 5.0), seed=3)
    label = label.astype(np.int16)
    if not body:
        label[label == 200] = 0
    if bad is not None:
        label[0, 0, 0] = bad
    nib.save(nib.Nifti1Image(label, np.diag([10.0, 10.0, 5.0, 1.0])), path)
    return path


def test_image_workflow_writes_int16_hu_and_record(weights, tmp_path):
    assert run(weights, tmp_path, "--seed", "5") == 0
    img = nib.load(tmp_path / "sample_000005_image.nii.gz")
    assert img.get_data_dtype() == np.int16 and img.shape == (32, 32, 64)
    assert np.allclose(img.header.get_zooms(), (10, 10, 5))
    data = np.asarray(img.dataobj)
    assert data.min() >= -1000 and data.max() <= 1000 and data.std() > 0
    record = json.loads((tmp_path / "sample_000005_record.json").read_text())
    assert record["variant"] == "rflow-ct" and record["workflow"] == "image" and record["seed"] == 5
    assert record["weights"]["diffusion_unet"]["sha256"] and record["scale_factor"] == pytest.approx(1.3)
    assert (tmp_path / "sample_000005_preview.png").stat().st_size > 0


def test_from_mask_and_record_reproduces_bit_for_bit(weights, tmp_path):
    mask = phantom_mask(tmp_path / "mask.nii.gz")
    out = tmp_path / "a"
    assert run(weights, out, "--mask", str(mask), "--max-retries", "0") in (0, 3)  # 3: random weights fail the HU check
    label = np.asarray(nib.load(out / "sample_000000_label.nii.gz").dataobj)
    assert label.dtype == np.uint8 and (label == 200).any() and (label == 1).any()
    image = np.asarray(nib.load(out / "sample_000000_image.nii.gz").dataobj)
    assert (image[label == 0] == -1000).all()  # outside the body: air, as the reference crops
    again = tmp_path / "b"
    assert generate_main(["-o", str(again), "--from-record", str(out / "sample_000000_record.json"), "-q"]) in (0, 3)
    image2 = np.asarray(nib.load(again / "sample_000000_image.nii.gz").dataobj)
    assert np.array_equal(image, image2)


def test_paired_workflow_records_quality_retries(weights, tmp_path):
    code = run(weights, tmp_path, "--organ-size", "liver=0.5", "--mask-steps", "10", "--max-retries", "1")
    record = json.loads((tmp_path / "sample_000000_record.json").read_text())
    assert code == (0 if record["quality_check"]["passed"] else 3)  # the exit status says whether every check passed
    assert record["workflow"] == "paired" and record["resolved"]["anatomy"][1] == 0.5
    # random weights: the HU check runs on the generated label map; a failure triggers a retry with a new seed
    assert record["quality_check"] is not None
    assert len(record["attempts"]) == (1 if record["attempts"][0]["quality_check"]["passed"] else 2)
    assert len({a["seed"] for a in record["attempts"]}) == len(record["attempts"])


def test_dry_run_writes_nothing(weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(weights, out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "Sampling: " in text and "per step, about" in text and "Decode (1, 4" in text and not out.exists()


def test_dry_run_of_a_named_variant_needs_no_weights(tmp_path, capsys):
    """Planning needs only the variant's config: a user can see whether 512^3 fits before fetching weights."""
    out = tmp_path / "out"
    args = ["-o", str(out), "--variant", "rflow-ct", "--size", "512", "512", "512", "--spacing", "1", "1", "1"]
    assert generate_main([*args, "--dry-run", "--memory-budget-gb", "12"]) == 0
    text = capsys.readouterr().out
    assert "(1, 1, 512, 512, 512)" in text and "budget of 12.00 GiB" in text and not out.exists()
    assert generate_main(args) == 2  # a real run still needs them
    assert "no --weights given" in capsys.readouterr().err and not out.exists()


def test_rerun_resumes_another_request_is_refused_then_overwritten(weights, tmp_path, capsys):
    assert run(weights, tmp_path) == 0
    before = (tmp_path / "sample_000000_record.json").read_text()
    assert run(weights, tmp_path) == 0  # the same request: complete, nothing to make
    assert (tmp_path / "sample_000000_record.json").read_text() == before
    assert run(weights, tmp_path, "--guidance-scale", "3") == 2
    assert "overwrite" in capsys.readouterr().err
    assert run(weights, tmp_path, "--guidance-scale", "3", "--overwrite") == 0
    after = json.loads((tmp_path / "sample_000000_record.json").read_text())
    assert after["seed"] == json.loads(before)["seed"] and after["resolved"]["guidance_scale"] == 3


@pytest.mark.parametrize("case", ["no_body_strict", "label_300", "float_mask", "size", "organ", "missing_weights",
                                  "weights_not_a_folder", "variant", "modality"])
def test_bad_input_exit_2_one_line_nothing_written(weights, tmp_path, capsys, case):
    out = tmp_path / "out"
    extra = []
    w = weights
    if case == "no_body_strict":
        extra = ["--mask", str(phantom_mask(tmp_path / "m.nii.gz", body=False)), "--strict-mask"]
    elif case == "label_300":
        extra = ["--mask", str(phantom_mask(tmp_path / "m.nii.gz", bad=300))]
    elif case == "float_mask":
        nib.save(nib.Nifti1Image(np.random.rand(32, 32, 64).astype(np.float32), np.eye(4)), tmp_path / "f.nii.gz")
        extra = ["--mask", str(tmp_path / "f.nii.gz")]
    elif case == "size":
        extra = ["--size", "30", "32", "64"]
    elif case == "organ":
        extra = ["--organ-size", "livr=0.5"]
    elif case == "missing_weights":
        w = tmp_path / "empty"
        w.mkdir()
        (w / "config_network.json").write_text(json.dumps(CONFIG))
    elif case == "weights_not_a_folder":
        w = tmp_path / "model.pt"
        w.write_bytes(b"not a folder")
    elif case == "variant":
        extra = ["--variant", "rflow-xx"]
    elif case == "modality":
        extra = ["--modality", "mri_t1"]
    code = run(w, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fastmaisi generate:"), err
    if case in ("missing_weights", "weights_not_a_folder"):
        assert ("missing autoencoder_v1.pt, diff_unet" if case == "missing_weights" else "not a folder") in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_mask_db_picks_best_fit_and_walks_candidates_on_retry(weights, tmp_path):
    from fastmaisi.pipelines.mask_db import rank_candidates

    db = tmp_path / "db"
    db.mkdir()
    phantom_mask(db / "a_fits.nii.gz")  # 32x32x64 at 10x10x5 mm: the requested grid
    from fastmaisi.phantom import make_phantom

    _, far = make_phantom((32, 32, 32), (12.0, 12.0, 12.0), seed=4)
    nib.save(nib.Nifti1Image(far.astype(np.int16), np.diag([12.0, 12.0, 12.0, 1.0])), db / "b_far.nii.gz")
    ranked = rank_candidates(db, (32, 32, 64), (10.0, 10.0, 5.0))
    assert [p.name for p in ranked] == ["a_fits.nii.gz", "b_far.nii.gz"]
    out = tmp_path / "out"
    assert run(weights, out, "--mask-db", str(db), "--max-retries", "1") in (0, 3)
    record = json.loads((out / "sample_000000_record.json").read_text())
    assert record["workflow"] == "from-mask"
    names = [Path(a["mask"]["path"]).name for a in record["attempts"]]
    assert names[0] == "a_fits.nii.gz" and (len(names) == 1 or names[1] == "b_far.nii.gz")


def test_ab2_sampler_option(weights, tmp_path):
    assert run(weights, tmp_path / "a", "--steps", "4", "--sampler", "ab2") == 0
    assert json.loads((tmp_path / "a" / "sample_000000_record.json").read_text())["resolved"]["sampler"] == "ab2"


def test_ranks_split_samples_without_collisions(weights, tmp_path, monkeypatch):
    """Under torchrun each rank takes samples i % world == rank: disjoint files, union complete, rank recorded."""
    written = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        before = set(tmp_path.glob("*_record.json"))
        assert run(weights, tmp_path, "--num-samples", "3", "--seed", "10", "--max-retries", "0", "--device", "cpu") == 0
        written[rank] = set(tmp_path.glob("*_record.json")) - before
    assert {p.name for p in written[0]} == {"sample_000010_record.json", "sample_000012_record.json"}
    assert {p.name for p in written[1]} == {"sample_000011_record.json"}
    for rank, files in written.items():
        for f in files:
            rec = json.loads(f.read_text())
            assert rec["rank"] == rank and rec["world_size"] == 2 and rec["seed"] == int(f.name[7:13])


def test_device_under_torchrun_is_the_local_gpu_and_current(monkeypatch):
    """auto / a bare cuda mean cuda:<LOCAL_RANK> under torchrun, and that GPU becomes the current device (the Triton
    kernels launch on the current device; without it rank 1's kernels would run on GPU 0)."""
    from fastmaisi.pipelines.generate import _device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert _device("auto", 1) == torch.device("cuda", 1) and current[-1] == torch.device("cuda", 1)
    assert _device("cuda", 1) == torch.device("cuda", 1) and current[-1] == torch.device("cuda", 1)
    assert _device("cuda:0", 1) == torch.device("cuda", 0) and current[-1] == torch.device("cuda", 0)
    assert _device("auto") == torch.device("cuda", 0)
    assert _device("cpu", 1) == torch.device("cpu") and len(current) == 4


def test_no_weights_says_what_to_pass(tmp_path, capsys):
    """A MAISI variant without --weights: exit 2, one line naming --weights (and the demo), nothing written."""
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "-q", "--variant", "rflow-ct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no --weights given" in err[0] and "--weights DIR" in err[0], err
    assert "built-in demo" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_no_weights_without_demo_files_fails_cleanly(tmp_path, capsys, monkeypatch):
    """No --weights and the demo weights missing (a trimmed install): exit 2, one line naming the files."""
    import fastmaisi.variants

    monkeypatch.setattr(fastmaisi.variants, "DEMO_WEIGHTS_DIR", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("no --weights:")]
    assert len(err) == 1 and "demo weights are not installed" in err[0] and "demo_autoencoder.pt" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_demo_is_the_default_without_weights():
    """No --weights: the demo variant, paired at its organ sizes and 100 mask steps; with --weights: rflow-ct."""
    from fastmaisi.demo import DEMO_MASK_STEPS, DEMO_ORGAN_SIZES, DEMO_SIZE
    from fastmaisi.labels import anatomy_size_vector

    request = GenerateRequest(output_dir="x")
    variant, opts = resolve(request)
    assert variant.name == "demo" and request.workflow == "paired"
    assert opts["size"] == DEMO_SIZE and opts["mask_steps"] == DEMO_MASK_STEPS
    assert opts["anatomy"] == anatomy_size_vector(DEMO_ORGAN_SIZES)
    request = GenerateRequest(output_dir="x", weights="w")
    variant, opts = resolve(request)
    assert variant.name == "rflow-ct" and request.workflow == "image" and opts["mask_steps"] == 1000
    with pytest.raises(ValueError, match="needs organ sizes"):
        resolve(GenerateRequest(output_dir="x", weights="w", workflow_name="paired"))


def test_dry_run_plans_the_variants_own_autoencoder():
    """--dry-run plans the decode of the variant's autoencoder: the narrow demo VAE needs less than MAISI's."""
    import re

    from fastmaisi.pipelines.generate import _plan_text
    from fastmaisi.variants import get_variant

    opts = {"size": (64, 64, 64), "steps": 30}
    gib = [float(re.search(r"peak device memory ([0-9.]+) GiB", _plan_text(opts, torch.device("cpu"), None,
                                                                           variant=get_variant(name))).group(1))
           for name in ("demo", "rflow-ct")]
    assert gib[0] < gib[1] / 2, gib
