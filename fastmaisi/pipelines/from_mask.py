"""Workflow 2: image from a label map (ControlNet + UNet), with tumour guidance."""

from __future__ import annotations

import numpy as np
import torch

from fastmaisi.nets.derived import reuse_derived_weights
from fastmaisi.pipelines.common import latent_noise, region_tensor, regions_from_label, spacing_tensor
from fastmaisi.pipelines.models import Models
from fastmaisi.pipelines.sampling import image_denoiser, sample
from fastmaisi.schedulers import build as build_scheduler

# the reference's `remove_tumors`: these tumours become their host organ (kidney cysts 116/117 their kidney)
TUMOUR_TO_HOST = {26: 1, 24: 4, 27: 62, 116: 14, 117: 5}
LUNG_TUMOUR, LUNG_LOBES = 23, (28, 29, 30, 31, 32)
BRAIN_TUMOUR_TO_BRAIN = {176: 22}


def remove_tumours(label: np.ndarray) -> np.ndarray:
    """The tumour-free mask the unconditional branch of tumour guidance sees, by the reference's rules
    (`remove_tumors`, `remove_tumors_majority_vote`); bone lesion 128 is kept, as there.

    1. hepatic 26 -> liver 1, pancreatic 24 -> pancreas 4, colon 27 -> colon 62, cysts 116 -> 14, 117 -> 5;
    2. lung tumour 23 -> the lobe most frequent in its ring (the 3^3 dilation of the tumour, with the volume's faces
       counting as dilated, less the tumour; smallest lobe id on ties); when no lobe touches the ring, the lobe
       most frequent in the whole map (28 first on ties);
    3. 176 -> brain 22.
    """
    out = label.copy()
    for tumour, host in TUMOUR_TO_HOST.items():
        out[label == tumour] = host
    tumour = out == LUNG_TUMOUR
    if tumour.any():
        out[tumour] = _ring_majority_lobe(out, tumour)
    for tumour_id, host in BRAIN_TUMOUR_TO_BRAIN.items():
        out[out == tumour_id] = host
    return out


def _ring_majority_lobe(label: np.ndarray, tumour: np.ndarray) -> int:
    from scipy import ndimage

    from fastmaisi.pipelines.mask_postprocess import bounding_box

    box = bounding_box(tumour, pad=2)
    ring = np.zeros(label.shape, bool)
    ring[box] = ndimage.binary_dilation(tumour[box], np.ones((3, 3, 3), bool))
    for axis in range(3):  # the reference dilates with the outside counted as tumour: every face voxel is in
        ring[(slice(None),) * axis + (0,)] = True
        ring[(slice(None),) * axis + (-1,)] = True
    values = label[ring & ~tumour].astype(np.int64)
    counts = np.bincount(values, minlength=max(LUNG_LOBES) + 1)[list(LUNG_LOBES)]
    if counts.max() == 0:
        counts = np.array([np.count_nonzero(label == lobe) for lobe in LUNG_LOBES])
    return LUNG_LOBES[int(counts.argmax())]


def bit_channels(label: np.ndarray, device, dtype) -> torch.Tensor:
    """Label map (X, Y, Z) -> ControlNet condition (1, 8, X, Y, Z): bit k of the label id, LSB first. The map crosses
    to the device in its own dtype and is expanded there (at 512^3: 128 MiB of uint8 instead of 2 GiB of fp16), on
    CUDA straight into the channels-last layout the networks run in."""
    from fastmaisi.labels import binarize_labels

    ids = torch.from_numpy(np.ascontiguousarray(label))[None, None]
    return binarize_labels(ids.to(device), dtype=dtype, channels_last=torch.device(device).type == "cuda")


def label_ids(label: np.ndarray, device) -> torch.Tensor:
    """Label map (X, Y, Z), ids 0..255 -> (1, 1, X, Y, Z) uint8 on the device: the ControlNet condition in its compact
    form (128 MiB at 512^3); the ControlNet expands it into the bit-channels itself (`ControlNetMaisi.embed_labels`:
    on CUDA without ever building them)."""
    if label.dtype != np.uint8:
        lo, hi = (int(v) for v in (label.min(), label.max())) if label.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"label: ids must be in 0..255 for MAISI's 8 bit-channels, got {lo}..{hi}")
        label = label.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(label))[None, None].to(device)


@torch.no_grad()
def sample_latent_from_mask(models: Models, label: np.ndarray, *, spacing, modality_code: int, steps: int,
                            guidance_scale: float, seed: int, progress: bool = True,
                            sampler: str = "euler") -> torch.Tensor:
    """Noise -> latent (1, 4, *label.shape/4) conditioned on `label` through the ControlNet."""
    device, dtype = models.device, models.dtype
    variant = models.variant
    x = latent_noise(seed, (1, 4, *[s // 4 for s in label.shape]), device, dtype)
    kwargs = dict(spacing=spacing_tensor(spacing, device, dtype, fp16_first=True), guidance_scale=guidance_scale,
                  condition=label_ids(label, device))
    if guidance_scale > 0:
        kwargs["uncond_condition"] = label_ids(remove_tumours(label), device)
    if variant.body_region:
        top, bottom = regions_from_label(label)
        kwargs.update(top_region=region_tensor(top, device, dtype), bottom_region=region_tensor(bottom, device, dtype))
    else:
        kwargs["class_labels"] = torch.tensor([modality_code], device=device, dtype=torch.long)
    denoise = image_denoiser(models.diffusion_unet, models.controlnet, **kwargs)
    del kwargs  # the full-resolution label maps: the denoiser keeps only their embedding
    g = torch.Generator(device=device).manual_seed(int(seed) + 1)  # DDPM's per-step noise (RFlow draws none)
    with reuse_derived_weights(models.diffusion_unet, models.controlnet):
        return sample(denoise, build_scheduler(models.scheduler_def), x, steps, generator=g, disable=not progress,
                      desc="image DM", method=sampler, cuda_graph=models.cuda_graphs)


def blank_outside_body(unit: torch.Tensor, label) -> torch.Tensor:
    """The reference's crop to the body: voxels outside every label (label 0) become air (CT, -1000 HU) or 0 (MR).
    Done on the decoder output (unit range, (*S)) where it lies, before the intensity mapping: unit 0 maps to
    exactly those values, so this equals cropping the mapped image, without a pass over it on the host."""
    outside = torch.as_tensor(np.ascontiguousarray(label) if isinstance(label, np.ndarray) else label,
                              device=unit.device) == 0
    return unit.masked_fill(outside, 0.0)
