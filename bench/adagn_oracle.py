"""Bench / test-only oracle: the v2 mask UNet (AdaGN) built from MONAI's own `DiffusionModelUNetMaisi` class, with
the adaptive-GroupNorm additions NVIDIA describes (per ResBlock: Linear(emb + E -> 2 Cout) gives (scale, shift),
GN2(h) * (1 + scale) + shift; E = MLP(19-number condition) appended to the embedding). Same state-dict keys as ours,
so one state dict loads strictly into both. MONAI's execution, PyTorch eager: the reference loop of the benchmark.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _adagn_block_forward(block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """MONAI's ResBlock forward with the time-embedding add replaced by the (scale, shift) modulation of GN2."""
    h = block.nonlinearity(block.norm1(x))
    if block.upsample is not None:
        x, h = block.upsample(x), block.upsample(h)
    elif block.downsample is not None:
        x, h = block.downsample(x), block.downsample(h)
    h = block.conv1(h)
    mod = block.time_emb_proj(block.nonlinearity(emb))
    mod = mod.reshape(*mod.shape, *([1] * block.spatial_dims))
    scale, shift = mod.chunk(2, dim=1)
    h = block.nonlinearity(block.norm2(h) * (1.0 + scale) + shift)
    return block.skip_connection(x) + block.conv2(h)


def monai_adagn_unet(adagn_condition_dim: int | None = None, adagn_context_embed_dim: int | None = None,
                     **kwargs) -> nn.Module:
    """MONAI `DiffusionModelUNetMaisi(**kwargs)` turned into the AdaGN UNet (eval-ready, MONAI execution)."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    kwargs.pop("_target_", None)

    class OracleAdaGN(DiffusionModelUNetMaisi):
        def forward(self, x, timesteps, context=None, class_labels=None, down_block_additional_residuals=None,
                    mid_block_additional_residual=None, top_region_index_tensor=None,
                    bottom_region_index_tensor=None, spacing_tensor=None):
            emb = self._get_time_and_class_embedding(x, timesteps, class_labels)
            emb = self._get_input_embeddings(emb, top_region_index_tensor, bottom_region_index_tensor, spacing_tensor)
            cond = (x.new_full((x.shape[0], self.adagn_condition_dim), -1.0) if context is None
                    else context.mean(dim=1) if context.ndim == 3 else context)
            emb = torch.cat([emb, self.adagn_context_embed(cond.to(x.dtype))], dim=1)
            h = self.conv_in(x)
            h, skips = self._apply_down_blocks(h, emb, context, down_block_additional_residuals)
            h = self.middle_block(h, emb, context)
            h = self._apply_up_blocks(h, emb, context, skips)
            return self.out(h)

    net = OracleAdaGN(**kwargs)
    net.adagn_condition_dim = int(adagn_condition_dim or kwargs["cross_attention_dim"])
    dim = int(adagn_context_embed_dim or 4 * net.block_out_channels[0])
    net.adagn_context_embed = nn.Sequential(nn.Linear(net.adagn_condition_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    for block in net.modules():
        if isinstance(block, DiffusionUNetResnetBlock):
            old = block.time_emb_proj
            block.time_emb_proj = nn.Linear(old.in_features + dim, 2 * block.out_channels)
            block.forward = types.MethodType(_adagn_block_forward, block)
    return net
