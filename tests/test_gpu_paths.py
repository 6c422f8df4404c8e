"""CUDA-only fast paths, checked against plain PyTorch on the GPU (skipped on CPU-only machines, so CI runs only the
CPU fallbacks; the GPU runs of `bench/` run this file): the decode's slab statistics and normalisation kernels,
CUDA-graph replay of a denoiser, the attention kernel, and the bias / upsampled-residual / concatenation passes."""

import pytest
import torch

from fastmaisi.nets.blocks import group_moments, scale_shift

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layouts(x):
    return [x, x.contiguous(memory_format=torch.channels_last_3d)]


def test_cpu_fallbacks_match_definitions():
    """On CPU: group_moments is (count, mean, sum of squared deviations) per group; scale_shift is x*s+b (+SiLU)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 4, 5, generator=g) * 2 + 1
    n, mean, m2 = group_moments(x, 4)
    grouped = x.double().reshape(2, 4, -1)
    assert n == grouped.shape[2]
    torch.testing.assert_close(mean, grouped.mean(2))
    torch.testing.assert_close(m2, (grouped - grouped.mean(2, keepdim=True)).square().sum(2))
    scale, shift = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    y = scale_shift(x.half(), scale, shift, silu=True)
    truth = torch.nn.functional.silu(x.half().float() * scale[..., None, None, None] + shift[..., None, None, None])
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), truth.half().float())


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", [((1, 64, 13, 40, 48), 32), ((2, 128, 6, 17, 9), 32), ((1, 8, 1, 1, 1), 4)])
def test_gpu_group_moments_and_scale_shift(dtype, shape, groups):
    x = (torch.randn(shape, device="cuda") * 3 + 5).to(dtype)  # offset mean: stresses the merge
    B, C = shape[:2]
    ref = x.double().reshape(B, groups, -1)
    scale, shift = torch.randn(B, C, device="cuda"), torch.randn(B, C, device="cuda")
    truth = torch.nn.functional.silu(x.float() * scale[..., None, None, None] + shift[..., None, None, None])
    for xs in _layouts(x):
        n, mean, m2 = group_moments(xs, groups)
        assert n == ref.shape[2]
        torch.testing.assert_close(mean, ref.mean(2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m2, (ref - ref.mean(2, keepdim=True)).square().sum(2), rtol=1e-5, atol=1e-3)
        y = scale_shift(xs, scale, shift, silu=True)
        assert y.dtype == dtype and y.stride() == xs.stride()
        tol = 1e-6 if dtype == torch.float32 else 1e-3  # fp32 FMA vs torch's mul + add: an ulp at most
        torch.testing.assert_close(y.float(), truth.to(dtype).float(), rtol=tol, atol=tol)


@cuda
def test_gpu_cuda_graph_replay_equals_eager():
    """CudaGraphed: first call eager, later calls replay; outputs equal eager calls on new inputs, bit for bit, and
    a returned output is not overwritten by the next call."""
    from fastmaisi.nets.graphs import CudaGraphed
    from fastmaisi.nets.unet import DiffusionModelUNet

    torch.manual_seed(0)
    net = DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, channels=[16, 32, 32, 32],
                             attention_levels=[False, False, True, True], num_head_channels=[0, 0, 8, 8],
                             num_res_blocks=1, norm_num_groups=8, with_conditioning=True, cross_attention_dim=10,
                             upcast_attention=True).cuda().half().eval()
    ctx = torch.rand(1, 1, 10, device="cuda").half()

    def denoise(x, t):
        return net(x=x, timesteps=t, context=ctx)

    graphed = CudaGraphed(denoise)
    outs = []
    with torch.no_grad():
        for i in range(4):
            x = torch.randn(1, 4, 16, 16, 16, device="cuda").half()
            t = torch.tensor([100.0 * i + 3], device="cuda")
            outs.append((graphed(x, t), denoise(x, t)))
    assert graphed.graph is not None and not graphed.eager
    for got, want in outs:
        assert torch.equal(got, want)


def test_cpu_upsample_taps_are_the_table_and_need_no_host_copy():
    """The transposed-conv taps are made by arithmetic on the weight's device (recomputed inside a CUDA graph capture,
    where a host-to-device copy fails) and equal the documented table; the upsample conv still equals conv(nearest)."""
    from fastmaisi.nets import fused_ops

    assert fused_ops._up_taps(torch.device("cpu")).tolist() == [list(map(float, r)) for r in fused_ops._UP_TAPS]
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 5, 3, padding=1)
    x = torch.randn(1, 3, 4, 5, 6)
    want = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.no_grad():
        got = fused_ops.upsample_conv(x, conv, conv.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_cpu_upsample_rows_are_a_slice_of_the_whole():
    from fastmaisi.nets.blocks import upsample_trilinear_x2

    x = torch.randn(2, 3, 5, 4, 6)
    whole = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)
    assert torch.equal(upsample_trilinear_x2(x), whole)
    assert torch.equal(upsample_trilinear_x2(x, (3, 8)), whole[:, :, 3:8])


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,rows", [((1, 64, 7, 9, 11), None), ((2, 128, 6, 5, 8), (3, 10)),
                                        ((1, 3, 1, 1, 1), None), ((1, 256, 4, 16, 16), (0, 1))])
def test_gpu_upsample_trilinear_x2_equals_interpolate(dtype, shape, rows):
    from fastmaisi.nets.blocks import upsample_trilinear_x2

    x = torch.randn(shape, device="cuda").to(dtype)
    for xs in _layouts(x):
        truth = torch.nn.functional.interpolate(xs.float(), scale_factor=2.0, mode="trilinear", align_corners=False)
        if rows is not None:
            truth = truth[:, :, rows[0]:rows[1]]
        y = upsample_trilinear_x2(xs, rows)
        assert y.dtype == dtype and y.shape == truth.shape
        from fastmaisi.nets.blocks import _is_channels_last

        assert _is_channels_last(y) == _is_channels_last(xs)  # the input's layout
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(y.float(), truth.to(dtype).float(), rtol=tol, atol=tol)


def _small_vae_latent_and_decode():
    """A small fp16 VAE on CUDA (32/64/64 channels), a 32^3 latent, and the network's own whole-volume decode of it:
    ~4.6 GiB un-tiled, so a 512 MiB budget tiles with host stores."""
    from fastmaisi.nets.autoencoder import AutoencoderKlMaisi

    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                             num_channels=(32, 64, 64), num_res_blocks=(2, 2, 2), norm_num_groups=32,
                             attention_levels=(False, False, False)).cuda().half().eval()
    z = torch.randn(1, 4, 32, 32, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = vae.decode(z)
    return vae, z, ref


@cuda
def test_gpu_budget_is_respected():
    """A budgeted decode stays under its budget (peak allocated above what was allocated before) and is exact; the
    same decode again allocates nothing new on the device (its copy streams are reused, so are their cached blocks)."""
    from fastmaisi.decode import decode_latent

    vae, z, ref = _small_vae_latent_and_decode()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    budget = 512 << 20  # the whole-volume decode needs ~4.6 GiB: the plan tiles, with host stores
    y, plan = decode_latent(vae, z, budget, return_plan=True)
    torch.cuda.synchronize()
    assert plan.tiled and torch.cuda.max_memory_allocated() - base <= budget
    assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 5e-3
    del y
    decode_latent(vae, z, budget)  # again: from here on every block the decode needs is cached
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    y2 = decode_latent(vae, z, budget)
    torch.cuda.synchronize()  # no new device allocations, so the reserved memory does not grow call after call
    assert torch.cuda.memory_stats()["num_device_alloc"] == before["num_device_alloc"]
    assert torch.cuda.memory_reserved() == before["reserved_bytes.all.current"]
    assert float((y2.float() - ref.float()).abs().max() / ref.float().abs().max()) < 5e-3


@cuda
def test_gpu_host_rows_cross_the_bus_once_per_pass(monkeypatch):
    """A pass reads each host row over PCIe at most once: the next slab's halo rows, already fetched for the previous
    slab, are copied on the device (`_Copier.fetch`); the result stays exact."""
    import fastmaisi.decode as D

    vae, z, ref = _small_vae_latent_and_decode()
    reads, passes = [], [0]
    host_rows, new_pass = D._Store.host_rows, D._Copier.new_pass

    def logged_rows(self, lo, hi):
        reads.append((passes[0], id(self), lo, hi))
        return host_rows(self, lo, hi)

    def logged_pass(self):
        passes[0] += 1
        return new_pass(self)

    monkeypatch.setattr(D._Store, "host_rows", logged_rows)
    monkeypatch.setattr(D._Copier, "new_pass", logged_pass)
    y, plan = D.decode_latent(vae, z, 512 << 20, return_plan=True)
    assert plan.tiled and D.HOST in plan._place
    by_store: dict = {}
    for p, st, lo, hi in reads:
        by_store.setdefault((p, st), []).append((lo, hi))
    assert any(len(v) >= 4 for v in by_store.values())  # passes that read host stores slab by slab
    for spans in by_store.values():
        spans.sort()
        assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:])), spans  # no row fetched twice in a pass
    assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 5e-3


@pytest.mark.parametrize("shape", [(2, 6, 8, 10, 12), (1, 4, 7, 6, 6)])
def test_cpu_avg_pool_x2_keeps_channels_last_and_equals_avg_pool3d(shape):
    """The downsampling resnets' pool on channels-last input: avg_pool3d's values (odd sizes: its own floor), and
    the output stays channels-last (CUDA's avg_pool3d would copy to NCDHW and back)."""
    import torch.nn.functional as F

    from fastmaisi.nets.blocks import _is_channels_last, avg_pool_x2

    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    y = avg_pool_x2(x)
    assert _is_channels_last(y)
    torch.testing.assert_close(y, F.avg_pool3d(x.contiguous(), 2, 2), rtol=1e-6, atol=1e-6)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_gpu_add_bias_residual_is_one_rounding_of_the_sum(dtype, fmt):
    """The resnets' fused tail h + bias + r (one Triton pass) equals the fp32 sum rounded once, in either layout."""
    from fastmaisi.nets.blocks import add_bias_residual_

    torch.manual_seed(0)
    h = torch.randn(2, 24, 5, 6, 7, device="cuda").to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(2, 24, 5, 6, 7, device="cuda").to(dtype).contiguous(memory_format=fmt)
    bias = torch.randn(24, device="cuda").to(dtype)
    want = (h.float() + bias.float().view(-1, 1, 1, 1) + r.float()).to(dtype)
    got = add_bias_residual_(h.clone(memory_format=torch.preserve_format), bias, r)
    assert got.stride() == h.stride()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-3)


@cuda
def test_gpu_from_mask_demo_matches_cpu():
    """The from-mask workflow on CUDA as `generate` loads it (image DM and ControlNet channels-last, fused resnet
    tails, the condition's embedding computed once) gives the CPU run's image: same seed, same label map, fp32."""
    import numpy as np

    from fastmaisi import demo
    from fastmaisi.nets.blocks import _is_channels_last
    from fastmaisi.phantom import make_phantom

    if not all((demo.DEMO_WEIGHTS_DIR / f"{s}.safetensors").is_file() for s in demo.DEMO_FILES.values()):
        pytest.skip("demo weights not built")
    roles = ("autoencoder", "diffusion_unet", "controlnet")
    _, label = make_phantom(demo.DEMO_SIZE, demo.DEMO_SPACING, seed=1001, tumour="liver")
    images = {}
    for device in ("cpu", "cuda"):
        models = demo.load_demo_models(roles, device=device)
        w = models.diffusion_unet.conv_in.conv.weight
        assert _is_channels_last(w) == (device == "cuda")
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            images[device] = demo.volume_from_mask(models, label, seed=0)
    diff = np.abs(images["cuda"] - images["cpu"])
    assert float(diff.mean()) < 2.0 and float(np.percentile(diff, 99.9)) < 40.0, (diff.mean(), diff.max())


def test_cpu_attention_is_sdpa_in_token_layout():
    """Off CUDA, `attention` is SDPA with heads merged into (B, N, heads*d)."""
    from fastmaisi.nets.attention import attention, uses_flash_kernel

    g = torch.Generator().manual_seed(0)
    for keys in (10, 4):  # self-attention, and cross-attention to a shorter sequence
        q = torch.randn(2, 3, 10, 8, generator=g)
        k, v = (torch.randn(2, 3, keys, 8, generator=g) for _ in range(2))
        assert not uses_flash_kernel(q, 0.0)
        weights = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)
        torch.testing.assert_close(attention(q, k, v, 0.3), (weights @ v).transpose(1, 2).reshape(2, 10, 24))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,d", [(1, 8, 4096, 32), (2, 3, 1000, 32), (1, 2, 777, 64), (1, 4, 129, 16),
                                     (1, 2, 20000, 32)])
def test_gpu_flash_attention_equals_fp32_reference(dtype, B, H, N, d):
    """Our Triton kernel on q/k/v views of one fused QKV tensor (as SelfAttention makes them): error against fp32 SDPA
    no larger than PyTorch's own half-precision SDPA (plus a little slack) and within one half-precision step."""
    from fastmaisi.nets.attention import attention, uses_flash_kernel

    torch.manual_seed(0)
    qkv = (torch.randn(B, N, 3, H, d, device="cuda") * 1.5).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert uses_flash_kernel(q, 0.0)
    scale = d ** -0.5
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        ref = ref.transpose(1, 2).flatten(2)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).flatten(2)
        ours = attention(q, k, v, scale)
    assert ours.shape == (B, N, H * d) and ours.dtype == dtype and ours.is_contiguous()
    err, err_sdpa = (ours.float() - ref).abs().max().item(), (theirs.float() - ref).abs().max().item()
    assert err <= 1.5 * err_sdpa + 1e-4, (err, err_sdpa)
    assert err < (2e-3 if dtype == torch.float16 else 1.6e-2)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_bias_and_upsampled_adds_equal_torch(dtype):
    """`add_bias_` and `add_upsampled_` (Triton on channels-last CUDA tensors) equal PyTorch's broadcast adds bit for
    bit (both compute in fp32 and round once)."""
    from fastmaisi.nets.blocks import add_bias_, add_upsampled_

    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    h = torch.randn(2, 24, 6, 10, 8, device="cuda").to(dtype).contiguous(memory_format=fmt)
    bias = torch.randn(24, device="cuda").to(dtype)
    truth = h + bias[:, None, None, None]
    assert torch.equal(add_bias_(h.clone(memory_format=fmt), bias), truth)
    # with SiLU (the ControlNet embedding's convs): one rounding of silu(h + bias), torch's rounds twice
    fused = add_bias_(h.clone(memory_format=fmt), bias, silu=True)
    exact = torch.nn.functional.silu(h.double() + bias.double()[:, None, None, None])
    twice = (torch.nn.functional.silu(truth).double() - exact).abs().max()
    assert (fused.double() - exact).abs().max() <= twice + (2e-6 if dtype == torch.float32 else 0.0)  # (fast exp)
    for x in (torch.randn(2, 24, 3, 5, 4, device="cuda").to(dtype),
              torch.randn(2, 24, 3, 5, 4, device="cuda").to(dtype).contiguous(memory_format=fmt)):
        up = torch.nn.functional.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(dtype)
        out = add_upsampled_(h.clone(memory_format=fmt), x)
        assert out.is_contiguous(memory_format=fmt)
        assert torch.equal(out, h + up)


@cuda
def test_gpu_cat_channels_equals_torch_cat():
    from fastmaisi.nets.blocks import cat_channels

    fmt = torch.channels_last_3d
    a = torch.randn(2, 5, 3, 4, 6, device="cuda").half().contiguous(memory_format=fmt)
    b = torch.randn(2, 7, 3, 4, 6, device="cuda").half().contiguous(memory_format=fmt)
    y = cat_channels(a, b)
    assert y.is_contiguous(memory_format=fmt) and torch.equal(y, torch.cat([a, b], 1))
    assert torch.equal(cat_channels(a.contiguous(), b), torch.cat([a, b], 1))  # NCDHW a: torch.cat
    r = torch.randn(2, 7, 3, 4, 6, device="cuda").half().contiguous(memory_format=fmt)
    y = cat_channels(a, b, r)  # the skip's residual added on the way: the same rounding as b + r
    assert y.is_contiguous(memory_format=fmt) and torch.equal(y, torch.cat([a, b + r], 1))
    assert torch.equal(cat_channels(a, b, r.contiguous()), torch.cat([a, b + r], 1))  # NCDHW r: torch path


@cuda
@pytest.mark.parametrize("shape", [(1, 64, 8, 10, 12), (2, 96, 4, 6, 2), (1, 8, 2, 2, 2)])
def test_gpu_norm_silu_pool_is_pool_of_group_norm(shape):
    from fastmaisi.nets.blocks import norm_silu_pool_x2

    norm = torch.nn.GroupNorm(8, shape[1], eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = (torch.randn(shape, device="cuda") * 3 + 2).half().contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        xp, hp = norm_silu_pool_x2(x, norm)
        h = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 8, norm.weight, norm.bias, 1e-6))
    assert xp.is_contiguous(memory_format=torch.channels_last_3d) and hp.stride() == xp.stride()
    torch.testing.assert_close(xp, torch.nn.functional.avg_pool3d(x.float(), 2).half(), rtol=1e-3, atol=1e-4)
    # one rounding of the pooled fp32 value (the unfused path rounds h first): within one fp16 ulp
    torch.testing.assert_close(hp.float(), torch.nn.functional.avg_pool3d(h, 2), rtol=1e-3, atol=1e-3)
    assert norm_silu_pool_x2(x.contiguous(), norm) is None and norm_silu_pool_x2(x[:, :, :3], norm) is None


@cuda
def test_gpu_controlnet_input_conv_plus_embedding_matches_two_adds():
    """`conv_add_` (the ControlNet's conv_in + condition embedding) on CUDA, bias and embedding added in one fp32 pass,
    is as close to the exact sum as MONAI's conv-with-bias then `+=`."""
    from fastmaisi.nets.blocks import Conv, conv_add_

    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    conv = Conv(3, 4, 16, 3, 1, 1).cuda().half().to(memory_format=fmt)
    x = torch.randn(1, 4, 6, 8, 10, device="cuda").half().contiguous(memory_format=fmt)
    r = torch.randn(1, 16, 6, 8, 10, device="cuda").half().contiguous(memory_format=fmt)
    with torch.no_grad():
        out = conv_add_(conv, x, r)
        exact = torch.nn.functional.conv3d(x.double(), conv.conv.weight.double(), conv.conv.bias.double(), padding=1)
        exact = exact + r.double()
        twice = conv(x).add_(r)
    assert out.is_contiguous(memory_format=fmt)
    assert (out.double() - exact).abs().max() <= 1.5 * (twice.double() - exact).abs().max() + 1e-3


@cuda
@pytest.mark.parametrize("cin,cout", [(4, 64), (1, 16), (5, 32)])
def test_gpu_thin_conv_is_as_close_as_cudnn(cin, cout):
    """`thin_conv` (bias and a residual fused, one rounding) against fp64: no farther than cuDNN's conv + bias + add,
    on an odd-sized batch of two."""
    from fastmaisi.nets.blocks import add_bias_residual_
    from fastmaisi.nets.thin_conv import applies, thin_conv

    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    conv = torch.nn.Conv3d(cin, cout, 3, padding=1).cuda().half()
    x = torch.randn(2, cin, 19, 34, 23, device="cuda").half().contiguous(memory_format=fmt)
    with torch.no_grad():
        exact = torch.nn.functional.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        r = torch.randn_like(exact).half().contiguous(memory_format=fmt)
        assert applies(x, conv, r)
        ours = thin_conv(x, conv, r=r)
        cudnn = add_bias_residual_(torch.nn.functional.conv3d(x, conv.weight, None, padding=1), conv.bias, r)
    exact = exact + r.double()
    assert ours.shape == exact.shape and ours.is_contiguous(memory_format=fmt)
    err = lambda y: float((y.double() - exact).abs().max())  # noqa: E731
    assert err(ours) <= 1.2 * err(cudnn) + 1e-3, (err(ours), err(cudnn))


@cuda
def test_gpu_embed_labels_is_at_least_as_close_as_the_bit_channel_path():
    """`embed_labels` (conv_in by table lookups from the uint8 map, bias + SiLU fused, one rounding) against fp64 on
    the bit-channels, for a batch of two odd-sized maps: no farther than cuDNN's path on the fp16 bit-channels."""
    from fastmaisi.labels import binarize_labels
    from fastmaisi.nets.controlnet import ControlNetMaisi

    torch.manual_seed(0)
    cnet = ControlNetMaisi(spatial_dims=3, in_channels=4, num_channels=(32, 64, 64, 64), num_res_blocks=1,
                           num_head_channels=(0, 0, 8, 8), conditioning_embedding_in_channels=8,
                           conditioning_embedding_num_channels=(8, 32, 64)).eval()
    with torch.no_grad():  # (its conv_out starts at zero, like MONAI's)
        cnet.controlnet_cond_embedding.conv_out.conv.weight.normal_(0, 0.02)
    label = torch.randint(0, 256, (2, 1, 36, 44, 20), dtype=torch.uint8, device="cuda")
    label[:, :, 10:30, 5:40, 3:17] = 200  # a body-like block as well as noise
    with torch.no_grad():
        truth = cnet.double().cuda().controlnet_cond_embedding(binarize_labels(label, dtype=torch.float64))
        half = cnet.half().to(memory_format=torch.channels_last_3d)
        got = half.embed_labels(label)
        bits = half.embed_condition(binarize_labels(label, dtype=torch.float16, channels_last=True))
    assert got.shape == truth.shape == (2, 32, 9, 11, 5), got.shape
    assert got.is_contiguous(memory_format=torch.channels_last_3d), got.stride()
    err = lambda y: float((y.double() - truth).abs().max() / truth.abs().max())  # noqa: E731
    assert err(got) <= 1.5 * err(bits) + 1e-4, (err(got), err(bits))


@pytest.mark.parametrize("shape", [(1, 64, 128, 128, 128), (2, 192, 16, 16, 16), (1, 384, 6, 8, 10), (1, 4, 3, 3, 3),
                                   (1, 64, 32, 512, 512)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_statistics_tiles_cover_every_voxel_once(shape, channels_last):
    """The launch arithmetic of the GroupNorm statistics kernels (run on CPU with a recording stand-in for Triton):
    channels-last tensors take `stats_cl`, others the two-pass `stats`; T tiles of `span` voxels cover S exactly."""
    import math

    from fastmaisi.nets import blocks

    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((self.name, grid, args, kw))

    k = {"stats": Recorder("stats"), "stats_cl": Recorder("stats_cl"), "cdiv": lambda a, b: -(-a // b),
         "next_pow2": lambda n: 1 << (n - 1).bit_length()}
    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    mean, m2, T, span, S = blocks._stats_tiles(x, k)
    (name, grid, args, kw), = launched
    B, C = shape[:2]
    assert name == ("stats_cl" if channels_last and C > 1 else "stats")
    assert S == math.prod(shape[2:]) and (T - 1) * span < S <= T * span
    assert grid[0] == T and grid[2] == B and grid[1] * kw["BLOCK_C"] >= C and mean.shape == m2.shape == (B, T, C)
    assert span == kw["BLOCK_S"] * args[-1]  # tiles of BLOCK_S voxels, ITERS of them a program


@cuda
@pytest.mark.parametrize("target", [None, 23, 26, 128])
def test_mask_clean_up_on_the_gpu_equals_the_host_path(target):
    """The GPU mask clean-up (Triton neighbour pass, union-find, the largest-piece rule) gives the host's voxels."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from test_mask_postprocess_exact import SIZES, _noisy_map

    from fastmaisi.pipelines.mask_postprocess import postprocess_mask
    from fastmaisi.pipelines.mask_postprocess_torch import postprocess_mask_tensor

    for seed in range(3):
        label = _noisy_map(seed, shape=(70, 64, 58))
        on_gpu = postprocess_mask_tensor(torch.from_numpy(label).cuda(), SIZES[target])
        assert on_gpu.is_cuda and np.array_equal(on_gpu.cpu().numpy(), postprocess_mask(label, SIZES[target]))
