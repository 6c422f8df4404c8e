"""Loss terms of the five recipes, each returning one value per sample (B,): the loop averages them.

Per-sample losses make the gradient of N processes x batch b equal to that of 1 process x batch N*b.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for loss arithmetic; fp32 and fp64 unchanged."""
    return x if x.dtype == torch.float64 else x.float()


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean over everything but the batch axis, in fp32 (or fp64)."""
    return upcast(x).flatten(1).mean(1)


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, per sample (the MAISI VAE notebook's KL_loss)."""
    mu, sigma = upcast(z_mu), upcast(z_sigma)
    return 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-10) - 1).flatten(1).sum(1)


def lsgan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN, generator side: mean (D(G(x)) - 1)^2 per sample (MONAI PatchAdversarialLoss)."""
    return per_sample_mean((upcast(logits_fake) - 1).pow(2))


def lsgan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN, discriminator side: 0.5 (mean D(G(x))^2 + mean (D(x) - 1)^2) per sample."""
    return 0.5 * (per_sample_mean(upcast(logits_fake).pow(2)) + per_sample_mean((upcast(logits_real) - 1).pow(2)))


class _Conv(nn.Module):
    """Holder so that keys read `<name>.conv.weight` like MONAI's `Convolution`."""

    def __init__(self, conv: nn.Module, norm: bool, act: bool) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.InstanceNorm3d(conv.out_channels) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as MAISI's VAE recipe configures MONAI's: 3-D, `num_layers` stride-2
    k4 convs from `channels` (x2 per layer, the last one stride 1), instance norm, LeakyReLU 0.2, a k4 conv to 1 logit
    per patch. State-dict keys equal MONAI's `PatchDiscriminator` (initial_conv.conv, 0.conv, ..., final_conv.conv).
    forward(x (B, C, D, H, W)) -> patch logits (B, 1, d, h, w).
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        self.add_module("initial_conv", _Conv(nn.Conv3d(in_channels, channels, 4, 2, 1), norm=False, act=True))
        ch = channels
        for i in range(num_layers):
            stride = 1 if i == num_layers - 1 else 2
            self.add_module(str(i), _Conv(nn.Conv3d(ch, ch * 2, 4, stride, 1, bias=False), norm=True, act=True))
            ch *= 2
        self.add_module("final_conv", _Conv(nn.Conv3d(ch, 1, 4, 1, 1), norm=False, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


# -------------------------------------------------------------------------------------------- perceptual (LPIPS)
class _Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class PerceptualLoss(nn.Module):
    """LPIPS with SqueezeNet 1.1 features (Zhang et al. 2018), fake-3D: 2-D LPIPS over a random `fake_3d_ratio` of the
    slices along each of the three axes, summed over the axes (MONAI PerceptualLoss(network_type="squeeze",
    is_fake_3d=True, fake_3d_ratio=0.2), as MAISI's VAE recipe uses it), per sample.

    Weights: one state dict with torchvision's `squeezenet1_1` keys `features.*` and the lpips package's linear
    heads `lin0.model.1.weight` .. `lin6.model.1.weight` (v0.1). Make it once, where torchvision and lpips exist:
        sd = {k: v for k, v in torchvision.models.squeezenet1_1(weights="DEFAULT").state_dict().items()
              if k.startswith("features.")}
        sd.update(torch.load("lpips/weights/v0.1/squeeze.pth"))
        torch.save(sd, "lpips_squeeze.pt")
    Inputs are used as they come, like MONAI (which passes the [0, 1] images to LPIPS; a 1-channel slice broadcasts
    against LPIPS's 3-channel shift/scale).
    """

    SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13))  # lpips' squeezenet stages
    CHANNELS = (64, 128, 256, 384, 384, 512, 512)

    def __init__(self, fake_3d_ratio: float = 0.2) -> None:
        super().__init__()
        pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool, _Fire(64, 16, 64), _Fire(128, 16, 64), pool,
            _Fire(128, 32, 128), _Fire(256, 32, 128), pool, _Fire(256, 48, 192), _Fire(384, 48, 192),
            _Fire(384, 64, 256), _Fire(512, 64, 256))
        for i, c in enumerate(self.CHANNELS):  # lpips NetLinLayer: Dropout, 1x1 conv without bias
            self.add_module(f"lin{i}", nn.Module())
            getattr(self, f"lin{i}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.fake_3d_ratio = fake_3d_ratio
        self.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, fake_3d_ratio: float = 0.2) -> "PerceptualLoss":
        from fastmaisi.weights import load_into

        net = cls(fake_3d_ratio)
        load_into(net, Path(path), name=f"perceptual weights {path}")
        return net

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always eval (dropout off), like lpips

    def lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """2-D LPIPS distance of slice batches (N, 1|3, H, W) -> (N,)."""
        ha = (a.to(self.shift.dtype) - self.shift) / self.scale
        hb = (b.to(self.shift.dtype) - self.shift) / self.scale
        total = 0
        for i, (lo, hi) in enumerate(self.SLICES):
            ha, hb = self.features[lo:hi](ha), self.features[lo:hi](hb)
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((na - nb).pow(2)).mean((2, 3))[:, 0]
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, C, X, Y, Z) pair -> (B,) loss; sample i picks its slices with generators[i] (a CPU generator)."""
        out = []
        for i in range(x.shape[0]):
            loss = 0
            for axis in (1, 2, 3):  # slices along X, Y, Z of one sample (C, X, Y, Z)
                xs, ys = x[i].movedim(axis, 0), y[i].movedim(axis, 0)  # (n_slices, C, h, w)
                n = xs.shape[0]
                pick = torch.randperm(n, generator=generators[i])[: max(1, int(n * self.fake_3d_ratio))]
                pick = pick.to(x.device)
                loss = loss + self.lpips(xs[pick], ys[pick]).mean()
            out.append(loss)
        return torch.stack(out)


# ------------------------------------------------------------------------------------------------ ControlNet terms
def roi_weights(label: torch.Tensor, latent_shape, roi_labels, weight: float) -> torch.Tensor:
    """(B, 1, X, Y, Z) labels -> (B, 1, x, y, z) loss weights on the latent grid: `weight` where the nearest-
    downsampled label is one of `roi_labels`, else 1 (train_controlnet.py's weighted_loss)."""
    small = F.interpolate(label.float(), size=tuple(latent_shape), mode="nearest")
    w = torch.ones_like(small)
    for value in roi_labels:
        w[small == value] = weight
    return w


def region_contrastive_loss(out: torch.Tensor, out_roi_free: torch.Tensor, target: torch.Tensor,
                            label: torch.Tensor, label_roi_free: torch.Tensor, delta: float = 2.0) -> torch.Tensor:
    """MAISI's region-contrastive term (rflow-ct ControlNet), per sample (the reference handles batch 1 only).

    roi = voxels whose label changed when the tumours were removed; bg = 1 - dilate(roi, 3^3); both nearest-resized
    to the latent grid and repeated over channels. L_fg = -sum|out - out_roi_free|.roi / (sum roi + 1e-5), clipped
    below at -delta (relu(L_fg + delta) - delta); L_bg = sum|out_roi_free - target|.bg / (sum bg + 1e-5).
    Returns L_fg + L_bg (B,); the caller weights it (0.01).
    """
    roi = (label != label_roi_free).to(upcast(out).dtype)
    bg = 1 - F.max_pool3d(roi, 3, 1, 1)
    size = tuple(out.shape[2:])
    roi = F.interpolate(roi, size=size, mode="nearest").expand_as(out)
    bg = F.interpolate(bg, size=size, mode="nearest").expand_as(out)
    diff_fg = ((upcast(out) - upcast(out_roi_free)).abs() * roi).flatten(1).sum(1)
    l_fg = -diff_fg / (roi.flatten(1).sum(1) + 1e-5)
    l_fg = F.relu(l_fg + delta) - delta
    diff_bg = ((upcast(out_roi_free) - upcast(target)).abs() * bg).flatten(1).sum(1)
    l_bg = diff_bg / (bg.flatten(1).sum(1) + 1e-5)
    return l_fg + l_bg
