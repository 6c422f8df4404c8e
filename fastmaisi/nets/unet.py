"""MAISI diffusion UNets with MONAI's state_dict layout: `DiffusionModelUNetMaisi` (image DM) and
`DiffusionModelUNet` (mask DM, cross-attention to the 10-vector of organ sizes).

Constructors take the same keyword arguments and defaults as MONAI's classes, so `Class(**definition)` works for the
official `config_network_*.json` entries; forward keywords are MONAI's too. Execution tricks live in `blocks.py`.

Differences from MONAI, on purpose:
- `use_flash_attention` is accepted and ignored: attention always goes through `nets.attention` (our Triton flash
  kernel for CUDA fp16/bf16 inference, else `torch.nn.functional.scaled_dot_product_attention`, which picks flash /
  memory-efficient / math kernels by device and dtype). MONAI's Maisi UNet raises on a machine without CUDA when it
  is True; ours does not (so the official configs build on CPU).
- `upcast_attention` is accepted and has no effect. MONAI casts q and k to fp32, which autocast undoes for SDPA (it is
  on the fp16 cast list), so MAISI's fp16 runs never used it; in fp32 it is a no-op anyway.
- Dropout (`dropout_cattn`) is applied only in training mode (MONAI's flash path also drops attention weights in
  eval mode).
- Region/spacing inputs are cast to the embedding layers' dtype when autocast is off (MONAI would fail with fp32
  inputs on a `.half()` model); timesteps/labels/regions are moved to x's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from fastmaisi.nets.blocks import (
    Conv,
    add_residual_inplace,
    build_down_path,
    build_mid_block,
    build_up_path,
    check_config,
    embedding_mlp,
    group_norm,
    index_resnets,
    run_mlp,
    time_projections,
)
from fastmaisi.nets.kernel_device import kernels_run_on
from fastmaisi.nets.ops import timestep_embedding


def autocast_enabled(device: torch.device) -> bool:
    if device.type == "meta":  # `--dry-run` plans: no autocast there
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()


def time_and_class_embedding(net: nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                             class_labels: torch.Tensor | None) -> torch.Tensor:
    """MONAI: time_embed(sinusoid(t).to(x.dtype)) [+ class_embedding(labels).to(x.dtype)], shape (B, 4*C0)."""
    t_emb = timestep_embedding(timesteps.to(x.device), net.block_out_channels[0]).to(x.dtype)
    emb = run_mlp(net.time_embed, t_emb)
    if net.num_class_embeds is not None:
        if class_labels is None:
            raise ValueError("class_labels (B,) are required: the network was built with num_class_embeds")
        emb = emb + net.class_embedding(class_labels.to(x.device)).to(x.dtype)
    return emb


# outputs the selective-checkpoint policy keeps: convolutions, matmuls and attention (whichever SDPA backends exist)
_EXPENSIVE_OPS = frozenset(getattr(torch.ops.aten, n).default for n in (
    "convolution", "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, n))


def _save_expensive(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: save the outputs of convolutions, matmuls and attention; recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_expensive)


class _UNetBase(nn.Module):
    """Shared construction and forward of MONAI's two diffusion UNets (they differ in the embedding inputs and in
    how ControlNet residuals are added)."""

    _name = "DiffusionModelUNet"
    _extra_inputs: tuple[tuple[str, str, int], ...] = ()  # (layer attribute, forward keyword, input dim)
    _inplace_control = False  # MAISI's in-place residual add (the middle block then sees h + ctrl_down[-1])
    # Training only (not a parameter: no state_dict key). False: keep every activation; True: recompute each block in
    # backward; "selective": keep what convolutions, attention and linear layers return, recompute the cheap
    # norms / activations / adds between them (H200, latent 128^3: 17.2 GiB vs 21.8 plain and 12.8 full, but as slow
    # as full recomputation, 0.62 vs 0.44 s per step); "outer": recompute only the full-resolution level's down and up
    # blocks (full-size rflow UNet, latent 32^3, CPU: 57 % of the plain activation bytes kept; not yet timed on a GPU).
    use_checkpointing: bool | str = False
    supports_selective = True

    def _run(self, fn, *args, outer: bool = False):
        """fn(*args), under activation checkpointing when training with gradients and `use_checkpointing` is set
        (with "outer": only for the blocks at full resolution, `outer=True`)."""
        mode = self.use_checkpointing
        if mode and (mode != "outer" or outer) and self.training and torch.is_grad_enabled():
            context = _selective_context if mode == "selective" else None
            kwargs = {"context_fn": context} if context is not None else {}
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args)

    def _build(self, *, spatial_dims: int, in_channels: int, out_channels: int, num_res_blocks, channels,
               attention_levels, norm_num_groups: int, norm_eps: float, resblock_updown: bool, num_head_channels,
               with_conditioning: bool, transformer_num_layers: int, cross_attention_dim: int | None,
               num_class_embeds: int | None, upcast_attention: bool, dropout_cattn: float, include_fc: bool,
               use_combined_linear: bool, use_flash_attention: bool, extra_inputs: Sequence[tuple[str, str, int]]):
        heads, blocks = check_config(self._name, spatial_dims, channels, attention_levels, norm_num_groups,
                                     num_head_channels, num_res_blocks, with_conditioning, cross_attention_dim,
                                     dropout_cattn)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.block_out_channels = tuple(channels)
        self.num_res_blocks = blocks
        self.attention_levels = tuple(attention_levels)
        self.num_head_channels = heads
        self.with_conditioning = with_conditioning
        self.upcast_attention = upcast_attention  # accepted, no effect (see module docstring)
        self.use_flash_attention = use_flash_attention  # accepted, SDPA is always used
        self._extra_inputs = tuple(extra_inputs)

        self.conv_in = Conv(spatial_dims, in_channels, channels[0], 3, 1, 1)
        embed_dim = channels[0] * 4
        self.time_embed = embedding_mlp(channels[0], embed_dim)
        self.num_class_embeds = num_class_embeds
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, embed_dim)
        for attr, _, dim in self._extra_inputs:
            setattr(self, attr, embedding_mlp(dim, embed_dim))
        temb_channels = embed_dim * (1 + len(self._extra_inputs))

        attn_kwargs = dict(transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
                           dropout_cattn=dropout_cattn, include_fc=include_fc,
                           use_combined_linear=use_combined_linear)
        trunk = (spatial_dims, channels, attention_levels, heads, blocks, temb_channels, norm_num_groups, norm_eps,
                 resblock_updown, with_conditioning, attn_kwargs)
        build_down_path(self, *trunk)
        self.middle_block = build_mid_block(spatial_dims, channels, heads, temb_channels, norm_num_groups, norm_eps,
                                            with_conditioning, attn_kwargs)
        build_up_path(self, *trunk)
        self.out = nn.Sequential(
            nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps, affine=True),
            nn.SiLU(),
            Conv(spatial_dims, channels[0], out_channels, 3, 1, 1),
        )
        self._resnets = index_resnets(self)

    def _embedding(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None,
                   extras: dict) -> torch.Tensor:
        emb = time_and_class_embedding(self, x, timesteps, class_labels)
        parts = [emb]
        for attr, keyword, _ in self._extra_inputs:
            value = extras.get(keyword)
            if value is None:
                raise ValueError(f"{keyword} is required: the network was built to take it as an input")
            mlp = getattr(self, attr)
            value = value.to(x.device)
            if not autocast_enabled(x.device):
                value = value.to(mlp[0].weight.dtype)
            parts.append(run_mlp(mlp, value))
        return torch.cat(parts, dim=1) if len(parts) > 1 else emb

    def _time_projections(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """Each resnet's projection of the embedding, indexed by `temb_index` (AdaGN nets project to 2 x Cout)."""
        return time_projections(self._resnets, emb)

    def _forward(self, x, timesteps, context, class_labels, down_res, mid_res, extras) -> torch.Tensor:
        if context is not None and not self.with_conditioning:
            raise ValueError("context was given but the network was built with with_conditioning=False")
        emb = self._embedding(x, timesteps, class_labels, extras)
        temb = self._time_projections(emb)

        h = self.conv_in(x)
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            h, out = self._run(lambda h_, b=block: b(h_, temb, context), h, outer=i == 0)
            skips.extend(out)

        if down_res is not None:
            down_res = list(down_res)
            if len(down_res) != len(skips):
                raise ValueError(f"down_block_additional_residuals must have {len(skips)} tensors, got "
                                 f"{len(down_res)}")
            if self._inplace_control:
                # MONAI DiffusionModelUNetMaisi adds in place; the last skip IS h, so the middle block sees
                # h + ctrl_down[-1]. MAISI's ControlNets were trained with this.
                last_is_h = skips[-1] is h
                if kernels_run_on(h) and not torch.is_grad_enabled():
                    # the skips are read once, by the up path's concatenations: those add the residuals as they
                    # copy (`cat_channels`), saving a pass over each skip; h's residual the middle block needs now
                    skips = [(s, r) for s, r in zip(skips, down_res)]
                    if last_is_h:
                        skips[-1] = h = add_residual_inplace(h, down_res[-1])
                else:
                    skips = [add_residual_inplace(s, r) for s, r in zip(skips, down_res)]
                    if last_is_h:
                        h = skips[-1]
            else:
                skips = [s + r for s, r in zip(skips, down_res)]

        h = self._run(lambda h_: self.middle_block(h_, temb, context), h)
        if mid_res is not None:
            h = add_residual_inplace(h, mid_res) if self._inplace_control else h + mid_res

        for block in self.up_blocks:
            n = len(block.resnets)  # each resnet pops one skip: hand the block exactly its own (recompute-safe)
            mine, skips = skips[-n:], skips[:-n]
            h = self._run(lambda h_, *s, b=block: b(h_, list(s), temb, context), h, *mine,
                          outer=block is self.up_blocks[-1])
        h = group_norm(h, self.out[0], silu=True)
        return self.out[2](h)


class DiffusionModelUNetMaisi(_UNetBase):
    """MONAI `DiffusionModelUNetMaisi` (same constructor, keys, forward), faster execution.

    forward(x (B, C, *S), timesteps (B,) float or int, context (B, L, ctx) | None, class_labels (B,) long | None,
    down_block_additional_residuals, mid_block_additional_residual, top_region_index_tensor (B, 4),
    bottom_region_index_tensor (B, 4), spacing_tensor (B, 3)) -> (B, out_channels, *S).
    Spatial sizes must be divisible by 2**(len(num_channels) - 1).
    """

    _name = "DiffusionModelUNetMaisi"
    _inplace_control = True

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
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
        include_fc: bool = False,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        dropout_cattn: float = 0.0,
        include_top_region_index_input: bool = False,
        include_bottom_region_index_input: bool = False,
        include_spacing_input: bool = False,
    ) -> None:
        super().__init__()
        extra = []
        if include_top_region_index_input:
            extra.append(("top_region_index_layer", "top_region_index_tensor", 4))
        if include_bottom_region_index_input:
            extra.append(("bottom_region_index_layer", "bottom_region_index_tensor", 4))
        if include_spacing_input:
            extra.append(("spacing_layer", "spacing_tensor", 3))
        self.include_top_region_index_input = include_top_region_index_input
        self.include_bottom_region_index_input = include_bottom_region_index_input
        self.include_spacing_input = include_spacing_input
        self._build(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    num_res_blocks=num_res_blocks, channels=num_channels, attention_levels=attention_levels,
                    norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
                    num_head_channels=num_head_channels, with_conditioning=with_conditioning,
                    transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
                    num_class_embeds=num_class_embeds, upcast_attention=upcast_attention,
                    dropout_cattn=dropout_cattn, include_fc=include_fc, use_combined_linear=use_combined_linear,
                    use_flash_attention=use_flash_attention, extra_inputs=extra)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        top_region_index_tensor: torch.Tensor | None = None,
        bottom_region_index_tensor: torch.Tensor | None = None,
        spacing_tensor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extras = dict(top_region_index_tensor=top_region_index_tensor,
                      bottom_region_index_tensor=bottom_region_index_tensor, spacing_tensor=spacing_tensor)
        return self._forward(x, timesteps, context, class_labels, down_block_additional_residuals,
                             mid_block_additional_residual, extras)


class DiffusionModelUNet(_UNetBase):
    """MONAI `DiffusionModelUNet` (MAISI's mask DM: with_conditioning, cross_attention_dim 10, context (B, 1, 10)).

    ControlNet residuals are added out of place (as MONAI's base class: no leak into the middle block).
    """

    _name = "DiffusionModelUNet"

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        channels: Sequence[int] = (32, 64, 64, 64),
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
        dropout_cattn: float = 0.0,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self._build(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
                    norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
                    num_head_channels=num_head_channels, with_conditioning=with_conditioning,
                    transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
                    num_class_embeds=num_class_embeds, upcast_attention=upcast_attention,
                    dropout_cattn=dropout_cattn, include_fc=include_fc, use_combined_linear=use_combined_linear,
                    use_flash_attention=use_flash_attention, extra_inputs=())

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._forward(x, timesteps, context, class_labels, down_block_additional_residuals,
                             mid_block_additional_residual, {})


__all__ = ["DiffusionModelUNetMaisi", "DiffusionModelUNet"]
