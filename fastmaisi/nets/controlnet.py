"""MAISI ControlNet with MONAI's state_dict layout (`ControlNetMaisi`).

Same constructor keywords/defaults and forward as MONAI's class; returns (12 down residuals, mid residual) for
`DiffusionModelUNetMaisi`. Execution tricks are those of `blocks.py`.

The conditioning embedding (six convs at full image resolution, e.g. 8 channels at 512^3) depends only on
`controlnet_cond`, which is the same at every sampling step. Compute it once explicitly and pass it every step:
`emb = net.embed_condition(cond)` (or `net.embed_labels(label_map)`), then `net(x, t, controlnet_cond=None,
controlnet_cond_embedding=emb, ...)` (what `pipelines.sampling.image_denoiser` does). A forward given
`controlnet_cond` embeds it at every call, as MONAI's class does: nothing is cached behind the caller's back, so a
condition refilled in place (through numpy or `.data`) or weights updated through `.data` always take effect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmaisi.nets.blocks import (
    _CONV,
    Conv,
    build_down_path,
    build_mid_block,
    check_config,
    conv_add_,
    embedding_mlp,
    index_resnets,
    time_projections,
)
from fastmaisi.nets.label_conv import label_conv, label_conv_applies
from fastmaisi.nets.unet import autocast_enabled, time_and_class_embedding


class ControlNetConditioningEmbedding(nn.Module):
    """MONAI's: conv_in + Swish, then per level (conv s1 + Swish, conv s2 + Swish), then conv_out (no activation)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.conv_in = Conv(spatial_dims, in_channels, channels[0], 3, 1, 1, act=True)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(Conv(spatial_dims, c_in, c_in, 3, 1, 1, act=True))
            self.blocks.append(Conv(spatial_dims, c_in, c_out, 3, 2, 1, act=True))
        self.conv_out = Conv(spatial_dims, channels[-1], out_channels, 3, 1, 1)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        return self.rest(self.conv_in(conditioning))

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after conv_in + Swish."""
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


class ControlNetMaisi(nn.Module):
    """MONAI `ControlNetMaisi` (same constructor, keys and forward), faster execution.

    forward(x (B, C, *S), timesteps (B,), controlnet_cond (B, Ccond, *(S*4)), conditioning_scale=1.0,
    context=None, class_labels (B,) | None, controlnet_cond_embedding=None) -> (list of down residuals, mid residual).
    `use_flash_attention` / `upcast_attention` are accepted and behave as in `fastmaisi.nets.unet`.
    """

    _name = "ControlNetMaisi"

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        resblock_updown: bool = False,
        num_head_channels: int | Sequence[int] = 8,
        with_conditioning: bool = False,
        transformer_num_layers: int = 1,
        cross_attention_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        conditioning_embedding_in_channels: int = 1,
        conditioning_embedding_num_channels: Sequence[int] = (16, 32, 96, 256),
        use_checkpointing: bool = True,
        include_fc: bool = False,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        channels = num_channels
        heads, blocks = check_config(self._name, spatial_dims, channels, attention_levels, norm_num_groups,
                                     num_head_channels, num_res_blocks, with_conditioning, cross_attention_dim)
        if not conditioning_embedding_num_channels:
            raise ValueError(f"{self._name}: conditioning_embedding_num_channels must not be empty")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.block_out_channels = tuple(channels)
        self.num_res_blocks = blocks
        self.attention_levels = tuple(attention_levels)
        self.num_head_channels = heads
        self.with_conditioning = with_conditioning
        self.use_checkpointing = use_checkpointing
        self.upcast_attention = upcast_attention  # accepted, no effect
        self.use_flash_attention = use_flash_attention  # accepted, SDPA is always used

        self.conv_in = Conv(spatial_dims, in_channels, channels[0], 3, 1, 1)
        embed_dim = channels[0] * 4
        self.time_embed = embedding_mlp(channels[0], embed_dim)
        self.num_class_embeds = num_class_embeds
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, embed_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            spatial_dims, conditioning_embedding_in_channels, channels[0], conditioning_embedding_num_channels)

        attn_kwargs = dict(transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
                           dropout_cattn=0.0, include_fc=include_fc, use_combined_linear=use_combined_linear)
        build_down_path(self, spatial_dims, channels, attention_levels, heads, blocks, embed_dim, norm_num_groups,
                        norm_eps, resblock_updown, with_conditioning, attn_kwargs)
        # zero convs, one per skip tensor; the first is a raw conv in MONAI (keys `controlnet_down_blocks.0.weight`)
        zero_convs = [_CONV[spatial_dims](channels[0], channels[0], 1)]
        for i, c in enumerate(channels):
            n = blocks[i] + (1 if i < len(channels) - 1 else 0)
            zero_convs += [Conv(spatial_dims, c, c, 1, 1, 0) for _ in range(n)]
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        self.middle_block = build_mid_block(spatial_dims, channels, heads, embed_dim, norm_num_groups, norm_eps,
                                            with_conditioning, attn_kwargs)
        self.controlnet_mid_block = Conv(spatial_dims, channels[-1], channels[-1], 1, 1, 0)
        self._resnets = index_resnets(self)

    # ------------------------------------------------------------------------------------ conditioning embedding
    def embed_condition(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """The conditioning embedding (B, C0, *S) of `controlnet_cond` (B, Ccond, *(S*4)), uncached."""
        if self.use_checkpointing and torch.is_grad_enabled() and (
                controlnet_cond.requires_grad
                or any(p.requires_grad for p in self.controlnet_cond_embedding.parameters())):
            return checkpoint(self.controlnet_cond_embedding, controlnet_cond, use_reentrant=False)
        return self.controlnet_cond_embedding(controlnet_cond)

    def embed_labels(self, label: torch.Tensor) -> torch.Tensor:
        """`embed_condition(bits(label))` from an integer label map (B, 1, *(S*4)), for the 8 bit-channel condition.
        In CUDA inference conv_in reads the uint8 map itself (`nets.label_conv`): the 8-channel full-resolution
        condition (2 GiB at 512^3 in fp16) is never built."""
        from fastmaisi.labels import binarize_labels

        emb = self.controlnet_cond_embedding
        conv = emb.conv_in.conv
        if conv.in_channels != 8:
            raise ValueError(f"embed_labels: the condition has {conv.in_channels} channels, not a label map's 8 bits")
        if label_conv_applies(label, conv) and not autocast_enabled(label.device):
            return emb.rest(label_conv(label, conv, silu=True))
        return self.embed_condition(binarize_labels(label, dtype=conv.weight.dtype, channels_last=label.is_cuda))

    def clear_condition_cache(self) -> None:
        """Nothing to clear: the condition embedding is never cached implicitly (kept so older callers run)."""

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor | None,
        conditioning_scale: float = 1.0,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        controlnet_cond_embedding: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if context is not None and not self.with_conditioning:
            raise ValueError("context was given but the network was built with with_conditioning=False")
        if controlnet_cond_embedding is None:
            if controlnet_cond is None:
                raise ValueError("give controlnet_cond (or a precomputed controlnet_cond_embedding)")
            controlnet_cond_embedding = self.embed_condition(controlnet_cond)
        emb = time_and_class_embedding(self, x, timesteps, class_labels)
        temb = time_projections(self._resnets, emb)

        h = conv_add_(self.conv_in, x, controlnet_cond_embedding)  # MONAI: h = conv_in(x); h += embedding
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, temb, context)
            skips.extend(out)
        h = self.middle_block(h, temb, context)

        down = [conv(s) for s, conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h)
        if not (isinstance(conditioning_scale, (int, float)) and conditioning_scale == 1.0):  # x * 1.0 == x
            down = [add_scale(d, conditioning_scale) for d in down]
            mid = add_scale(mid, conditioning_scale)
        return down, mid


def add_scale(t: torch.Tensor, scale) -> torch.Tensor:
    """t * scale, in place when autograd does not need t (a fresh zero-conv output)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return t * scale
    return t.mul_(scale)


__all__ = ["ControlNetMaisi", "ControlNetConditioningEmbedding"]
