"""The built-in demo networks (fastmaisi/data/demo): they load, `fastmaisi generate` without weights runs the paired
workflow and passes the HU quality check, and images generated from a held-out phantom's label map follow it
(HU-threshold Dice). CPU, a few minutes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastmaisi import demo
from fastmaisi.labels import quality_check

pytestmark = pytest.mark.skipif(
    not all((demo.DEMO_WEIGHTS_DIR / f"{stem}.safetensors").is_file() for stem in demo.DEMO_FILES.values()),
    reason="demo weights not built (python scripts/train_demo.py)")

HELD_OUT_SEEDS = (1000, 1001, 1002)  # phantoms not in the training set (seeds 0..79)


@pytest.fixture(scope="module")
def models():
    return demo.load_demo_models()


def test_definitions_and_files():
    """Same classes as the real variants, narrow; files = the variant's stems; sizes fit the latent grid."""
    defs = demo.DEMO_VARIANT.definitions()
    assert set(defs) == set(demo.DEMO_FILES)
    assert all(s % 32 == 0 for s in demo.DEMO_SIZE)
    assert demo.DEMO_MASK_LATENT_SHAPE[1:] == tuple(s // 4 for s in demo.DEMO_SIZE)
    assert 1000 % demo.DEMO_MASK_STEPS == 0
    total = sum((demo.DEMO_WEIGHTS_DIR / f"{s}.safetensors").stat().st_size for s in demo.DEMO_FILES.values())
    assert total <= 25e6
    record = json.loads((demo.DEMO_WEIGHTS_DIR / "record.json").read_text())
    assert set(record["recipes"]) == {"vae", "vae-volume", "diffusion", "controlnet", "mask-vae",
                                      "mask-vae-volume", "mask-diffusion", "mask-diffusion-v2"}
    v2 = demo.DEMO_VARIANT.with_mask_generator("v2")
    assert (demo.DEMO_WEIGHTS_DIR / f"{v2.files['mask_diffusion']}.safetensors").is_file()


def test_dice_rule_ceiling():
    """The HU rules on the phantom's own image: what a perfect generator would score."""
    from fastmaisi.phantom import make_phantom

    image, label = make_phantom(demo.DEMO_SIZE, demo.DEMO_SPACING, seed=HELD_OUT_SEEDS[0], tumour="liver")
    d = demo.organ_dice(image, label)
    assert d["body"] > 0.98 and d["lungs"] > 0.98 and d["liver"] > 0.8, d


def test_from_mask_follows_the_mask(models):
    """Held-out phantom label maps -> images: body, lungs and liver found by HU overlap the conditioning mask."""
    from fastmaisi.phantom import make_phantom

    scores = []
    for k, seed in enumerate(HELD_OUT_SEEDS):
        _, label = make_phantom(demo.DEMO_SIZE, demo.DEMO_SPACING, seed=seed, tumour=(None, "liver", "lung")[k])
        image = demo.volume_from_mask(models, label, seed=k)
        scores.append(demo.organ_dice(image, label))
    mean = {organ: float(np.mean([s[organ] for s in scores])) for organ in scores[0]}
    print("from-mask Dice", mean)
    assert mean["body"] >= 0.9 and mean["lungs"] >= 0.8 and mean["liver"] >= 0.6, mean
    assert np.mean(list(mean.values())) >= 0.7, mean


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    """`generate` with no weights and no options (the demo, paired workflow) for seeds 0..9, default retries."""
    from fastmaisi.pipelines.generate import GenerateRequest, generate

    out = tmp_path_factory.mktemp("demo_paired")
    return generate(GenerateRequest(output_dir=str(out), num_samples=10), progress=False)


def test_paired_quality_check(paired_run):
    """10 seeds: every written volume comes with a plausible mask, and >= 8 pass the per-organ HU check."""
    import nibabel as nib

    assert len(paired_run) == 10
    passed, plausible, first_try = 0, 0, 0
    for r in paired_run:
        record = r["record"]
        assert record["variant"] == "demo" and record["workflow"] == "paired"
        label = np.asarray(nib.load(r["paths"]["label"]).dataobj)
        present = set(np.unique(label).tolist())
        plausible += {1, 200}.issubset(present) and bool(present & set(demo.LUNG_LOBES)) and (label > 0).mean() > 0.3
        passed += record["quality_check"]["passed"]
        first_try += record["attempts"][0]["quality_check"]["passed"]
    print(f"paired: {passed}/10 written volumes pass the quality check ({first_try}/10 at the first attempt), "
          f"{plausible}/10 masks with body, liver and lungs")
    assert plausible >= 8
    assert passed >= 8


def test_generate_cli_runs_the_demo(tmp_path):
    """`fastmaisi generate -o DIR` in a fresh process: one line says the demo is used (timed by bench/bench_demo.py)."""
    import subprocess
    import sys

    import nibabel as nib

    proc = subprocess.run([sys.executable, "-m", "fastmaisi", "generate", "-o", str(tmp_path), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("no --weights: the built-in demo networks"), proc.stderr
    image = nib.load(tmp_path / "sample_000000_image.nii.gz")
    assert image.shape == demo.DEMO_SIZE and image.get_data_dtype() == np.int16
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), demo.DEMO_SPACING)
    record = json.loads((tmp_path / "sample_000000_record.json").read_text())
    assert record["variant"] == "demo" and record["quality_check"]["passed"]
