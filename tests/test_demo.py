"""The built-in demo networks (fastmaisi/data/demo): they load, the paired workflow passes the HU quality check, and
images generated from a held-out phantom's label map follow it (HU-threshold Dice). CPU, about a minute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
                                      "mask-vae-volume", "mask-diffusion"}


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


def test_paired_quality_check(models):
    """Organ sizes -> mask -> image for 10 seeds: the mask has the main organs and >= 8 pass the HU check."""
    torch.manual_seed(0)
    passed, plausible = 0, 0
    for seed in range(10):
        image, label = demo.paired_volume(models, seed)
        present = set(np.unique(label).tolist())
        plausible += {1, 200}.issubset(present) and bool(present & set(demo.LUNG_LOBES)) and (label > 0).mean() > 0.3
        passed += quality_check(image, label).passed
    print(f"paired: {passed}/10 pass the quality check, {plausible}/10 masks with body, liver and lungs")
    assert plausible >= 8
    assert passed >= 8
