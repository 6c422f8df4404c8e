"""The five MAISI training recipes as `Task`s for the one loop (`loop.train`).

Each recipe is a per-sample loss function and a `setup_*` that builds the networks, the dataset and the official
checkpoint layout (reference: NV-Generate-CTMR, pipeline.md §1.5, §5):

    vae             L1 + 1e-7 KL + 0.3 LPIPS-squeeze (fake 3-D, only with --perceptual-weights) + 0.1 least-squares
                    PatchGAN; the discriminator's loss (x 0.1, as MONAI's tutorials) is trained in the same step
                    (see AutoencoderGAN)
    diffusion       rectified flow (target x0 - eps) or DDPM (target eps, or v / x0 per prediction_type), L1;
                    spacing x100, modality (coarsened / dropped with p 0.1) or body-region conditioning;
                    scale_factor = 1/std of the first global batch of latents
    controlnet      frozen DM, ControlNet initialised from the DM's matching weights, x100 weighted L1 on ROI labels,
                    region-contrastive loss (rflow-ct: delta 2, weight 0.01)
    mask-vae        8 bit-channels in, 125 classes out: cross-entropy against the class index + 1e-7 KL (our recipe:
                    the reference has no training code)
    mask-diffusion  DDPM, epsilon target, L1 (or MSE), context = the 10-slot organ-size vector of the label map
                    (data.organ_size_vector), latents from a frozen mask VAE (our recipe)

Every random number of a sample (noise, timestep, modality dropout, VAE sampling, perceptual slices, patches) comes
from that sample's own seed (data.sample_generator), so the result does not depend on how batches are split
across processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmaisi.train import data as D
from fastmaisi.train.loop import Dist, Task, TrainConfig
from fastmaisi.train.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    kl_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    per_sample_mean,
    region_contrastive_loss,
    roi_weights,
    upcast,
)

log = logging.getLogger("fastmaisi.train")

# random streams of one sample (data.sample_generator ids)
NOISE, TIMESTEP, MODALITY, LATENT, PERCEPTUAL = 1, 2, 3, 4, 5
CHEST_TO_ABDOMEN = ([0.0, 100.0, 0.0, 0.0], [0.0, 0.0, 100.0, 0.0])  # the reference notebook's default regions x100


@dataclass
class Recipe:
    """What a trainer needs besides the loop settings (TrainConfig). Paths are files or folders on disk."""

    data: Path  # folder or datalist JSON
    definitions: dict  # role -> network definition (official `*_def` layout)
    scheduler: dict | None = None  # noise scheduler definition (diffusion, controlnet)
    base_dir: Path | None = None  # base of the datalist's relative paths (default: the JSON's folder)
    modality: str = "ct"  # for items that do not name one
    patch_size: tuple = (64, 64, 64)
    cache: bool = False
    max_bad_fraction: float = 0.1
    init: Path | None = None  # start from these weights (fine-tuning), loaded strictly
    gradient_checkpointing: bool | str = False  # True: recompute each block; "selective" / "outer": see nets.unet
    # vae / mask-vae
    kl_weight: float = 1e-7
    perceptual_weights: Path | None = None
    perceptual_weight: float = 0.3
    adv_weight: float = 0.1
    recon_loss: str = "l1"
    # diffusion / controlnet / mask-diffusion
    scale_factor: float | None = None  # default: the init/DM checkpoint's, else 1/std of the first batch
    modality_dropout: float = 0.1
    # controlnet
    diffusion: Path | None = None  # the trained DM (required)
    roi_labels: tuple = (23,)
    roi_weight: float = 100.0
    contrastive_weight: float = 0.01  # 0 = off
    contrastive_delta: float = 2.0
    exclude_fold: int | None = 0  # datalist items with this "fold" are validation (reference: fold 0)
    # mask-vae / mask-diffusion
    mask_autoencoder: Path | None = None
    spacing: tuple = (1.5, 1.5, 1.5)
    size: tuple = (256, 256, 256)
    loss: str = "l1"
    latent: str = "sample"  # "sample" z = mu + sigma * eps (the reference's encode) or "mean"


# ------------------------------------------------------------------------------------------------------ helpers
def build_net(definition: dict, checkpointing: bool | str = False) -> nn.Module:
    """The network of `definition`; `checkpointing` True / "selective" / "outer" sets its activation checkpointing
    (the autoencoders and the ControlNet know only whole-block recomputation, which the other modes then mean)."""
    from fastmaisi.nets import build

    net = build(definition)
    if checkpointing:
        net.use_checkpointing = checkpointing if getattr(type(net), "supports_selective", False) else True
    return net


def load_weights(net: nn.Module, path: Path | None, name: str) -> dict:
    """Strict load (fastmaisi.weights.load_into); returns the checkpoint meta ({} without a path)."""
    if path is None:
        return {}
    from fastmaisi.weights import load_into

    return load_into(net, path, name=f"{name} ({path})")


def noise_and_timesteps(scheduler, x0: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample eps ~ N(0, I) and training timesteps (the scheduler's sample_timesteps, one generator per sample)."""
    noise = D.randn_per_sample(seeds, x0.shape[1:], NOISE, x0.device, x0.dtype)
    t = torch.cat([scheduler.sample_timesteps(x0[i:i + 1], generator=D.sample_generator(int(s), TIMESTEP, x0.device))
                   for i, s in enumerate(seeds.tolist())])
    return noise, t


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified flow: velocity x0 - eps. DDPM/DDIM: eps, x0 or v by prediction_type."""
    from fastmaisi.schedulers import RFlowScheduler

    if isinstance(scheduler, RFlowScheduler):
        return x0 - noise
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, t)


def augment_modality(modality: torch.Tensor, seeds: torch.Tensor, p: float) -> torch.Tensor:
    """The reference's augment_modality_label: with probability p each, CT sub-types 2..7 -> 1 and MR sub-types
    >= 9 -> 8; then, with probability p, the null class 0 (what classifier-free guidance needs)."""
    if p <= 0:
        return modality
    u = torch.stack([torch.rand(3, generator=D.sample_generator(int(s), MODALITY)) for s in seeds.tolist()])
    u = u.to(modality.device)
    m = modality.clone()
    m = torch.where((m >= 2) & (m <= 7) & (u[:, 0] < p), torch.ones_like(m), m)
    m = torch.where((m >= 9) & (u[:, 1] < p), torch.full_like(m, 8), m)
    return torch.where(u[:, 2] < p, torch.zeros_like(m), m)


def unet_conditioning(unet: nn.Module, batch: dict, modality_dropout: float) -> dict:
    """UNet keyword inputs the network was built for (read from the unwrapped network, never the DDP wrapper)."""
    kwargs = {}
    if getattr(unet, "include_spacing_input", False):
        kwargs["spacing_tensor"] = batch["spacing"]
    if getattr(unet, "include_top_region_index_input", False):
        kwargs["top_region_index_tensor"] = batch["top_region_index"]
    if getattr(unet, "include_bottom_region_index_input", False):
        kwargs["bottom_region_index_tensor"] = batch["bottom_region_index"]
    if getattr(unet, "num_class_embeds", None) is not None:
        kwargs["class_labels"] = augment_modality(batch["modality"], batch["seed"], modality_dropout)
    return kwargs


@torch.no_grad()
def first_batch_scale_factor(task_dataset, cfg: TrainConfig, dist: Dist, latents) -> float:
    """1 / std of the latents of the first global batch: every sample of the first optimiser step (all processes'
    shares and accumulation micro-batches together; unbiased std), so the value does not depend on the split."""
    sampler = iter(D.GlobalBatchSampler(len(task_dataset), cfg.batch_size, cfg.seed, dist.rank, dist.world_size))
    stats = torch.zeros(3, dtype=torch.float64, device=dist.device)
    for _ in range(cfg.grad_accum):
        batch = D.collate([task_dataset[key] for key in next(sampler)])
        z = latents({k: v.to(dist.device) for k, v in batch.items()}).double()
        stats += torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device,
                                                                      dtype=z.dtype)])
    if dist.world_size > 1:
        torch.distributed.all_reduce(stats)
    total, total_sq, n = stats.tolist()
    var = (total_sq - total * total / n) / max(n - 1, 1)
    scale = 1.0 / max(var, 1e-12) ** 0.5
    log.info("scale_factor = 1/std(first batch of latents) = %.6g", scale)
    return scale


def _scale_factor(recipe: Recipe, meta: dict, dataset, cfg: TrainConfig, dist: Dist, latents) -> float:
    if cfg.resume is not None:
        return 1.0  # restored from resume.pt by the loop
    if recipe.scale_factor is not None:
        return float(recipe.scale_factor)
    if meta.get("scale_factor") is not None:
        return float(meta["scale_factor"])
    return first_batch_scale_factor(dataset, cfg, dist, latents)


def _state(net: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _diffusion_export(file: str, num_train_timesteps: int):
    def export(net: nn.Module, meta: dict) -> dict:
        return {file: {"unet_state_dict": _state(net), "scale_factor": torch.tensor(float(meta["scale_factor"])),
                       "epoch": meta["epoch"], "loss": meta["loss"], "num_train_timesteps": num_train_timesteps}}
    return export


def _adam(eps: float = 1e-8):
    return lambda params, lr: torch.optim.Adam(params, lr=lr, eps=eps)


# -------------------------------------------------------------------------------------------------------- VAE
class AutoencoderGAN(nn.Module):
    """The autoencoder and its PatchGAN discriminator as one module, so one optimiser step (and one DDP forward)
    trains both. forward(image, seeds) -> (recon, z_mu, z_sigma, D(recon) for the generator, D(recon) for the
    discriminator, D(image)).

    The generator's adversarial term runs the discriminator with detached weights (torch.func.functional_call), and
    the discriminator sees the detached reconstruction, so the one backward gives each network exactly the gradient
    of its own loss: the reference's alternating G then D step (D's update never feeds back into G's gradient).
    """

    def __init__(self, autoencoder: nn.Module, discriminator: nn.Module | None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.discriminator = discriminator

    def forward(self, image: torch.Tensor, seeds: torch.Tensor):
        z_mu, z_sigma = self.autoencoder.encode(image)
        eps = D.randn_per_sample(seeds, z_mu.shape[1:], LATENT, z_mu.device, z_mu.dtype)
        recon = self.autoencoder.decode(z_mu + z_sigma * eps)
        if self.discriminator is None:
            return recon, z_mu, z_sigma, None, None, None
        frozen = {k: p.detach() for k, p in self.discriminator.named_parameters()}
        fake_for_g = torch.func.functional_call(self.discriminator, frozen, (recon,))
        return recon, z_mu, z_sigma, fake_for_g, self.discriminator(recon.detach()), self.discriminator(image)


def vae_loss(model, batch: dict, *, recipe: Recipe, perceptual: PerceptualLoss | None) -> torch.Tensor:
    """L_G = recon + kl_weight KL + perceptual_weight LPIPS + adv_weight LSGAN_G, plus adv_weight LSGAN_D."""
    x, seeds = batch["image"], batch["seed"]
    recon, z_mu, z_sigma, fake_g, fake_d, real = model(x, seeds)
    diff = upcast(recon) - upcast(x)
    loss = per_sample_mean(diff.abs() if recipe.recon_loss == "l1" else diff.pow(2))
    loss = loss + recipe.kl_weight * kl_loss(z_mu, z_sigma)
    if perceptual is not None:
        gens = [D.sample_generator(int(s), PERCEPTUAL) for s in seeds.tolist()]
        loss = loss + recipe.perceptual_weight * perceptual(upcast(recon), upcast(x), gens)
    if fake_g is not None:
        loss = loss + recipe.adv_weight * (lsgan_generator_loss(fake_g) + lsgan_discriminator_loss(fake_d, real))
    return loss


def image_items(recipe: Recipe) -> list[dict]:
    items = D.list_volumes(recipe.data, "image", recipe.base_dir)
    for item in items:
        item.setdefault("modality", item.get("class", recipe.modality))
    return D.check_items(items, ["image"], recipe.max_bad_fraction, str(recipe.data))


def load_image(item: dict) -> dict:
    x, _, _ = D.read_image(item["image"])
    return {"image": torch.from_numpy(D.scale_intensity(x, item["modality"]))[None]}


def image_patch(patch_size, augment: bool = True):
    """Random patch + flips (p 0.5 per axis) + intensity scale (p 0.3, x0.9..1.1) and shift (p 0.3, +-0.05): the
    reference's VAE augmentations without rot90, zoom, rotation and the MR-only ones."""
    def make(decoded: dict, rng: np.random.Generator) -> dict:
        (x,) = D.random_patch([decoded["image"]], patch_size, rng)
        if augment:
            (x,) = D.random_flip([x], rng)
            if rng.random() < 0.3:
                x = x * float(rng.uniform(0.9, 1.1))
            if rng.random() < 0.3:
                x = x + float(rng.uniform(-0.05, 0.05))
        return {"image": x.contiguous()}
    return make


def setup_vae(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> Task:
    definition = recipe.definitions["autoencoder"]
    autoencoder = build_net(definition, recipe.gradient_checkpointing)
    load_weights(autoencoder, recipe.init, "autoencoder")
    discriminator = PatchDiscriminator(autoencoder.out_channels, 32, 3) if recipe.adv_weight > 0 else None
    perceptual = None
    if recipe.perceptual_weights is not None and recipe.perceptual_weight > 0:
        perceptual = PerceptualLoss.from_file(recipe.perceptual_weights).to(dist.device)
    elif dist.is_main:
        log.warning("perceptual loss OFF: no --perceptual-weights given (LPIPS-squeeze weights file)")
    dataset = D.SampleDataset(image_items(recipe), load_image, image_patch(recipe.patch_size), recipe.cache,
                              recipe.max_bad_fraction)

    def export(model: nn.Module, meta: dict) -> dict:
        out = {"autoencoder.pt": _state(model.autoencoder)}
        if model.discriminator is not None:
            out["discriminator.pt"] = _state(model.discriminator)
        return out

    eps = 1e-6 if cfg.precision in ("bf16", "fp16") else 1e-8  # the reference: Adam eps 1e-6 with AMP
    return Task("vae", AutoencoderGAN(autoencoder, discriminator),
                lambda m, b: vae_loss(m, b, recipe=recipe, perceptual=perceptual), dataset, export,
                {"autoencoder": definition, "discriminator": {"channels": 32, "num_layers": 3}
                 if discriminator is not None else None}, optimizer=_adam(eps),
                frozen=(perceptual,) if perceptual is not None else ())


# ---------------------------------------------------------------------------------------------------- diffusion
def latent_items(recipe: Recipe, with_label: bool) -> list[dict]:
    items = D.list_latents(recipe.data, recipe.base_dir)
    if recipe.exclude_fold is not None:
        items = [e for e in items if e.get("fold") != recipe.exclude_fold]
    keys = ["image", "label"] if with_label else ["image"]
    return D.check_items(items, keys, recipe.max_bad_fraction, str(recipe.data),
                         D.check_label_grid if with_label else None)


def latent_loader(recipe: Recipe, with_label: bool, roi_free: bool = False):
    """item -> latent (C, x, y, z), spacing x100 (3,), modality code, regions x100 (4,) [, label (1, X, Y, Z)]."""
    from fastmaisi.labels import modality_code

    def load(item: dict) -> dict:
        import nibabel as nib

        out = {"latent": D.read_latent(item["image"])}
        spacing = item.get("spacing") or np.linalg.norm(nib.load(str(item["image"])).affine[:3, :3], axis=0)
        out["spacing"] = torch.tensor([float(s) * 100.0 for s in spacing])
        out["modality"] = torch.tensor(modality_code(item.get("modality", recipe.modality)), dtype=torch.long)
        top, bottom = item.get("top_region_index"), item.get("bottom_region_index")
        if top is None or bottom is None:
            top, bottom = [v / 100.0 for v in CHEST_TO_ABDOMEN[0]], [v / 100.0 for v in CHEST_TO_ABDOMEN[1]]
        out["top_region_index"] = torch.tensor([float(v) * 100.0 for v in top])
        out["bottom_region_index"] = torch.tensor([float(v) * 100.0 for v in bottom])
        if with_label:
            label, _, _ = D.read_label(item["label"])
            out["label"] = torch.from_numpy(label.astype(np.int64))[None]
            if roi_free:
                from fastmaisi.pipelines.from_mask import remove_tumours

                out["label_roi_free"] = torch.from_numpy(remove_tumours(label).astype(np.int64))[None]
        return out

    return load


def warn_missing_regions(unet: nn.Module, items: list[dict]) -> None:
    if getattr(unet, "include_top_region_index_input", False):
        n = sum(e.get("top_region_index") is None or e.get("bottom_region_index") is None for e in items)
        if n:
            log.warning("%d of %d latents have no top/bottom_region_index; using chest -> abdomen (the reference "
                        "notebook's default)", n, len(items))


def diffusion_loss(model, batch: dict, *, unet: nn.Module, scheduler, extra: dict, modality_dropout: float):
    """L1 between the UNet output at x_t and the scheduler's target, per sample (diff_model_train.py)."""
    x0 = batch["latent"] * extra["scale_factor"]
    noise, t = noise_and_timesteps(scheduler, x0, batch["seed"])
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x=x_t, timesteps=t, **unet_conditioning(unet, batch, modality_dropout))
    return per_sample_mean((upcast(out) - upcast(training_target(scheduler, x0, noise, t))).abs())


def setup_diffusion(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> Task:
    from fastmaisi.schedulers import build as build_scheduler

    definition = recipe.definitions["diffusion_unet"]
    unet = build_net(definition, recipe.gradient_checkpointing)
    meta = load_weights(unet, recipe.init, "diffusion UNet")
    scheduler = build_scheduler(recipe.scheduler)
    dataset = D.SampleDataset(latent_items(recipe, False), latent_loader(recipe, False), lambda d, rng: dict(d),
                              recipe.cache, recipe.max_bad_fraction)
    warn_missing_regions(unet, dataset.items)
    extra = {"scale_factor": _scale_factor(recipe, meta, dataset, cfg, dist, lambda b: b["latent"])}
    return Task("diffusion", unet,
                lambda m, b: diffusion_loss(m, b, unet=unet, scheduler=scheduler, extra=extra,
                                            modality_dropout=recipe.modality_dropout),
                dataset, _diffusion_export("diffusion_unet.pt", scheduler.num_train_timesteps), definition,
                optimizer=_adam(), extra=extra)


# --------------------------------------------------------------------------------------------------- ControlNet
def copy_matching_weights(dst: nn.Module, src: dict) -> int:
    """Copy every entry of `src` whose name and shape exist in `dst` (the reference's copy_model_state); returns
    how many were copied."""
    own = dst.state_dict()
    matched = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    dst.load_state_dict(own, strict=True)
    return len(matched)


def controlnet_loss(model, batch: dict, *, unet: nn.Module, scheduler, extra: dict, recipe: Recipe):
    """ControlNet residuals into the frozen UNet; L1 weighted x roi_weight on the ROI labels; optionally the region-
    contrastive term from a second (tumour-free) condition, run in the same batch (train_controlnet.py)."""
    from fastmaisi.labels import binarize_labels

    label = batch["label"]
    x0 = batch["latent"] * extra["scale_factor"]
    noise, t = noise_and_timesteps(scheduler, x0, batch["seed"])
    x_t = scheduler.add_noise(x0, noise, t)
    cond = binarize_labels(label)
    kwargs = unet_conditioning(unet, batch, 0.0)
    contrastive = recipe.contrastive_weight > 0
    if contrastive:  # the tumour-free condition as a second half of the batch: one forward, one DDP pass
        cond = torch.cat([cond, binarize_labels(batch["label_roi_free"])])
        x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
        kwargs = {k: torch.cat([v, v]) for k, v in kwargs.items()}
    down, mid = model(x=x_t, timesteps=t, controlnet_cond=cond, class_labels=kwargs.get("class_labels"))
    out = unet(x=x_t, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs)
    n = x0.shape[0]
    out, out_roi_free = upcast(out[:n]), upcast(out[n:])
    target = upcast(training_target(scheduler, x0, noise, t[:n]))
    weights = roi_weights(label, x0.shape[2:], recipe.roi_labels, recipe.roi_weight) if recipe.roi_weight > 1 else 1.0
    loss = per_sample_mean((out - target).abs() * weights)
    if contrastive:
        loss = loss + recipe.contrastive_weight * region_contrastive_loss(
            out, out_roi_free, target, label, batch["label_roi_free"], recipe.contrastive_delta)
    return loss


def setup_controlnet(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> Task:
    from fastmaisi.schedulers import build as build_scheduler

    if recipe.diffusion is None:
        raise ValueError("controlnet training needs the trained diffusion model: --diffusion CHECKPOINT")
    unet = build_net(recipe.definitions["diffusion_unet"])
    meta = load_weights(unet, recipe.diffusion, "diffusion UNet")
    unet = unet.to(dist.device).eval().requires_grad_(False)
    definition = recipe.definitions["controlnet"]
    controlnet = build_net(definition, recipe.gradient_checkpointing)
    copied = copy_matching_weights(controlnet, unet.state_dict())
    log.info("ControlNet: %d tensors initialised from the diffusion model", copied)
    load_weights(controlnet, recipe.init, "ControlNet")
    scheduler = build_scheduler(recipe.scheduler)
    dataset = D.SampleDataset(latent_items(recipe, True), latent_loader(recipe, True, recipe.contrastive_weight > 0),
                              lambda d, rng: dict(d), recipe.cache, recipe.max_bad_fraction)
    warn_missing_regions(unet, dataset.items)
    extra = {"scale_factor": _scale_factor(recipe, meta, dataset, cfg, dist, lambda b: b["latent"])}

    def export(net: nn.Module, meta: dict) -> dict:
        return {"controlnet.pt": {"controlnet_state_dict": _state(net), "epoch": meta["epoch"], "loss": meta["loss"],
                                  "scale_factor": torch.tensor(float(meta["scale_factor"]))}}

    return Task("controlnet", controlnet,
                lambda m, b: controlnet_loss(m, b, unet=unet, scheduler=scheduler, extra=extra, recipe=recipe),
                dataset, export, definition,
                optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01), extra=extra,
                frozen=(unet,))


# ------------------------------------------------------------------------------------------------------ mask VAE
def class_index_table() -> torch.Tensor:
    """Label id (0..255) -> mask-AE class index (0..124), the inverse of labels.MASK_AE_TO_LABEL. Ids outside the
    125 classes: kidney cysts 116/117 -> their kidney (14/5, as remove_tumours), other ids > 0 -> body (200)."""
    from fastmaisi.labels import BODY, MASK_AE_TO_LABEL

    classes = [int(v) for v in MASK_AE_TO_LABEL]
    table = torch.full((256,), classes.index(BODY), dtype=torch.long)
    table[0] = classes.index(0)
    for index, value in enumerate(classes):
        table[value] = index
    table[116], table[117] = classes.index(14), classes.index(5)
    return table


def mask_vae_loss(model, batch: dict, *, table: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Cross-entropy of the 125-class decoder output against the class index + kl_weight KL, per sample."""
    from fastmaisi.labels import binarize_labels

    label, seeds = batch["label"], batch["seed"]
    recon, z_mu, z_sigma, *_ = model(binarize_labels(label), seeds)
    target = table.to(label.device)[label[:, 0]]
    ce = F.cross_entropy(upcast(recon), target, reduction="none")
    return per_sample_mean(ce) + kl_weight * kl_loss(z_mu, z_sigma)


def label_items(recipe: Recipe) -> list[dict]:
    items = D.list_volumes(recipe.data, "label", recipe.base_dir)
    return D.check_items(items, ["label"], recipe.max_bad_fraction, str(recipe.data))


def load_label_resampled(spacing, size=None):
    """item -> label (1, X, Y, Z) int64 resampled (nearest) to `spacing`, centre padded/cropped to `size` if given."""
    from fastmaisi.pipelines.common import resample_label

    def load(item: dict) -> dict:
        label, label_spacing, _ = D.read_label(item["label"])
        shape = size or [max(1, int(round(n * s / t))) for n, s, t in zip(label.shape, label_spacing, spacing)]
        label = resample_label(label, label_spacing, shape, spacing)
        return {"label": torch.from_numpy(label.astype(np.int64))[None]}

    return load


def setup_mask_vae(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> Task:
    from fastmaisi.labels import MASK_AE_TO_LABEL

    definition = recipe.definitions["mask_autoencoder"]
    autoencoder = build_net(definition, recipe.gradient_checkpointing)
    if autoencoder.in_channels != 8 or autoencoder.out_channels != len(MASK_AE_TO_LABEL):
        raise ValueError(f"the mask autoencoder must have in_channels 8 (bit-channels) and out_channels "
                         f"{len(MASK_AE_TO_LABEL)} (classes); got {autoencoder.in_channels} and "
                         f"{autoencoder.out_channels}")
    load_weights(autoencoder, recipe.init, "mask autoencoder")

    def make(decoded: dict, rng: np.random.Generator) -> dict:
        (x,) = D.random_flip(D.random_patch([decoded["label"]], recipe.patch_size, rng), rng)
        return {"label": x.contiguous()}

    dataset = D.SampleDataset(label_items(recipe), load_label_resampled(recipe.spacing), make, recipe.cache,
                              recipe.max_bad_fraction)
    table = class_index_table()
    return Task("mask-vae", AutoencoderGAN(autoencoder, None),
                lambda m, b: mask_vae_loss(m, b, table=table, kl_weight=recipe.kl_weight), dataset,
                lambda net, meta: {"mask_generation_autoencoder.pt": _state(net.autoencoder)}, definition,
                optimizer=_adam())


# ------------------------------------------------------------------------------------------------ mask diffusion
def mask_latents(mask_ae: nn.Module, batch: dict, mode: str) -> torch.Tensor:
    """Frozen mask-VAE latents of the batch's label maps: z = mu + sigma * eps (per-sample eps) or mu."""
    from fastmaisi.labels import binarize_labels

    with torch.no_grad():
        z_mu, z_sigma = mask_ae.encode(binarize_labels(batch["label"]))
        if mode == "mean":
            return upcast(z_mu)
        eps = D.randn_per_sample(batch["seed"], z_mu.shape[1:], LATENT, z_mu.device, z_mu.dtype)
        return upcast(z_mu + z_sigma * eps)


def mask_diffusion_loss(model, batch: dict, *, mask_ae: nn.Module, scheduler, extra: dict, recipe: Recipe):
    """DDPM on mask latents with cross-attention to the organ-size vector (B, 1, 10); L1 (or MSE) per sample."""
    x0 = mask_latents(mask_ae, batch, recipe.latent) * extra["scale_factor"]
    noise, t = noise_and_timesteps(scheduler, x0, batch["seed"])
    out = model(x=scheduler.add_noise(x0, noise, t), timesteps=t, context=batch["context"])
    diff = upcast(out) - upcast(training_target(scheduler, x0, noise, t))
    return per_sample_mean(diff.abs() if recipe.loss == "l1" else diff.pow(2))


def setup_mask_diffusion(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> Task:
    from fastmaisi.schedulers import build as build_scheduler

    if recipe.mask_autoencoder is None:
        raise ValueError("mask-diffusion training needs the trained mask autoencoder: --mask-autoencoder CHECKPOINT")
    mask_ae = build_net(recipe.definitions["mask_autoencoder"])
    load_weights(mask_ae, recipe.mask_autoencoder, "mask autoencoder")
    mask_ae = mask_ae.to(dist.device).eval().requires_grad_(False)
    definition = recipe.definitions["mask_diffusion"]
    unet = build_net(definition, recipe.gradient_checkpointing)
    meta = load_weights(unet, recipe.init, "mask diffusion UNet")
    scheduler = build_scheduler(recipe.scheduler)
    load = load_label_resampled(recipe.spacing, recipe.size)

    def load_with_context(item: dict) -> dict:
        out = load(item)
        out["context"] = torch.tensor([D.organ_size_vector(out["label"][0].numpy())], dtype=torch.float32)
        return out

    dataset = D.SampleDataset(label_items(recipe), load_with_context, lambda d, rng: dict(d), recipe.cache,
                              recipe.max_bad_fraction)
    extra = {"scale_factor": _scale_factor(recipe, meta, dataset, cfg, dist,
                                           lambda b: mask_latents(mask_ae, b, recipe.latent))}
    return Task("mask-diffusion", unet,
                lambda m, b: mask_diffusion_loss(m, b, mask_ae=mask_ae, scheduler=scheduler, extra=extra,
                                                 recipe=recipe),
                dataset, _diffusion_export("mask_generation_diffusion_unet.pt", scheduler.num_train_timesteps),
                definition, optimizer=_adam(), extra=extra, frozen=(mask_ae,),
                find_unused_parameters=True)  # the nets skip to_q/to_k/norm2 of a length-1 cross-attention


TRAINERS = {"vae": setup_vae, "diffusion": setup_diffusion, "controlnet": setup_controlnet,
            "mask-vae": setup_mask_vae, "mask-diffusion": setup_mask_diffusion}
# the network roles each trainer builds
ROLES = {"vae": ("autoencoder",), "diffusion": ("diffusion_unet",), "controlnet": ("diffusion_unet", "controlnet"),
         "mask-vae": ("mask_autoencoder",), "mask-diffusion": ("mask_autoencoder", "mask_diffusion")}
