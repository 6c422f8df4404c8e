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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmaisi.variants import _AE, _CNET, _MASK_UNET, _UNET, RFLOW_SCHEDULER_DEF, Variant

DEMO_WEIGHTS_DIR = Path(__file__).parent / "data" / "demo"
DEMO_SIZE = (64, 64, 64)
DEMO_SPACING = (4.5, 4.5, 4.0)
DEMO_STEPS = 30  # rflow steps of the image DM (ControlNet + UNet)
DEMO_MASK_STEPS = 100  # DDPM steps of the mask DM (divides 1000)
DEMO_MASK_LATENT_SHAPE = (4, 16, 16, 16)  # the mask DM's latent: the demo grid / 4
DEMO_MASK_SPACING = DEMO_SPACING  # the mask VAE decodes straight onto the demo grid
DEMO_FILES = {"autoencoder": "demo_autoencoder", "diffusion_unet": "demo_diffusion_unet",
              "controlnet": "demo_controlnet", "mask_autoencoder": "demo_mask_autoencoder",
              "mask_diffusion": "demo_mask_diffusion_unet"}
DEMO_ORGAN_SIZES = {"gallbladder": 0.0025, "liver": 0.106, "stomach": 0.0164, "pancreas": 0.0053, "colon": 0.0268}
"""Default organ sizes of the paired workflow: the training phantoms' medians (organ voxels / labelled voxels,
`train.data.organ_size_vector`); tumour slots -1 (absent)."""


def _ae(in_channels: int, out_channels: int, channels, res_blocks, transposed: bool) -> dict:
    return dict(_target_=_AE, spatial_dims=3, in_channels=in_channels, out_channels=out_channels, latent_channels=4,
                num_channels=list(channels), num_res_blocks=list(res_blocks), norm_num_groups=8, norm_eps=1e-6,
                attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=transposed,
                norm_float16=False, num_splits=1, dim_split=1)


def _trunk() -> dict:
    """Keyword arguments shared by the demo image UNet and its ControlNet (the rflow-ct trunk, narrow)."""
    return dict(spatial_dims=3, in_channels=4, num_channels=[16, 32, 32, 48],
                attention_levels=[False, False, True, True], num_head_channels=[0, 0, 16, 16], num_res_blocks=1,
                norm_num_groups=8, use_flash_attention=True, num_class_embeds=128, resblock_updown=True,
                include_fc=True)


def demo_definitions() -> dict:
    """Network definitions of the demo, by role (the official `*_def` layout)."""
    return {
        "autoencoder": _ae(1, 1, (16, 32, 32), (1, 1, 1), False),
        "diffusion_unet": dict(_target_=_UNET, out_channels=4, **_trunk(), include_top_region_index_input=False,
                               include_bottom_region_index_input=False, include_spacing_input=True),
        "controlnet": dict(_target_=_CNET, conditioning_embedding_in_channels=8,
                           conditioning_embedding_num_channels=[8, 16, 16], **_trunk()),
        "mask_autoencoder": _ae(8, 125, (8, 16, 32), (1, 1, 1), True),
        "mask_diffusion": dict(_target_=_MASK_UNET, spatial_dims=3, in_channels=4, out_channels=4,
                               channels=[16, 32, 32, 48], attention_levels=[False, False, True, True],
                               num_head_channels=[0, 0, 16, 16], num_res_blocks=1, norm_num_groups=8,
                               use_flash_attention=True, with_conditioning=True, upcast_attention=True,
                               cross_attention_dim=10),
    }


DEMO_MASK_V2_FILE = "demo_mask_diffusion_unet_v2"


def demo_mask_v2_definition() -> dict:
    """The demo's v2 mask generator: NVIDIA's AdaGN UNet narrowed like the demo's v1 mask UNet (19-number condition,
    spacing input), on the 16^3 demo mask latent."""
    from fastmaisi.variants import MASK_DIFFUSION_V2_DEF

    return dict(MASK_DIFFUSION_V2_DEF, num_channels=[16, 32, 32, 48], num_head_channels=[0, 0, 16, 16],
                num_res_blocks=1, norm_num_groups=8, adagn_context_embed_dim=64)


@dataclass(frozen=True)
class DemoVariant(Variant):
    """A `Variant` whose networks are the narrow demo definitions; the mask DM works on the image grid."""

    def definitions(self) -> dict:
        defs = {role: d for role, d in demo_definitions().items() if role in self.files}
        if self.mask_generator == "v2":
            defs["mask_diffusion"] = demo_mask_v2_definition()
        return defs

    @property
    def v2_mask_file(self) -> str:
        return DEMO_MASK_V2_FILE


DEMO_VARIANT = DemoVariant("demo", "ct", False, RFLOW_SCHEDULER_DEF, DEMO_STEPS, DEMO_SIZE, DEMO_SPACING, 1, 0.0,
                           dict(DEMO_FILES), mask_steps=DEMO_MASK_STEPS, mask_latent_shape=DEMO_MASK_LATENT_SHAPE,
                           mask_spacing=DEMO_MASK_SPACING, default_organ_sizes=dict(DEMO_ORGAN_SIZES))


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


# ------------------------------------------------------------------------------------------ checks (tests, record)
LUNG_LOBES = (28, 29, 30, 31, 32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def organs_by_hu(image_hu: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Body, lungs and liver found by HU (the label map only places the liver's search box and HU window):

    body   HU > -500, holes filled per axial slice (the lungs lie inside it)
    lungs  HU < -500 inside that body
    liver  3x3x3 median-filtered HU within +-25 HU of its median over the conditioning liver, inside the liver's
           bounding box grown by 2 voxels, opened by one voxel, largest connected piece. The box also holds spleen,
           pancreas and muscle within ~50 HU of the enhanced liver, so even a phantom's own image scores ~0.87.
    """
    from scipy import ndimage

    body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(image_hu > -500, 2, 0)], axis=2)
    liver_true = label == 1
    smooth = ndimage.median_filter(image_hu, 3)
    where = np.argwhere(liver_true)
    lo, hi = np.maximum(where.min(0) - 2, 0), where.max(0) + 3
    box = np.zeros_like(liver_true)
    box[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    liver = ndimage.binary_opening(box & (np.abs(smooth - np.median(smooth[liver_true])) < 25.0))
    pieces, n = ndimage.label(liver)
    if n > 1:
        liver = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    return {"body": body, "lungs": (image_hu < -500) & body, "liver": liver}


def organ_dice(image_hu: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Dice of `organs_by_hu` against the label map's body (> 0), lung lobes and liver (needs a liver label)."""
    truth = {"body": label > 0, "lungs": np.isin(label, LUNG_LOBES), "liver": label == 1}
    found = organs_by_hu(image_hu, label)
    return {k: dice(found[k], truth[k]) for k in truth}
