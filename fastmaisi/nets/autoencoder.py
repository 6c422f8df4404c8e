"""MAISI's KL autoencoder (MONAI `AutoencoderKlMaisi`) with MONAI's exact state_dict keys, without the split machinery.

Same math as MONAI (Guo et al., "MAISI", 2024, built on Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022): an encoder of ResBlocks and pad-end stride-2 downsamples, a decoder of ResBlocks and
trilinear-x2 (or transposed-conv) upsamples, 1x1x1 quant convs and a log-variance clamp to [-30, 20].

What differs from MONAI is only how it is executed: one vectorised GroupNorm (fp32 statistics, output in the input
dtype) instead of a Python loop over groups, no sequential convolution splitting, no `empty_cache`, no host-staged
concatenation. Memory-bounded execution of large volumes lives in `fastmaisi.decode`, which drives the
`encoder.blocks` / `decoder.blocks` lists defined here level by level.

Key paths mirror MONAI's wrapper nesting (see networks.md §1.1):
    `Conv`          == MONAI `Convolution`                -> `<x>.conv.weight`
    `MaisiConv`     == `MaisiConvolution`                 -> `<x>.conv.conv.weight`
    `Downsample` / `Upsample` hold a `MaisiConv`          -> `<x>.conv.conv.conv.weight`
    `ResBlock`      norm1, conv1, norm2, conv2, nin_shortcut (only when in != out channels)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastmaisi.nets.blocks import Conv3d, upsample_trilinear_x2
from fastmaisi.nets.ops import group_norm


class Conv(nn.Module):
    """Holder for one Conv3d / ConvTranspose3d as child `conv` (MONAI `Convolution` with conv_only=True)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        if transposed:
            # MONAI: output_padding = stride - 1 for k3 p1, so the output is exactly `stride` times the input.
            self.conv: nn.Module = nn.ConvTranspose3d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, output_padding=stride - 1
            )
        else:
            self.conv = Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MaisiConv(nn.Module):
    """`MaisiConvolution` without the split: child `conv` is a `Conv` holder (keys `conv.conv.*`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, **kwargs) -> None:
        super().__init__()
        self.conv = Conv(in_channels, out_channels, kernel_size, padding=kwargs.pop("padding", kernel_size // 2), **kwargs)

    @property
    def op(self) -> nn.Module:
        """The innermost torch conv module (Conv3d or ConvTranspose3d)."""
        return self.conv.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.conv(x)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (keys weight, bias) executed by `ops.group_norm`: fp32 statistics, output in x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self, silu=False)


class ResBlock(nn.Module):
    """MaisiResBlock: `out = shortcut(x) + conv2(silu(GN2(conv1(silu(GN1(x))))))`, no dropout, no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = MaisiConv(in_channels, out_channels, 3)
        self.norm2 = GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = MaisiConv(out_channels, out_channels, 3)
        self.nin_shortcut: nn.Module = (
            MaisiConv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm(x, self.norm1, silu=True))
        h = self.conv2(group_norm(h, self.norm2, silu=True))
        s = self.nin_shortcut(x)
        if h.dtype == s.dtype and not torch.is_grad_enabled():
            return h.add_(s)  # the conv output is ours: add in place, saving one full-size allocation
        return s + h


class Downsample(nn.Module):
    """Zero-pad one voxel at the END of each spatial axis, then conv k3 s2 p0 (MaisiDownsample)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = MaisiConv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 1)))


class Upsample(nn.Module):
    """Trilinear x2 (align_corners=False) then conv k3 p1, or ConvTranspose3d k3 s2 p1 op1 (MaisiUpsample)."""

    def __init__(self, channels: int, use_convtranspose: bool) -> None:
        super().__init__()
        self.use_convtranspose = use_convtranspose
        if use_convtranspose:
            self.conv = MaisiConv(channels, channels, 3, stride=2, padding=1, transposed=True)
        else:
            self.conv = MaisiConv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_convtranspose:
            return self.conv(x)
        return self.conv(upsample_trilinear_x2(x))


class Encoder(nn.Module):
    """MaisiEncoder: conv_in, per level ResBlocks (+ Downsample except last), GroupNorm, conv_out (no SiLU before it)."""

    def __init__(
        self,
        in_channels: int,
        num_channels: Sequence[int],
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = [MaisiConv(in_channels, num_channels[0], 3)]
        ch = num_channels[0]
        for level, (level_ch, n_res) in enumerate(zip(num_channels, num_res_blocks)):
            for _ in range(n_res):
                blocks.append(ResBlock(ch, level_ch, norm_num_groups, norm_eps))
                ch = level_ch
            if level != len(num_channels) - 1:
                blocks.append(Downsample(ch))
        blocks.append(GroupNorm(norm_num_groups, ch, eps=norm_eps))
        blocks.append(MaisiConv(ch, out_channels, 3))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """MaisiDecoder: conv_in, per level (reversed) ResBlocks (+ Upsample except last), GroupNorm, conv_out."""

    def __init__(
        self,
        num_channels: Sequence[int],
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        use_convtranspose: bool,
    ) -> None:
        super().__init__()
        rev_ch = list(reversed(num_channels))
        rev_res = list(reversed(num_res_blocks))
        blocks: list[nn.Module] = [MaisiConv(in_channels, rev_ch[0], 3)]
        ch = rev_ch[0]
        for level, (level_ch, n_res) in enumerate(zip(rev_ch, rev_res)):
            for _ in range(n_res):
                blocks.append(ResBlock(ch, level_ch, norm_num_groups, norm_eps))
                ch = level_ch
            if level != len(rev_ch) - 1:
                blocks.append(Upsample(ch, use_convtranspose))
        blocks.append(GroupNorm(norm_num_groups, ch, eps=norm_eps))
        blocks.append(MaisiConv(ch, out_channels, 3))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class AutoencoderKlMaisi(nn.Module):
    """MAISI's KL autoencoder; constructor = MONAI's keyword arguments, state_dict = MONAI's keys and shapes.

    Args:
        num_res_blocks (`int` or sequence): ResBlocks per level (an int is repeated over the levels, as MONAI).
        attention_levels, with_encoder_nonlocal_attn, with_decoder_nonlocal_attn: must be all False. MONAI's class
            can add SpatialAttentionBlocks here; no MAISI config uses them and this class does not implement them
            (a True raises ValueError rather than silently building a different network).
        include_fc, use_combined_linear, use_flash_attention: only configure those attention blocks; accepted and
            unused.
        use_checkpointing (`bool`): run encoder/decoder under `torch.utils.checkpoint` while training with grad.
        num_splits, dim_split, norm_float16, print_info, save_mem: MONAI execution knobs (sequential conv splitting,
            fp16 GroupNorm output, logging, `empty_cache` calls). Accepted for config compatibility and ignored: the
            whole-volume path here is exact, and `fastmaisi.decode` bounds memory instead of splitting convs.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int] | int,
        num_channels: Sequence[int],
        attention_levels: Sequence[bool],
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
        include_fc: bool = False,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        use_checkpointing: bool = False,
        use_convtranspose: bool = False,
        num_splits: int = 16,
        dim_split: int = 0,
        norm_float16: bool = False,
        print_info: bool = False,
        save_mem: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"spatial_dims must be 3 (MAISI's autoencoder is 3-D only), got {spatial_dims}")
        num_channels = list(num_channels)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(num_channels)
        num_res_blocks = list(num_res_blocks)
        if any(c % norm_num_groups for c in num_channels):
            raise ValueError(
                f"every entry of num_channels {num_channels} must be a multiple of norm_num_groups={norm_num_groups}"
            )
        if len(attention_levels) != len(num_channels):
            raise ValueError(
                f"attention_levels (length {len(attention_levels)}) and num_channels (length {len(num_channels)}) "
                "must have the same length"
            )
        if len(num_res_blocks) != len(num_channels):
            raise ValueError(
                f"num_res_blocks {num_res_blocks} must be an int or have the same length as num_channels {num_channels}"
            )
        if any(attention_levels) or with_encoder_nonlocal_attn or with_decoder_nonlocal_attn:
            raise ValueError(
                "attention blocks are not implemented in fastmaisi's AutoencoderKlMaisi: attention_levels must be all "
                f"False and with_encoder/decoder_nonlocal_attn False (got attention_levels={list(attention_levels)}, "
                f"with_encoder_nonlocal_attn={with_encoder_nonlocal_attn}, "
                f"with_decoder_nonlocal_attn={with_decoder_nonlocal_attn}); no MAISI config uses them"
            )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.num_channels = num_channels
        self.num_res_blocks = num_res_blocks
        self.use_checkpointing = use_checkpointing
        self.use_convtranspose = use_convtranspose

        self.encoder = Encoder(in_channels, num_channels, latent_channels, num_res_blocks, norm_num_groups, norm_eps)
        self.decoder = Decoder(
            num_channels, latent_channels, out_channels, num_res_blocks, norm_num_groups, norm_eps, use_convtranspose
        )
        self.quant_conv_mu = Conv(latent_channels, latent_channels, 1, padding=0)
        self.quant_conv_log_sigma = Conv(latent_channels, latent_channels, 1, padding=0)
        self.post_quant_conv = Conv(latent_channels, latent_channels, 1, padding=0)

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size per axis (4 for MAISI's three levels)."""
        return 2 ** (len(self.num_channels) - 1)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def latent_from_features(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quant convs on encoder features h: `z_mu`, and `z_sigma = exp(clamp(log_var, -30, 20) / 2)`."""
        z_mu = self.quant_conv_mu(h)
        z_log_var = torch.clamp(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu, torch.exp(z_log_var / 2)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_in, D, H, W) image -> (z_mu, z_sigma), each (B, latent, D/4, H/4, W/4)."""
        return self.latent_from_features(self._run(self.encoder, x))

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """Reparameterisation: `z = mu + eps * sigma`, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        return z_mu + torch.randn_like(z_sigma) * z_sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, d, h, w) -> (B, C_out, 4d, 4h, 4w): post_quant_conv then the decoder, whole volume."""
        return self._run(self.decoder, self.post_quant_conv(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the mean latent of x (no sampling)."""
        return self.decode(self.encode(x)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction from a sampled z, z_mu, z_sigma), as MONAI."""
        z_mu, z_sigma = self.encode(x)
        return self.decode(self.sampling(z_mu, z_sigma)), z_mu, z_sigma

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A sampled latent (stochastic, as MONAI) for the diffusion stage."""
        z_mu, z_sigma = self.encode(x)
        return self.sampling(z_mu, z_sigma)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)
