"""Cases for `test_triton_interpreted.py`, run by it in a subprocess with TRITON_INTERPRET=1 set before triton is
imported (the interpreter must be on from the import): our Triton kernels' arithmetic on CPU tensors — the GPU fast
paths of `nets.blocks` and `nets.attention` against plain PyTorch, and a tiny ControlNet + UNet forward through all
of them against the same networks' CPU path. Speed is not measured here: the interpreter runs each program in numpy."""

import os

import pytest
import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_interpreted.py"
pytest.importorskip("triton")

from fastmaisi.nets import blocks  # noqa: E402
from fastmaisi.nets.attention import attention, uses_flash_kernel  # noqa: E402
from fastmaisi.nets.controlnet import ControlNetMaisi  # noqa: E402
from fastmaisi.nets.kernel_device import kernels_run_on  # noqa: E402
from fastmaisi.nets.label_conv import label_conv, label_conv_applies  # noqa: E402
from fastmaisi.nets.thin_conv import applies as thin_conv_applies, thin_conv  # noqa: E402
from fastmaisi.nets.unet import DiffusionModelUNetMaisi  # noqa: E402

CL = torch.channels_last_3d
TRUNK = dict(spatial_dims=3, in_channels=4, num_channels=(8, 16, 16, 32), attention_levels=(False, False, True, True),
             num_head_channels=(0, 0, 8, 8), norm_num_groups=8, num_res_blocks=2, num_class_embeds=8,
             resblock_updown=True, include_fc=True)


@pytest.fixture
def interpreted():
    assert blocks._triton_kernels() is not None and kernels_run_on(torch.empty(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("shape,groups", [((1, 64, 5, 6, 7), 32), ((2, 96, 3, 4, 2), 8)])
@torch.no_grad()
def test_group_norm_kernels(interpreted, dtype, fmt, shape, groups):
    norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-6)
    norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = (torch.randn(shape) * 3 + 5).to(dtype).contiguous(memory_format=fmt)  # offset mean: stresses the merges
    pre = torch.randn(shape[0], shape[1])
    assert blocks.fast_group_norm(x, norm)
    for pre_bias in (None, pre):
        x32 = x.float() if pre_bias is None else x.float() + pre_bias[..., None, None, None]
        truth = F.silu(F.group_norm(x32, groups, norm.weight, norm.bias, 1e-6))
        y = blocks.group_norm(x, norm, silu=True, pre_bias=pre_bias)
        assert y.dtype == dtype and y.stride() == x.stride()
        tol = 2e-3 if dtype == torch.float16 else 2e-5
        assert (y.float() - truth).abs().max() < tol * max(1.0, truth.abs().max().item() / 4)
    n, mean, m2 = blocks.group_moments(x, groups)  # the decode's slab statistics
    ref = x.double().reshape(shape[0], groups, -1)
    torch.testing.assert_close(mean, ref.mean(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2, (ref - ref.mean(2, keepdim=True)).square().sum(2), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_bias_upsample_and_concatenation_passes(interpreted, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 6, 4, 6, 8, generator=g).to(dtype).contiguous(memory_format=CL)
    r = torch.randn(1, 6, 4, 6, 8, generator=g).to(dtype).contiguous(memory_format=CL)
    bias = torch.randn(6, generator=g).to(dtype)
    b = bias.view(1, -1, 1, 1, 1).float()
    one = (lambda t: t.to(dtype).float())  # one rounding of the fp32 value
    assert blocks.fast_bias_add(h)
    torch.testing.assert_close(blocks.add_bias_(h.clone(), bias).float(), one(h.float() + b), rtol=0, atol=0)
    torch.testing.assert_close(blocks.add_bias_(h.clone(), bias, silu=True).float(), one(F.silu(h.float() + b)),
                               rtol=1e-6, atol=1e-3 if dtype == torch.float16 else 1e-6)
    torch.testing.assert_close(blocks.add_bias_residual_(h.clone(), bias, r).float(), one(h.float() + b + r.float()),
                               rtol=0, atol=0)
    coarse = torch.randn(1, 6, 2, 3, 4, generator=g).to(dtype)
    up = F.interpolate(coarse.float(), scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(blocks.add_upsampled_(h.clone(), coarse).float(), one(h.float() + up), rtol=0, atol=0)
    a = torch.randn(1, 3, 4, 6, 8, generator=g).to(dtype).contiguous(memory_format=CL)
    assert torch.equal(blocks.cat_channels(a, h), torch.cat([a, h], 1))
    assert torch.equal(blocks.cat_channels(a, h, r), torch.cat([a, h + r], 1))
    tri = F.interpolate(coarse.float(), scale_factor=2.0, mode="trilinear", align_corners=False)
    torch.testing.assert_close(blocks.upsample_trilinear_x2(coarse).float(), one(tri), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_norm_silu_pool(interpreted):
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = (torch.randn(2, 16, 4, 6, 8) * 3 + 2).half().contiguous(memory_format=CL)
    xp, hp = blocks.norm_silu_pool_x2(x, norm)
    h = F.silu(F.group_norm(x.float(), 4, norm.weight, norm.bias, 1e-6))
    assert blocks._is_channels_last(xp) and hp.stride() == xp.stride()
    torch.testing.assert_close(xp.float(), F.avg_pool3d(x.float(), 2), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(hp.float(), F.avg_pool3d(h, 2), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [128, 80])  # 80: the masked (uneven) path
@torch.no_grad()
def test_flash_attention_kernel(interpreted, n):
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(1, n, 3, 2, 32, generator=g) * 1.5).half()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views of one QKV tensor, as the UNet makes them
    assert uses_flash_kernel(q, 0.0)
    out = attention(q, k, v, 32 ** -0.5)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=32 ** -0.5).transpose(1, 2).flatten(2)
    assert out.dtype == torch.float16 and (out.float() - ref).abs().max() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_label_conv_from_the_uint8_map(interpreted, dtype):
    """conv_in(bits(label)) + bias, SiLU, straight from the ids: against fp64 on the bit-channels, both samples of a
    batch, every face of an odd-sized volume (a tap that leaves the volume adds nothing), ids 0 and 255 included."""
    from fastmaisi.labels import binarize_labels

    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 256, (2, 1, 5, 6, 7), generator=g, dtype=torch.uint8)
    label[0, 0, 0], label[1, 0, :, -1] = 255, 0
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).to(dtype)
    assert label_conv_applies(label, conv)
    y = label_conv(label, conv)
    pre = F.conv3d(binarize_labels(label, dtype=torch.float64), conv.weight.double(), conv.bias.double(), padding=1)
    truth = F.silu(pre)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    assert (y.double() - truth).abs().max() < tol * max(1.0, truth.abs().max().item())
    assert (label_conv(label, conv, silu=False).double() - pre).abs().max() < tol * max(1.0, pre.abs().max().item())
    cnet = ControlNetMaisi(**TRUNK, conditioning_embedding_in_channels=8,
                           conditioning_embedding_num_channels=(8, 16, 16)).eval()
    big = torch.randint(0, 256, (1, 1, 8, 8, 12), generator=g, dtype=torch.uint8)
    want = cnet.double().controlnet_cond_embedding(binarize_labels(big, dtype=torch.float64))
    assert label_conv_applies(big, cnet.float().controlnet_cond_embedding.conv_in.conv)
    got = cnet.embed_labels(big)  # (the rest of the embedding: cuDNN-free convs + our bias/SiLU pass)
    assert got.shape == want.shape == (1, 8, 2, 2, 3)
    assert (got.double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("cin,cout,shape", [(4, 64, (2, 5, 6, 7)), (1, 16, (1, 4, 5, 9)), (5, 32, (1, 3, 8, 4))])
@torch.no_grad()
def test_thin_conv(interpreted, cin, cout, shape):
    """k3 conv (+ bias, + residual, SiLU) in one pass, every face of odd-sized volumes, a batch of two: one fp16
    rounding of the exact value."""
    conv = torch.nn.Conv3d(cin, cout, 3, padding=1).half()
    x = torch.randn(shape[0], cin, *shape[1:]).half().contiguous(memory_format=CL)
    truth = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    r = torch.randn_like(truth).half().contiguous(memory_format=CL)
    assert thin_conv_applies(x, conv, r) and not thin_conv_applies(x, conv, r[:, :, 1:].contiguous(memory_format=CL))
    torch.testing.assert_close(thin_conv(x.contiguous(), conv), thin_conv(x, conv), rtol=0, atol=0)  # NCDHW x too
    for y, want in [(thin_conv(x, conv), truth), (thin_conv(x, conv, r=r, silu=True), F.silu(truth + r.double()))]:
        assert y.shape == want.shape and y.is_contiguous(memory_format=CL)
        ulp = want.abs().clamp_min(2**-14) * 2**-10  # one fp16 rounding of the exact value, with fp32 sums' slack
        assert ((y.double() - want).abs() <= ulp * 0.75 + 1e-4).all()


def test_tiny_controlnet_and_unet_through_the_kernels(monkeypatch):
    """Channels-last fp32 ControlNet + UNet forward through the GroupNorms, bias passes, the fused pool, the skip
    concatenations that add the ControlNet's residuals, the nearest-x2 residual adds: against the same networks in
    fp64 it is at least as close as PyTorch's own fp32 CPU path (at this size some groups hold 2-16 values, where
    fp32 statistics are ill-conditioned: the CPU path is 6e-4 off, the kernels' 1e-6)."""
    import copy

    torch.manual_seed(0)
    unet = DiffusionModelUNetMaisi(**TRUNK, out_channels=4, include_spacing_input=True).eval().to(memory_format=CL)
    cnet = ControlNetMaisi(**TRUNK, conditioning_embedding_in_channels=8,
                           conditioning_embedding_num_channels=(8, 16, 16)).eval().to(memory_format=CL)
    with torch.no_grad():  # non-zero ControlNet outputs (its zero convs start at zero)
        for p in cnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 4, 8, 8, 16).contiguous(memory_format=CL)
    cond = (torch.rand(1, 8, 32, 32, 64) > 0.5).float().contiguous(memory_format=CL)
    t, cls, spacing = torch.tensor([310.0]), torch.tensor([3]), torch.tensor([[75.0, 75.0, 150.0]])

    def forward(u, c, dtype):
        c.clear_condition_cache()
        with torch.no_grad():
            down, mid = c(x.to(dtype), controlnet_cond=cond.to(dtype), timesteps=t, class_labels=cls)
            return u(x.to(dtype), timesteps=t, class_labels=cls, spacing_tensor=spacing.to(dtype),
                     down_block_additional_residuals=down, mid_block_additional_residual=mid).double()

    monkeypatch.delenv("TRITON_INTERPRET")
    truth = forward(copy.deepcopy(unet).double(), copy.deepcopy(cnet).double(), torch.float64)
    plain = forward(unet, cnet, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    for name in ("norm_silu_pool_x2", "cat_channels", "group_norm"):
        fn = getattr(blocks, name)
        monkeypatch.setattr(blocks, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    fast = forward(unet, cnet, torch.float32)
    assert {"norm_silu_pool_x2", "cat_channels", "group_norm"} <= set(calls)
    err = lambda y: float((y - truth).abs().max() / truth.abs().max())  # noqa: E731
    assert err(fast) <= max(2 * err(plain), 1e-5), (err(fast), err(plain))


def test_tiny_adagn_unet_through_the_kernels(monkeypatch):
    """The v2 mask UNet's fused AdaGN pass (GN2 statistics + (1 + scale), shift, SiLU in one normalisation) against
    the same network in fp64, at least as close as PyTorch's own fp32 CPU path."""
    import copy

    from fastmaisi.nets import adagn_unet

    torch.manual_seed(0)
    net = adagn_unet.DiffusionModelUNetMaisiAdaGN(
        spatial_dims=3, in_channels=4, out_channels=4, num_channels=(8, 16, 16, 32),
        attention_levels=(False, False, True, True), num_head_channels=(0, 0, 8, 8), num_res_blocks=1,
        norm_num_groups=8, with_conditioning=True, include_fc=True, cross_attention_dim=19,
        include_spacing_input=True, adagn_context_embed_dim=32).eval().to(memory_format=CL)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 4, 8, 8, 8).contiguous(memory_format=CL)
    t, ctx, spacing = torch.tensor([310.0, 310.0]), torch.rand(2, 1, 19), torch.full((2, 3), 150.0)

    def forward(n, dtype):
        with torch.no_grad():
            return n(x.to(dtype), timesteps=t, context=ctx.to(dtype), spacing_tensor=spacing.to(dtype)).double()

    monkeypatch.delenv("TRITON_INTERPRET")
    truth = forward(copy.deepcopy(net).double(), torch.float64)
    plain = forward(net, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    fn = adagn_unet._group_norm_affine
    monkeypatch.setattr(adagn_unet, "_group_norm_affine", lambda *a, **k: calls.append(1) or fn(*a, **k))
    fast = forward(net, torch.float32)
    assert len(calls) >= 8  # every resnet took the fused path
    err = lambda y: float((y - truth).abs().max() / truth.abs().max())  # noqa: E731
    assert err(fast) <= max(2 * err(plain), 1e-5), (err(fast), err(plain))


@pytest.mark.parametrize("shape", [(13, 11, 9), (5, 17, 3), (1, 40, 2)])
def test_label_pieces_kernel(shape):
    """The 27-voxel neighbour pass of `label_pieces` (Triton) equals its shifted-slice version, and the pieces equal
    scipy's."""
    import numpy as np
    from scipy import ndimage

    from fastmaisi.nets import label_neighbours as ln
    from fastmaisi.pipelines import label_pieces as lp

    assert ln._kernels() is not None
    rng = np.random.default_rng(len(shape) + shape[0])
    key = torch.from_numpy(np.where(rng.random(shape) < 0.6, rng.integers(0, 3, shape), -1).astype(np.int32))
    root = torch.arange(key.numel()).view(shape) * 7 % 101
    fast = ln.same_label_neighbour_min(key, root, key.numel())
    assert torch.equal(fast, ln._neighbour_min_torch(key, root, key.numel()))
    pieces = lp.label_pieces(key).numpy()
    for value in range(3):
        truth, n = ndimage.label(key.numpy() == value, np.ones((3, 3, 3), bool))
        assert len(np.unique(pieces[key.numpy() == value])) == n
        for i in range(1, n + 1):  # every scipy piece is one of ours, named by its first voxel
            assert (pieces[truth == i] == np.flatnonzero(truth.reshape(-1) == i)[0]).all()
