"""`fastmaisi encode`: images -> latent files + sidecar JSON for diffusion / ControlNet training.

The reference's rules (NV-Generate-CTMR `diff_model_create_training_data.py`, pipeline.md §1.5); file layout in
`fastmaisi.train.data`.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastmaisi.train import data as D
from fastmaisi.train.loop import Dist
from fastmaisi.train.trainers import build_net, load_weights

log = logging.getLogger("fastmaisi.train")


@dataclass
class EncodeRequest:
    source: Path  # image folder or datalist JSON
    out_dir: Path
    autoencoder: Path  # weights
    definition: dict  # autoencoder definition
    base_dir: Path | None = None
    labels: Path | None = None  # folder of label maps named like the images (datalist entries may name "label")
    modality: str = "ct"
    multiple: int = 128
    latent: str = "sample"  # "sample" (the reference) or "mean"
    seed: int = 0
    precision: str = "fp32"
    memory_budget_bytes: int | None = None
    overwrite: bool = False
    max_bad_fraction: float = 0.1


def _relative_stem(image: Path, root: Path) -> Path:
    try:
        rel = Path(os.path.abspath(image)).relative_to(os.path.abspath(root))  # symlinks kept as named
    except ValueError:
        rel = Path(image.name)
    return rel.with_name(D.nifti_stem(rel))


def _refuse_multi_volume(items) -> None:
    """4-D files holding several volumes (a time series, several MR contrasts) are not one CT/MR image: refused
    before anything is encoded (headers only), rather than silently encoding the first volume as the image."""
    import nibabel as nib

    for item in items:
        try:
            shape = nib.load(str(item["image"])).shape
        except Exception:  # unreadable: counted and skipped by the loop
            continue
        if len(shape) == 4 and shape[3] > 1:
            raise ValueError(f"{item['image']}: a 4-D file of {shape[3]} volumes {tuple(shape)}; encode takes one 3-D "
                             "volume per file: split it first")


def _check_intensities(x, modality, path) -> None:
    """CT must be in HU: a volume without air (1st percentile above -500) is MR or normalised, and scaling it as HU
    would encode nonsense."""
    from fastmaisi.labels import modality_code

    if modality_code(modality) <= 7 and x.size and float(np.percentile(x, 1)) > -500:
        raise ValueError(f"{path}: labelled CT (modality {modality!r}) but holds no air (1st percentile "
                         f"{float(np.percentile(x, 1)):.0f}, CT has about -1000 HU): pass --modality for MR, or HU")


def encode_volumes(req: EncodeRequest, dist: Dist | None = None, progress: bool = True) -> dict:
    """Images -> `<out>/<relative name>_emb.nii.gz` latents + sidecar JSON (diff_model_create_training_data.py rules:
    RAS, each axis resized (trilinear) to the nearest multiple of `multiple` (min `multiple`), CT [-1000, 1000] ->
    [0, 1] clipped / MR percentiles [0, 99.5] -> [0, 1], exact encode via fastmaisi.decode.encode_image, z sampled
    with a seed per image (or the mean)). A label map given with an image is resized (nearest) to the same grid and
    written as `<name>_label.nii.gz`; its body regions go into the sidecar. Processes of a torchrun job take every
    world_size-th image. Returns counts: written, existing (skipped), unreadable.
    """
    import nibabel as nib
    from tqdm.auto import tqdm

    from fastmaisi.decode import encode_image
    from fastmaisi.labels import body_region_from_mask
    from fastmaisi.train.loop import PRECISIONS

    dist = dist or Dist()
    source = Path(req.source)
    root = source if source.is_dir() else (req.base_dir or source.parent)
    items = D.list_volumes(source, "image", req.base_dir)
    if not items:
        raise ValueError(f"no images found in {source}")
    _refuse_multi_volume(items)
    vae = build_net(req.definition)
    load_weights(vae, req.autoencoder, "autoencoder")
    vae = vae.to(dist.device).eval().requires_grad_(False)
    dtype = PRECISIONS[req.precision]
    counts = {"written": 0, "existing": 0, "unreadable": 0}
    mine = [(i, item) for i, item in enumerate(items) if i % dist.world_size == dist.rank]
    for i, item in tqdm(mine, desc="encode", disable=not (progress and dist.is_main)):
        image_path = Path(item["image"])
        stem = req.out_dir / _relative_stem(image_path, root)
        out = stem.with_name(stem.name + D.LATENT_SUFFIX)
        if out.exists() and not req.overwrite:
            counts["existing"] += 1
            continue
        label_path = item.get("label") or (req.labels / image_path.name if req.labels else None)
        try:
            x, _, affine = D.read_image(image_path)
            label = None if label_path is None else D.read_label(label_path)[0]
        except (ValueError, OSError) as e:  # missing, truncated, not NIfTI: skip and count
            counts["unreadable"] += 1
            log.warning("skipping %s: %s", image_path, e)
            D.check_bad_fraction(counts["unreadable"], len(mine), req.max_bad_fraction)
            continue
        if label is not None and label.shape != x.shape:
            raise ValueError(f"label map {label_path} has shape {label.shape} but its image {image_path} has "
                             f"shape {x.shape}; they must share one grid")
        modality = item.get("modality", item.get("class", req.modality))
        _check_intensities(x, modality, image_path)
        shape = D.encoded_shape(x.shape, req.multiple)
        image = torch.from_numpy(D.scale_intensity(x, modality))[None].to(dist.device)
        image = D.resize(image, shape)[None]  # (1, 1, *shape), trilinear
        with torch.no_grad(), (torch.autocast(dist.device.type, dtype=dtype) if dtype else nullcontext()):
            z_mu, z_sigma = encode_image(vae, image, req.memory_budget_bytes)
        z = z_mu.float()
        if req.latent == "sample":
            eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(D.derive_seed(req.seed, i)))
            z = z + z_sigma.float() * eps.to(z.device)
        new_affine = D.resized_affine(affine, x.shape, shape)
        spacing = [round(float(s), 6) for s in np.linalg.norm(new_affine[:3, :3], axis=0)]
        sidecar = {"dim": list(shape), "spacing": spacing, "modality": modality}
        if label is not None:
            small = D.resize(torch.from_numpy(label.astype(np.int16))[None], shape, mode="nearest")[0].numpy()
            label_out = stem.with_name(stem.name + "_label.nii.gz")
            img = nib.Nifti1Image(small.astype(np.uint8 if small.max() <= 255 else np.int16), new_affine)
            D.atomic_write(label_out, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")
            sidecar["label"] = label_out.name
            try:
                sidecar["top_region_index"], sidecar["bottom_region_index"] = body_region_from_mask(small)
            except ValueError:
                log.info("%s: no body-region landmark in the label map; no region indices written", label_path)
        D.write_latent(out, z[0], new_affine)
        D.write_json(str(out) + ".json", sidecar)
        counts["written"] += 1
    return counts
