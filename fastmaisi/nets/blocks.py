"""Building blocks shared by the MAISI diffusion UNets and the ControlNet (same state_dict keys as MONAI's).

Module names, nesting and registration order reproduce MONAI's `diffusion_model_unet.py` exactly, so a MONAI
state_dict loads strictly (keys, shapes and order). Only the execution differs:

- GroupNorm(+SiLU) with fp32 statistics and output in the input dtype: Triton kernels on CUDA for inference
  (statistics spread over the whole GPU, any of NCDHW / channels-last, SiLU fused), `ops.group_norm` otherwise;
- every `time_emb_proj(SiLU(emb))` of a forward pass is one GEMM over the concatenated weights (`time_projections`);
  the projection and conv1's bias are folded into the next GroupNorm (or, on CPU with batch 1, into conv1's bias);
- nearest x2 upsampling + conv k3 is one transposed conv (stride 2, kernel 4, summed taps) on the coarse grid;
- attention runs on (B, N, C) token views (free for channels-last inputs), with one fused QKV GEMM, SDPA (on CUDA
  inference our Triton flash kernel, `nets.attention`, 16 % faster than cuDNN's at head size 32), and the
  1x1x1 `proj_in`/`proj_out` convolutions of the spatial transformer done as GEMMs on the tokens;
- cross-attention to a context of sequence length 1 is `out_proj(to_v(context))` exactly (softmax over one key
  is 1), so `norm2`, `to_q` and `to_k` are skipped;
- residual adds happen in place on freshly computed tensors when autograd does not need the operands; on CUDA
  inference a ControlNet residual is added to its skip by the up path's concatenation (`cat_channels`), and a
  downsampling resnet pools x and SiLU(GroupNorm(x)) in one read (`norm_silu_pool_x2`).

The tensor ops with Triton fast paths are in `nets.fused_ops` (their kernels in `nets.triton_kernels`); this module
holds the `nn.Module`s and the dispatch between those ops and `nets.ops`.
"""


from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmaisi.nets import ops
from fastmaisi.nets.attention import attention
from fastmaisi.nets import thin_conv
from fastmaisi.nets.kernel_device import kernels_run_on
# the tensor ops the modules below use, and their Triton kernels (re-exported: `from fastmaisi.nets.blocks import X`)
from fastmaisi.nets.fused_ops import (  # noqa: F401
    _group_norm_affine, _is_channels_last, _needs_grad, _stats_cl_config, _stats_tiles, _stats_two_pass, add_,
    add_bias_, add_bias_residual_, add_upsampled_, avg_pool_x2, cat_channels, fast_bias_add, fast_group_norm,
    group_moments, norm_silu_pool_x2, scale_shift, silu_, upsample_conv, upsample_trilinear_x2)
from fastmaisi.nets.triton_kernels import _triton_kernels  # noqa: F401


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and keys). CPU fp32 inference calls oneDNN directly: for small 3D inputs PyTorch
    picks its im2col path instead (`slow_conv3d`: 50 vs 10 ms for 32 -> 32 channels at 16^3 on 2 threads), which made
    the demo's 100 mask-DM steps take 10 s. CUDA inference adds the bias with `add_bias_` (same sum, faster pass)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and not _needs_grad(x, weight, bias)):
            return torch.mkldnn_convolution(x.contiguous(), weight, bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        if bias is not None and kernels_run_on(x) and not _needs_grad(x, weight, bias):
            return add_bias_(super()._conv_forward(x, weight, None), bias)  # same sum, one faster pass
        return super()._conv_forward(x, weight, bias)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: Conv3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}



# ----------------------------------------------------------------------------------------------------------- helpers
def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm with fp32 statistics, returned in x's dtype (autocast would return fp32)."""
    with ops.no_autocast(x):
        w = norm.weight.to(x.dtype) if norm.weight is not None else None
        b = norm.bias.to(x.dtype) if norm.bias is not None else None
        if x.dtype == torch.float32 or x.device.type == "cuda":  # CUDA accumulates half inputs in fp32
            return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)
        w32 = norm.weight.float() if norm.weight is not None else None
        b32 = norm.bias.float() if norm.bias is not None else None
        return F.layer_norm(x.float(), norm.normalized_shape, w32, b32, norm.eps).to(x.dtype)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False,
               pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(x + pre_bias) (+SiLU), fp32 statistics, output in x's dtype: Triton kernels on CUDA for inference
    (see above), `ops.group_norm` otherwise. x: (B, C, *S); pre_bias: (C,) or (B, C), folded into the statistics
    and the affine (a conv's bias plus the time embedding, without a pass over x)."""
    if not fast_group_norm(x, norm):
        if pre_bias is not None:
            x = x + pre_bias.reshape(*pre_bias.shape, *([1] * (x.dim() - pre_bias.dim()))).to(x.dtype)
        return ops.group_norm(x, norm, silu)
    return scale_shift(x, *_group_norm_affine(x, norm, pre_bias), silu)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C) view: contiguous for channels-last x, a transposed view otherwise (no copy)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, C, *S) view (channels-last strides when t is contiguous)."""
    return t.transpose(1, 2).unflatten(2, like.shape[2:])


def _linear_weight(conv: nn.Module) -> torch.Tensor:
    """A 1x1(x1) convolution's weight as a Linear weight (Cout, Cin) (a view)."""
    return conv.weight.flatten(1)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d) view (last dim contiguous, what SDPA/flash wants)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _maybe_cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(list(tensors))


def embedding_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear (MONAI's time / region / spacing embedding; keys `.0.*`, `.2.*`)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


def run_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = mlp[0](x)
    return mlp[2](silu_(h))


# -------------------------------------------------------------------------------------------------------- convolution
class Conv(nn.Module):
    """MONAI `Convolution` stand-in: the real conv is the child `conv` (keys `<name>.conv.weight/bias`).

    act=True appends Swish (x * sigmoid(x) = SiLU), as the ControlNet conditioning embedding's `act="SWISH"`.
    k3 convs with few channels on one side run as one Triton pass on CUDA (`nets.thin_conv`), bias and Swish fused.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, act: bool = False) -> None:
        super().__init__()
        self.conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size, stride, padding)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if thin_conv.applies(x, conv):
            return thin_conv.thin_conv(x, conv, silu=self.act)
        if self.act and kernels_run_on(x) and conv.bias is not None and not _needs_grad(x, conv.weight, conv.bias):
            return add_bias_(conv._conv_forward(x, conv.weight, None), conv.bias, silu=True)  # bias + SiLU: one pass
        y = conv(x)
        return silu_(y) if self.act else y


def add_residual_inplace(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """MONAI's `s += r` (result keeps s's dtype), out of place when autograd needs `s` unmodified."""
    if torch.is_grad_enabled() and s.requires_grad:
        return (s + r).to(s.dtype)
    return s.add_(r)


def conv_add_(conv: Conv, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """MONAI's `h = conv(x); h += r` (a ControlNet's input conv plus the condition embedding); on CUDA inference the
    bias and r go in with one pass instead of two."""
    c = conv.conv
    if thin_conv.applies(x, c, r):
        return thin_conv.thin_conv(x, c, r=r)
    if c.bias is not None and kernels_run_on(x) and not _needs_grad(x, c.weight, c.bias, r):
        return add_bias_residual_(c._conv_forward(x, c.weight, None), c.bias, r)
    return add_residual_inplace(conv(x), r)


# ------------------------------------------------------------------------------------------------------ resnet block
class ResnetBlock(nn.Module):
    """MONAI `DiffusionUNetResnetBlock`: conv1(SiLU(GN1(x))) [+ up/down] + temb -> conv2(SiLU(GN2(.))) + skip(x).

    `temb` passed to forward is this block's precomputed `time_emb_proj(SiLU(emb))`, shape (B, Cout)
    (see `time_projections`). With the Triton GroupNorm, conv1 runs without bias and GN2 takes conv1's bias + temb
    into its statistics (no pass over the feature map); otherwise with B == 1 temb is folded into conv1's bias.
    Upsampling resnets run conv1 as one transposed conv on the coarse grid (`upsample_conv`) and add the
    residual by broadcasting (`add_upsampled_`).
    """

    upsample_on_coarse_grid = True  # up=True: conv1(nearest_x2(h)) via `upsample_conv` (same math, 8/27 FLOPs)

    def __init__(self, spatial_dims: int, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 up: bool = False, down: bool = False, norm_num_groups: int = 32, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels = out_channels or in_channels
        self.up, self.down = up, down
        self.temb_index = -1  # position in the owning network's time_projections() output, set by the network
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.conv1 = Conv(spatial_dims, in_channels, out_channels, 3, 1, 1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps, affine=True)
        self.conv2 = Conv(spatial_dims, out_channels, out_channels, 3, 1, 1)
        self.skip_connection = (Conv(spatial_dims, in_channels, out_channels, 1, 1, 0)
                                if in_channels != out_channels else None)

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        if self.down:
            return avg_pool_x2(t) if _is_channels_last(t) else _AVG_POOL[self.spatial_dims](t, kernel_size=2, stride=2)
        return t

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        coarse_up = self.up and self.upsample_on_coarse_grid
        x, h = self._norm1_resample(x, coarse_up)
        return self._conv2_skip(self._conv1_norm2(h, temb, coarse_up), x, coarse_up)

    def _norm1_resample(self, x: torch.Tensor, coarse_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, SiLU(GN1(x))), both pooled or upsampled as the block resamples (coarse-grid upsampling: neither)."""
        pooled = norm_silu_pool_x2(x, self.norm1) if self.down else None
        if pooled is not None:  # one pass: both pooled inputs, the full-resolution h never written
            return pooled
        h = group_norm(x, self.norm1, silu=True)
        if not coarse_up and (self.up or self.down):
            x, h = self._resample(x), self._resample(h)
        return x, h

    def _conv1_norm2(self, h: torch.Tensor, temb: torch.Tensor, coarse_up: bool) -> torch.Tensor:
        """SiLU(GN2(conv1(h) + temb)): the time embedding added before the second GroupNorm."""
        conv1 = self.conv1.conv
        if conv1.bias is not None and fast_group_norm(h, self.norm2):
            # conv1 without bias; GN2 takes bias + temb into its statistics and affine (no pass over h)
            h = upsample_conv(h, conv1, None) if coarse_up else conv1._conv_forward(h, conv1.weight, None)
            return group_norm(h, self.norm2, silu=True, pre_bias=conv1.bias + temb)
        # batch 1: conv1(h) + temb == conv with bias (b + temb); saves a pass over the feature map.
        fold = h.shape[0] == 1 and temb.shape[0] == 1 and conv1.bias is not None
        bias = conv1.bias + temb[0] if fold else conv1.bias
        h = upsample_conv(h, conv1, bias) if coarse_up else conv1._conv_forward(h, conv1.weight, bias)
        if not fold:
            h = add_(h, temb.reshape(*temb.shape, *([1] * self.spatial_dims)))
        return group_norm(h, self.norm2, silu=True)

    def _conv2_skip(self, h: torch.Tensor, x: torch.Tensor, coarse_up: bool) -> torch.Tensor:
        """conv2(h) + skip(x) (x upsampled by broadcasting on the coarse grid)."""
        c2, sk = self.conv2.conv, self.skip_connection.conv if self.skip_connection is not None else None
        if not coarse_up and c2.bias is not None and fast_bias_add(h):
            # conv2 and the 1x1 skip without their biases: both biases and the residual go in with one pass over h
            h = c2._conv_forward(h, c2.weight, None)
            skip = sk._conv_forward(x, sk.weight, None) if sk is not None else x
            return add_bias_residual_(h, c2.bias if sk is None or sk.bias is None else c2.bias + sk.bias, skip)
        h = self.conv2(h)
        skip = self.skip_connection(x) if self.skip_connection is not None else x
        if coarse_up:  # x is still coarse: skip(up(x)) == up(skip(x)) (1x1 conv), added by broadcasting
            return add_upsampled_(h, skip)
        return add_(h, skip)


def time_projections(resnets: Sequence[ResnetBlock], emb: torch.Tensor) -> list[torch.Tensor]:
    """All `time_emb_proj(SiLU(emb))` of a network in one GEMM: SiLU once, weights concatenated (differentiable).

    Returns one (B, Cout_i) view per resnet, in the order of `resnets` (index = `resnet.temb_index`).
    """
    act = F.silu(emb)
    weight = torch.cat([r.time_emb_proj.weight for r in resnets])
    bias = torch.cat([r.time_emb_proj.bias for r in resnets])
    return list(F.linear(act, weight, bias).split([r.out_channels for r in resnets], dim=1))


# --------------------------------------------------------------------------------------------------- resample blocks
class Downsample(nn.Module):
    """MONAI `DiffusionUnetDownsample(use_conv=True)`: conv k3 s2 (key `op.conv.*`)."""

    def __init__(self, spatial_dims: int, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.op = Conv(spatial_dims, channels, channels, 3, 2, padding)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """MONAI `WrappedUpsample` (nontrainable nearest x2 + `postconv` k3)."""

    upsample_on_coarse_grid = True  # `upsample_conv` instead of interpolate + conv (same math, 8/27 FLOPs)

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.postconv = Conv(spatial_dims, channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample_on_coarse_grid:
            return upsample_conv(x, self.postconv.conv, self.postconv.conv.bias)
        return self.postconv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------- attention
class SelfAttention(nn.Module):
    """MONAI `SABlock` as used by the UNets: keys `out_proj` (if include_fc), then `to_q/to_k/to_v` or `qkv`.

    Runs one fused QKV GEMM (the three weights concatenated per call, or `qkv` directly) and SDPA.
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool, include_fc: bool = True,
                 use_combined_linear: bool = False, dropout_rate: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden size {hidden_size} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5  # MONAI's dim_head ** -0.5, passed to SDPA explicitly
        self.dropout_rate = dropout_rate
        self.use_combined_linear = use_combined_linear
        self.out_proj = nn.Linear(hidden_size, hidden_size) if include_fc else None
        if use_combined_linear:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.to_k = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.to_v = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)

    def qkv_projection(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.use_combined_linear:
            return self.qkv(tokens)
        layers = (self.to_q, self.to_k, self.to_v)
        return F.linear(tokens, torch.cat([m.weight for m in layers]), _maybe_cat([m.bias for m in layers]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C) -> (B, N, C)."""
        qkv = self.qkv_projection(tokens).unflatten(-1, (3, self.num_heads, -1))  # MONAI: "(qkv l d)"
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d), views
        p = self.dropout_rate if self.training else 0.0
        o = attention(q, k, v, self.scale, p)
        if self.out_proj is not None:
            o = self.out_proj(o)
        return F.dropout(o, p, training=True) if p > 0 else o


class CrossAttention(nn.Module):
    """MONAI `CrossAttentionBlock` (no qkv bias; keys `out_proj`, `to_q`, `to_k`, `to_v`).

    With a context of sequence length 1, softmax over the single key is exactly 1, so the output is
    `out_proj(to_v(context))` for every query token: computed as (B, 1, C) and broadcast by the caller.
    """

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int | None, dropout_rate: float = 0.0) -> None:
        super().__init__()
        context_dim = context_dim or hidden_size
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.dropout_rate = dropout_rate
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_k = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v = nn.Linear(context_dim, hidden_size, bias=False)

    def single_key(self, context: torch.Tensor | None) -> bool:
        """True when the shortcut is exact: one key, and no attention-weight dropout in effect."""
        return context is not None and context.shape[1] == 1 and not (self.training and self.dropout_rate > 0)

    def context_only(self, context: torch.Tensor) -> torch.Tensor:
        """The attention output for a length-1 context, (B, 1, C)."""
        o = self.out_proj(self.to_v(context))
        return F.dropout(o, self.dropout_rate, training=True) if self.training and self.dropout_rate > 0 else o

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = tokens if context is None else context
        q = _split_heads(self.to_q(tokens), self.num_heads)
        k = _split_heads(self.to_k(kv), self.num_heads)
        v = _split_heads(self.to_v(kv), self.num_heads)
        p = self.dropout_rate if self.training else 0.0
        o = self.out_proj(attention(q, k, v, self.scale, p))
        return F.dropout(o, p, training=True) if p > 0 else o


class SpatialAttentionBlock(nn.Module):
    """MONAI `SpatialAttentionBlock`: x + attn(GN(x)) over the N = prod(S) voxels as tokens (keys `norm`, `attn.*`).

    Output keeps x's memory layout (MONAI's `.contiguous()` copies are not needed).
    """

    def __init__(self, spatial_dims: int, num_channels: int, num_head_channels: int, norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, include_fc: bool = True, use_combined_linear: bool = False) -> None:
        super().__init__()
        if num_head_channels <= 0 or num_channels % num_head_channels != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by a positive num_head_channels "
                             f"({num_head_channels}) at every attention level")
        self.norm = nn.GroupNorm(norm_num_groups, num_channels, eps=norm_eps, affine=True)
        self.attn = SelfAttention(num_channels, num_channels // num_head_channels, qkv_bias=True,
                                  include_fc=include_fc, use_combined_linear=use_combined_linear)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = group_norm(x, self.norm)
        return x + from_tokens(self.attn(to_tokens(h)), x)  # x first: the sum takes x's memory layout


class GEGLUMLP(nn.Module):
    """MONAI `MLPBlock(act="GEGLU")`: linear2(a * gelu(g)), [a, g] = linear1(x).chunk(2)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim * 2)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.linear1(x).chunk(2, dim=-1)
        h = a * F.gelu(g)
        p = self.dropout_rate if self.training else 0.0
        if p > 0:
            return F.dropout(self.linear2(F.dropout(h, p, training=True)), p, training=True)
        return self.linear2(h)


class TransformerBlock(nn.Module):
    """MONAI `DiffusionUNetTransformerBlock`: x += attn1(LN1 x); x += attn2(LN2 x, ctx); x += ff(LN3 x)."""

    def __init__(self, num_channels: int, num_attention_heads: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, include_fc: bool = True,
                 use_combined_linear: bool = False) -> None:
        super().__init__()
        self.attn1 = SelfAttention(num_channels, num_attention_heads, qkv_bias=False, include_fc=include_fc,
                                   use_combined_linear=use_combined_linear, dropout_rate=dropout)
        self.ff = GEGLUMLP(num_channels, num_channels * 4, dropout)
        self.attn2 = CrossAttention(num_channels, num_attention_heads, cross_attention_dim, dropout)
        self.norm1 = nn.LayerNorm(num_channels)
        self.norm2 = nn.LayerNorm(num_channels)
        self.norm3 = nn.LayerNorm(num_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = add_(self.attn1(layer_norm(x, self.norm1)), x)
        if self.attn2.single_key(context):
            x = add_(x, self.attn2.context_only(context))  # (B, 1, C) broadcast; LN2, to_q, to_k skipped
        else:
            x = add_(self.attn2(layer_norm(x, self.norm2), context), x)
        return add_(self.ff(layer_norm(x, self.norm3)), x)


class SpatialTransformer(nn.Module):
    """MONAI `SpatialTransformer`: x + proj_out(blocks(proj_in(GN x) as tokens)); 1x1 convs run as token GEMMs."""

    def __init__(self, spatial_dims: int, in_channels: int, num_attention_heads: int, num_head_channels: int,
                 num_layers: int = 1, dropout: float = 0.0, norm_num_groups: int = 32, norm_eps: float = 1e-6,
                 cross_attention_dim: int | None = None, include_fc: bool = True,
                 use_combined_linear: bool = False) -> None:
        super().__init__()
        inner_dim = num_attention_heads * num_head_channels
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.proj_in = Conv(spatial_dims, in_channels, inner_dim, 1, 1, 0)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(inner_dim, num_attention_heads, dropout, cross_attention_dim, include_fc,
                             use_combined_linear) for _ in range(num_layers)])
        self.proj_out = Conv(spatial_dims, inner_dim, in_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = group_norm(x, self.norm)
        t = F.linear(to_tokens(h), _linear_weight(self.proj_in.conv), self.proj_in.conv.bias)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = F.linear(t, _linear_weight(self.proj_out.conv), self.proj_out.conv.bias)
        return x + from_tokens(t, x)


def make_attention(kind: str | None, spatial_dims: int, channels: int, num_head_channels: int, norm_num_groups: int,
                   norm_eps: float, transformer_num_layers: int, cross_attention_dim: int | None, dropout_cattn: float,
                   include_fc: bool, use_combined_linear: bool) -> nn.Module:
    if kind == "self":
        return SpatialAttentionBlock(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps, include_fc,
                                     use_combined_linear)
    if num_head_channels <= 0:
        raise ValueError(f"num_head_channels must be positive at every attention level, got {num_head_channels}")
    return SpatialTransformer(spatial_dims, channels, channels // num_head_channels, num_head_channels,
                              transformer_num_layers, dropout_cattn, norm_num_groups, norm_eps, cross_attention_dim,
                              include_fc, use_combined_linear)


# ----------------------------------------------------------------------------------------------------- level blocks
class DownBlock(nn.Module):
    """MONAI `DownBlock` / `AttnDownBlock` / `CrossAttnDownBlock` (attention=None / "self" / "cross").

    Returns (h, skips): one skip per resnet(+attention) and one for the downsampler.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, temb_channels: int,
                 num_res_blocks: int, norm_num_groups: int, norm_eps: float, add_downsample: bool,
                 resblock_updown: bool, attention: str | None = None, **attn_kwargs) -> None:
        super().__init__()
        if attention is not None:  # MONAI registers `attentions` before `resnets` in the attention down blocks
            self.attentions = nn.ModuleList([
                make_attention(attention, spatial_dims, out_channels, norm_num_groups=norm_num_groups,
                               norm_eps=norm_eps, **attn_kwargs) for _ in range(num_res_blocks)])
        self.resnets = nn.ModuleList([
            ResnetBlock(spatial_dims, in_channels if i == 0 else out_channels, temb_channels, out_channels,
                        norm_num_groups=norm_num_groups, norm_eps=norm_eps) for i in range(num_res_blocks)])
        if attention is None:
            self.attentions = None
        self.downsampler: nn.Module | None = None
        if add_downsample:
            self.downsampler = (
                ResnetBlock(spatial_dims, out_channels, temb_channels, out_channels, down=True,
                            norm_num_groups=norm_num_groups, norm_eps=norm_eps)
                if resblock_updown else Downsample(spatial_dims, out_channels))

    def forward(self, h: torch.Tensor, temb: Sequence[torch.Tensor], context: torch.Tensor | None = None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb[resnet.temb_index])
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = (self.downsampler(h, temb[self.downsampler.temb_index]) if isinstance(self.downsampler, ResnetBlock)
                 else self.downsampler(h))
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """MONAI `AttnMidBlock` / `CrossAttnMidBlock`: resnet_1, attention, resnet_2."""

    def __init__(self, spatial_dims: int, channels: int, temb_channels: int, norm_num_groups: int, norm_eps: float,
                 attention: str, **attn_kwargs) -> None:
        super().__init__()
        kw = dict(norm_num_groups=norm_num_groups, norm_eps=norm_eps)
        self.resnet_1 = ResnetBlock(spatial_dims, channels, temb_channels, channels, **kw)
        self.attention = make_attention(attention, spatial_dims, channels, **kw, **attn_kwargs)
        self.resnet_2 = ResnetBlock(spatial_dims, channels, temb_channels, channels, **kw)

    def forward(self, h: torch.Tensor, temb: Sequence[torch.Tensor], context: torch.Tensor | None = None):
        h = self.resnet_1(h, temb[self.resnet_1.temb_index])
        h = self.attention(h, context)
        return self.resnet_2(h, temb[self.resnet_2.temb_index])


class UpBlock(nn.Module):
    """MONAI `UpBlock` / `AttnUpBlock` / `CrossAttnUpBlock`: cat(h, skip) -> resnet [-> attention], then upsampler."""

    def __init__(self, spatial_dims: int, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, num_res_blocks: int, norm_num_groups: int, norm_eps: float, add_upsample: bool,
                 resblock_updown: bool, attention: str | None = None, **attn_kwargs) -> None:
        super().__init__()

        def attentions():
            return nn.ModuleList([
                make_attention(attention, spatial_dims, out_channels, norm_num_groups=norm_num_groups,
                               norm_eps=norm_eps, **attn_kwargs) for _ in range(num_res_blocks)])

        if attention == "cross":  # registration order as MONAI: CrossAttnUpBlock has attentions first
            self.attentions = attentions()
        resnets = []
        for i in range(num_res_blocks):
            res_skip = in_channels if i == num_res_blocks - 1 else out_channels
            res_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock(spatial_dims, res_in + res_skip, temb_channels, out_channels,
                                       norm_num_groups=norm_num_groups, norm_eps=norm_eps))
        self.resnets = nn.ModuleList(resnets)
        if attention == "self":
            self.attentions = attentions()
        elif attention is None:
            self.attentions = None
        self.upsampler: nn.Module | None = None
        if add_upsample:
            self.upsampler = (
                ResnetBlock(spatial_dims, out_channels, temb_channels, out_channels, up=True,
                            norm_num_groups=norm_num_groups, norm_eps=norm_eps)
                if resblock_updown else Upsample(spatial_dims, out_channels))

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: Sequence[torch.Tensor],
                context: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()  # a tensor, or (skip, ControlNet residual) to add on the way (`_UNetBase._forward`)
            h = resnet(cat_channels(h, *skip) if isinstance(skip, tuple) else cat_channels(h, skip),
                       temb[resnet.temb_index])
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsampler is not None:
            h = (self.upsampler(h, temb[self.upsampler.temb_index]) if isinstance(self.upsampler, ResnetBlock)
                 else self.upsampler(h))
        return h


# --------------------------------------------------------------------------------------------------- network config
def check_config(name: str, spatial_dims: int, channels: Sequence[int], attention_levels: Sequence[bool],
                 norm_num_groups: int, num_head_channels: int | Sequence[int], num_res_blocks: int | Sequence[int],
                 with_conditioning: bool, cross_attention_dim: int | None, dropout_cattn: float = 0.0):
    """MONAI's constructor checks (as ValueErrors) plus ours; returns (num_head_channels, num_res_blocks) tuples."""
    if spatial_dims not in _CONV:
        raise ValueError(f"{name}: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    if with_conditioning and cross_attention_dim is None:
        raise ValueError(f"{name} expects cross_attention_dim when with_conditioning=True")
    if cross_attention_dim is not None and not with_conditioning:
        raise ValueError(f"{name} expects with_conditioning=True when cross_attention_dim is given")
    if not 0.0 <= dropout_cattn <= 1.0:
        raise ValueError(f"{name}: dropout_cattn must be in [0, 1], got {dropout_cattn}")
    if any(c % norm_num_groups != 0 for c in channels):
        raise ValueError(f"{name} expects every channel count to be a multiple of norm_num_groups, got channels "
                         f"{list(channels)} and norm_num_groups {norm_num_groups}")
    if len(channels) != len(attention_levels):
        raise ValueError(f"{name}: channels ({len(channels)}) and attention_levels ({len(attention_levels)}) "
                         "must have the same length")
    heads = (num_head_channels,) * len(attention_levels) if isinstance(num_head_channels, int) \
        else tuple(num_head_channels)
    if len(heads) != len(attention_levels):
        raise ValueError(f"{name}: num_head_channels must be an int or have one entry per level "
                         f"({len(attention_levels)}), got {list(heads)}")
    blocks = (num_res_blocks,) * len(channels) if isinstance(num_res_blocks, int) else tuple(num_res_blocks)
    if len(blocks) != len(channels):
        raise ValueError(f"{name}: num_res_blocks must be an int or have one entry per level ({len(channels)}), "
                         f"got {list(blocks)}")
    for level, (c, attn, nh) in enumerate(zip(channels, attention_levels, heads)):
        if not (attn or level == len(channels) - 1):  # the middle block always attends, with the last level's heads
            continue
        if nh <= 0 or nh > c or (not with_conditioning and c % nh != 0):
            raise ValueError(f"{name}: level {level} has attention (or feeds the middle block) and needs "
                             f"num_head_channels dividing {c}, got {nh}")
    return heads, blocks


def build_down_path(module: nn.Module, spatial_dims: int, channels: Sequence[int],
                    attention_levels: Sequence[bool], heads: Sequence[int], blocks: Sequence[int], temb_channels: int,
                    norm_num_groups: int, norm_eps: float, resblock_updown: bool, with_conditioning: bool,
                    attn_kwargs: dict) -> None:
    """Registers `down_blocks` on `module` (MONAI's get_down_block loop)."""
    module.down_blocks = nn.ModuleList()
    out_c = channels[0]
    for i, c in enumerate(channels):
        in_c, out_c = out_c, c
        attention = ("cross" if with_conditioning else "self") if attention_levels[i] else None
        module.down_blocks.append(DownBlock(
            spatial_dims, in_c, out_c, temb_channels, blocks[i], norm_num_groups, norm_eps,
            add_downsample=i < len(channels) - 1, resblock_updown=resblock_updown, attention=attention,
            **(dict(num_head_channels=heads[i], **attn_kwargs) if attention else {})))


def build_mid_block(spatial_dims: int, channels: Sequence[int], heads: Sequence[int], temb_channels: int,
                    norm_num_groups: int, norm_eps: float, with_conditioning: bool, attn_kwargs: dict) -> MidBlock:
    return MidBlock(spatial_dims, channels[-1], temb_channels, norm_num_groups, norm_eps,
                    attention="cross" if with_conditioning else "self", num_head_channels=heads[-1], **attn_kwargs)


def build_up_path(module: nn.Module, spatial_dims: int, channels: Sequence[int], attention_levels: Sequence[bool],
                  heads: Sequence[int], blocks: Sequence[int], temb_channels: int, norm_num_groups: int,
                  norm_eps: float, resblock_updown: bool, with_conditioning: bool, attn_kwargs: dict) -> None:
    """Registers `up_blocks` on `module` (MONAI's get_up_block loop)."""
    module.up_blocks = nn.ModuleList()
    rc, rb, ra, rh = (list(reversed(v)) for v in (channels, blocks, attention_levels, heads))
    out_c = rc[0]
    for i in range(len(rc)):
        prev_c, out_c = out_c, rc[i]
        in_c = rc[min(i + 1, len(rc) - 1)]
        attention = ("cross" if with_conditioning else "self") if ra[i] else None
        module.up_blocks.append(UpBlock(
            spatial_dims, in_c, prev_c, out_c, temb_channels, rb[i] + 1, norm_num_groups, norm_eps,
            add_upsample=i < len(rc) - 1, resblock_updown=resblock_updown, attention=attention,
            **(dict(num_head_channels=rh[i], **attn_kwargs) if attention else {})))


def index_resnets(module: nn.Module) -> tuple[ResnetBlock, ...]:
    """Number every ResnetBlock of `module` (its `temb_index`) for `time_projections`."""
    resnets = tuple(m for m in module.modules() if isinstance(m, ResnetBlock))
    for i, r in enumerate(resnets):
        r.temb_index = i
    return resnets
