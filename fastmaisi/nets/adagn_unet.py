"""NVIDIA's v2 mask diffusion UNet (`scripts.adagn_unet.DiffusionModelUNetMaisiAdaGN`, the `rflow-mask` generator):
the MAISI UNet whose every ResBlock modulates its second GroupNorm by the condition, same state-dict keys.

Differences from `DiffusionModelUNetMaisi`, as NVIDIA's class:
- `adagn_context_embed` (Linear -> SiLU -> Linear, cond_dim -> E -> E) embeds the condition vector (B, cond_dim),
  the mean over tokens of a (B, L, cond_dim) context, or all -1 when no context is given; E is appended to the
  time (+ spacing) embedding.
- every ResBlock's `time_emb_proj` maps that embedding to 2 x Cout: (scale, shift), and the block computes
  conv2(SiLU(GN2(conv1(...)) * (1 + scale) + shift)) + skip instead of adding the time embedding before GN2.
- the context still feeds the cross-attention of the attention levels.

Execution uses our blocks: on CUDA inference GN2's statistics, the modulation and the SiLU are one fused
normalisation pass (the (scale, shift) fold into GroupNorm's per-channel affine), channels-last, CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmaisi.nets.blocks import (
    ResnetBlock,
    _group_norm_affine,
    fast_group_norm,
    group_norm,
    run_mlp,
    scale_shift,
    upsample_conv,
)
from fastmaisi.nets.unet import DiffusionModelUNetMaisi


class AdaGNResnetBlock(ResnetBlock):
    """`ResnetBlock` with adaptive GroupNorm: `temb` is this block's (B, 2 x Cout) projection, (scale, shift)."""

    def _conv1_norm2(self, h: torch.Tensor, temb: torch.Tensor, coarse_up: bool) -> torch.Tensor:
        """SiLU(GN2(conv1(h)) * (1 + scale) + shift), (scale, shift) = temb; the rest of the block is the base's."""
        scale, shift = temb.float().chunk(2, dim=1)  # (B, Cout) each
        gain = 1.0 + scale
        conv1 = self.conv1.conv
        if conv1.bias is not None and fast_group_norm(h, self.norm2):
            # one pass: GN2 (conv1's bias folded into its statistics) * (1 + scale) + shift, SiLU
            h = upsample_conv(h, conv1, None) if coarse_up else conv1._conv_forward(h, conv1.weight, None)
            a, b = _group_norm_affine(h, self.norm2, conv1.bias)
            return scale_shift(h, a * gain, b * gain + shift, silu=True)
        h = upsample_conv(h, conv1, conv1.bias) if coarse_up else conv1._conv_forward(h, conv1.weight, conv1.bias)
        return scale_shift(group_norm(h, self.norm2), gain, shift, silu=True)


class DiffusionModelUNetMaisiAdaGN(DiffusionModelUNetMaisi):
    """NVIDIA `DiffusionModelUNetMaisiAdaGN` (same constructor, keys, forward), on our blocks.

    forward(x (B, 4, *S), timesteps (B,), context (B, 1, cond_dim) or (B, cond_dim) or None (all -1),
    spacing_tensor (B, 3) mm x 100, ...) -> (B, out_channels, *S).
    """

    _name = "DiffusionModelUNetMaisiAdaGN"

    def __init__(self, *args, adagn_condition_dim: int | None = None, adagn_context_embed_dim: int | None = None,
                 spatial_dims: int = 3, in_channels: int = 4, out_channels: int = 4,
                 num_res_blocks: Sequence[int] | int = (2, 2, 2, 2), num_channels: Sequence[int] = (32, 64, 64, 64),
                 attention_levels: Sequence[bool] = (False, False, True, True), norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, resblock_updown: bool = False, num_head_channels: int | Sequence[int] = 8,
                 with_conditioning: bool = False, transformer_num_layers: int = 1,
                 cross_attention_dim: int | None = None, num_class_embeds: int | None = None,
                 upcast_attention: bool = False, include_fc: bool = False, use_combined_linear: bool = False,
                 use_flash_attention: bool = False, dropout_cattn: float = 0.0,
                 include_top_region_index_input: bool = False, include_bottom_region_index_input: bool = False,
                 include_spacing_input: bool = False) -> None:
        super().__init__(*args, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         num_res_blocks=num_res_blocks, num_channels=num_channels, attention_levels=attention_levels,
                         norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
                         num_head_channels=num_head_channels, with_conditioning=with_conditioning,
                         transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
                         num_class_embeds=num_class_embeds, upcast_attention=upcast_attention, include_fc=include_fc,
                         use_combined_linear=use_combined_linear, use_flash_attention=use_flash_attention,
                         dropout_cattn=dropout_cattn,
                         include_top_region_index_input=include_top_region_index_input,
                         include_bottom_region_index_input=include_bottom_region_index_input,
                         include_spacing_input=include_spacing_input)
        if adagn_condition_dim is None:
            if cross_attention_dim is None:
                raise ValueError("adagn_condition_dim is required when cross_attention_dim is not set")
            adagn_condition_dim = cross_attention_dim
        self.adagn_condition_dim = int(adagn_condition_dim)
        self.adagn_context_embed_dim = int(adagn_context_embed_dim or 4 * self.block_out_channels[0])
        self.adagn_context_embed = nn.Sequential(
            nn.Linear(self.adagn_condition_dim, self.adagn_context_embed_dim), nn.SiLU(),
            nn.Linear(self.adagn_context_embed_dim, self.adagn_context_embed_dim))
        for r in self._resnets:  # the embedding grows by E; each block now predicts (scale, shift)
            r.time_emb_proj = nn.Linear(r.time_emb_proj.in_features + self.adagn_context_embed_dim,
                                        2 * r.out_channels)
            r.__class__ = AdaGNResnetBlock

    def condition(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The (B, cond_dim) condition of the AdaGN embedding: all -1 without context, a token mean for (B, L, D)."""
        if context is None:
            return x.new_full((x.shape[0], self.adagn_condition_dim), -1.0)
        if context.ndim == 3:
            context = context.mean(dim=1)
        elif context.ndim != 2:
            raise ValueError(f"context must have shape (B, C) or (B, T, C), got {tuple(context.shape)}")
        if context.shape[-1] != self.adagn_condition_dim:
            raise ValueError(f"context dim {context.shape[-1]} != adagn_condition_dim {self.adagn_condition_dim}")
        return context

    def _embedding(self, x, timesteps, class_labels, extras) -> torch.Tensor:
        emb = super()._embedding(x, timesteps, class_labels, extras)
        cond = self.condition(x, extras.get("adagn_context")).to(device=x.device, dtype=emb.dtype)
        return torch.cat([emb, run_mlp(self.adagn_context_embed, cond)], dim=1)

    def _time_projections(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """All blocks' (scale, shift) projections in one GEMM: (B, 2 x Cout_i) per block, in `temb_index` order."""
        weight = torch.cat([r.time_emb_proj.weight for r in self._resnets])
        bias = torch.cat([r.time_emb_proj.bias for r in self._resnets])
        return list(F.linear(F.silu(emb), weight, bias).split([2 * r.out_channels for r in self._resnets], dim=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                top_region_index_tensor: torch.Tensor | None = None,
                bottom_region_index_tensor: torch.Tensor | None = None,
                spacing_tensor: torch.Tensor | None = None) -> torch.Tensor:
        attn_context = context
        if context is not None and context.ndim == 2:
            attn_context = context[:, None]  # cross-attention takes tokens (B, 1, D)
        extras = dict(top_region_index_tensor=top_region_index_tensor,
                      bottom_region_index_tensor=bottom_region_index_tensor, spacing_tensor=spacing_tensor,
                      adagn_context=context)
        return self._forward(x, timesteps, attn_context, class_labels, down_block_additional_residuals,
                             mid_block_additional_residual, extras)


__all__ = ["DiffusionModelUNetMaisiAdaGN", "AdaGNResnetBlock"]
