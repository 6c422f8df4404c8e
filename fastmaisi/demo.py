"""The built-in demo: narrow MAISI networks trained by `scripts/train_demo.py` on our procedural phantoms.

They ship inside the package (`fastmaisi/data/demo/`, a few MB of safetensors), so `fastmaisi generate` runs on a
CPU-only machine without downloads. Same classes and checkpoint layouts as the real variants, only narrower:

    grid        64 x 64 x 64 voxels at 4.5 x 4.5 x 4.0 mm (288 x 288 x 256 mm, the phantoms' lower chest + upper
                abdomen); image latent 4 x 16^3
    image       AutoencoderKlMaisi [16, 32, 32]; rflow DiffusionModelUNetMaisi + ControlNetMaisi [16, 32, 32, 48]
    mask        mask AutoencoderKlMaisi [8, 16, 32] (8 bit-channels in, 125 classes out) and DiffusionModelUNet
                [16, 32, 32, 48] (context: the 10-slot organ-size vector), working directly on the image grid:
                mask latent 4 x 16^3, 100 DDPM steps
    mask v2     NVIDIA's AdaGN rflow-mask UNet [16, 32, 32, 48] (`--mask-generator v2`; 19-number condition, the
                phantoms' one demographic a synthetic weight that follows body size), 100 guided rflow steps; a
                quick CPU-trained toy (record.json: "mask-diffusion-v2")

The demo is a toy: it knows only what the phantoms show (one body shape, the phantom organs and HU), not real CT.

This module runs the demo networks (load, image from a mask, one paired attempt). The demo variant itself (definitions,
grid, weight folder) lives with the variants in the torch-free `fastmaisi.variants`; its quality check (organs found by
HU vs the label map) in `fastmaisi.evaluation.organ_dice`; both are re-exported here.
"""

from __future__ import annotations

import numpy as np

# the demo variant and its weights live with the variants (torch-free); the quality checks with the evaluation
from fastmaisi.evaluation.organ_dice import LUNG_LOBES, dice, organ_dice, organs_by_hu  # noqa: F401
from fastmaisi.variants import (DEMO_FILES, DEMO_MASK_LATENT_SHAPE, DEMO_MASK_SPACING,  # noqa: F401
                                DEMO_MASK_STEPS, DEMO_ORGAN_SIZES, DEMO_SIZE, DEMO_SPACING, DEMO_STEPS, DEMO_VARIANT,
                                DEMO_WEIGHTS_DIR, DEMO_MASK_V2_FILE, DemoVariant,
                                demo_definitions, demo_mask_v2_definition)


def load_demo_models(roles=tuple(DEMO_FILES), device="cpu"):
    """The demo networks (`pipelines.models.Models`, fp32; the mask grid comes from DEMO_VARIANT)."""
    from fastmaisi.pipelines.models import load_models

    return load_models(DEMO_VARIANT, DEMO_WEIGHTS_DIR, list(roles), device=device)


def volume_from_mask(models, label: np.ndarray, seed: int, steps: int = DEMO_STEPS) -> np.ndarray:
    """ControlNet + UNet from a demo-grid label map (X, Y, Z), decoded to HU (float32, not cropped to the body)."""
    from fastmaisi.io import hu_from_unit
    from fastmaisi.pipelines import common, from_mask

    z = from_mask.sample_latent_from_mask(models, label, spacing=DEMO_SPACING, modality_code=1, steps=steps,
                                          guidance_scale=0.0, seed=seed, progress=False)
    return hu_from_unit(common.decode_to_unit(models, z)[0, 0], "ct").astype(np.float32)


def paired_volume(models, seed: int, organ_sizes: dict | None = None, steps: int = DEMO_STEPS,
                  mask_steps: int = DEMO_MASK_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """One attempt of the paired workflow on the demo grid, exactly as `fastmaisi generate` runs it (no retries).

    Returns (image_hu float32 (X, Y, Z), cropped to the body, label uint8 (X, Y, Z)).
    """
    from fastmaisi.pipelines.generate import GenerateRequest, one_volume, resolve

    request = GenerateRequest(output_dir="", variant="demo", organ_sizes=dict(organ_sizes or DEMO_ORGAN_SIZES),
                              steps=steps, mask_steps=mask_steps)
    _, opts = resolve(request)
    image, label, _ = one_volume(models, request.workflow, opts, seed, None, None, False)
    return image.astype(np.float32), label.astype(np.uint8)
