"""DiffusionModelUNetMaisi / DiffusionModelUNet: MONAI's keys, outputs equal to MONAI's (random weights, fp32 CPU)."""

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from fastmaisi.nets.blocks import CrossAttention, group_norm
from fastmaisi.nets.unet import DiffusionModelUNet, DiffusionModelUNetMaisi
from fastmaisi.variants import MASK_DIFFUSION_DEF, diffusion_unet_def

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "keys"
# (tensors, params, sha256[:16] of the "key<TAB>shape" lines) of MONAI's state_dicts: our own digest of the
# reference dumps, so CI checks exact keys/shapes/order without shared/.
DIGESTS = {"unet_nobody": (435, 180_500_868, "a967aa8f4d2e57d0"), "unet_body": (443, 184_305_028, "f82e261ac04852cb"),
           "mask_unet": (558, 197_163_012, "b45cc2ff8a42946c"), "controlnet": (231, 72_037_072, "19647ed9523fbbc1")}
TOL = 1e-5  # max |ours - MONAI| / max |MONAI|

monai_unet = pytest.importorskip("monai.networks.nets.diffusion_model_unet")
monai_maisi = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")


def kwargs(definition: dict) -> dict:
    return {k: v for k, v in definition.items() if not k.startswith("_")}


def check_keys(net: torch.nn.Module, name: str) -> None:
    """state_dict keys, shapes and order equal MONAI's dump (shared/ when present, else our digest of it)."""
    lines = [f"{k}\t{tuple(v.shape)}" for k, v in net.state_dict().items()]
    tsv = KEYS / f"{name}.tsv"
    if tsv.exists():
        assert lines == tsv.read_text().splitlines()
    count, params, digest = DIGESTS[name]
    assert len(lines) == count
    assert sum(v.numel() for v in net.state_dict().values()) == params
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16] == digest


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (MONAI zero-initialises some convs, which would hide bugs); norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            is_norm_scale = name.endswith("weight") and p.ndim == 1 and ("norm" in name or name == "out.0.weight")
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if is_norm_scale else 0.05 * torch.randn(p.shape,
                                                                                                          generator=g))
    return net.eval()


def pair(monai_cls, our_cls, cfg: dict, seed: int = 0):
    """MONAI net with random weights, and ours built from the same kwargs with its state_dict loaded strictly."""
    ref = randomize(monai_cls(**cfg), seed)
    ours = our_cls(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


TRUNK = dict(spatial_dims=3, in_channels=4, out_channels=4, num_channels=(8, 16, 16, 32),
             attention_levels=(False, False, True, True), num_head_channels=(0, 0, 8, 8), norm_num_groups=8)
RFLOW = TRUNK | dict(num_res_blocks=2, include_spacing_input=True, num_class_embeds=8, resblock_updown=True,
                     include_fc=True)
DDPM = TRUNK | dict(num_res_blocks=1, include_spacing_input=True, include_top_region_index_input=True,
                    include_bottom_region_index_input=True)
MASK = dict(spatial_dims=3, in_channels=4, out_channels=4, channels=(16, 16, 32, 32),
            attention_levels=(False, False, True, True), num_head_channels=(0, 0, 8, 8), num_res_blocks=2,
            norm_num_groups=8, with_conditioning=True, upcast_attention=True, cross_attention_dim=10)
SHAPE = (2, 4, 8, 16, 24)  # batch 2, sizes multiples of 8 but not a cube


@pytest.fixture(scope="module")
def rflow_pair():
    return pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, RFLOW)


@pytest.fixture(scope="module")
def mask_pair():
    return pair(monai_unet.DiffusionModelUNet, DiffusionModelUNet, MASK)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(SHAPE, generator=g), timesteps=torch.tensor([10.5, 731.25]),
                class_labels=torch.tensor([1, 5]), spacing_tensor=100 * torch.rand(2, 3, generator=g) + 50,
                top_region_index_tensor=100 * torch.rand(2, 4, generator=g),
                bottom_region_index_tensor=100 * torch.rand(2, 4, generator=g))


# --------------------------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("name,cls,cfg", [
    ("unet_nobody", DiffusionModelUNetMaisi, kwargs(diffusion_unet_def(False))),
    ("unet_body", DiffusionModelUNetMaisi, kwargs(diffusion_unet_def(False)) | dict(
        include_top_region_index_input=True, include_bottom_region_index_input=True)),
    ("mask_unet", DiffusionModelUNet, kwargs(MASK_DIFFUSION_DEF)),
])
def test_full_size_state_dict_keys(name, cls, cfg):
    with torch.device("meta"):
        net = cls(**cfg)  # use_flash_attention=True builds without CUDA (MONAI's Maisi UNet raises)
    check_keys(net, name)


def test_ddpm_config_builds_without_fc_and_updown():
    with torch.device("meta"):
        net = DiffusionModelUNetMaisi(**kwargs(diffusion_unet_def(True)))
    keys = net.state_dict().keys()
    assert not any("out_proj" in k for k in keys)
    assert "down_blocks.0.downsampler.op.conv.weight" in keys and "up_blocks.0.upsampler.postconv.conv.weight" in keys
    assert net.state_dict()["down_blocks.0.resnets.0.time_emb_proj.weight"].shape == (64, 1024)


# ------------------------------------------------------------------------------------------------------------- parity
def test_rflow_style_matches_monai(rflow_pair):
    ref, ours = rflow_pair
    inp = inputs()
    keys = ("x", "timesteps", "class_labels", "spacing_tensor")
    with torch.no_grad():
        a = ref(**{k: inp[k] for k in keys})
        b = ours(**{k: inp[k] for k in keys})
    assert b.shape == SHAPE and rel(b, a) < TOL


def test_ddpm_style_matches_monai():
    ref, ours = pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, DDPM)
    inp = inputs()
    inp.pop("class_labels")
    with torch.no_grad():
        assert rel(ours(**inp), ref(**inp)) < TOL


@pytest.mark.parametrize("extra", [dict(use_combined_linear=True), dict(spatial_dims=2)])
def test_variants_match_monai(extra):
    cfg = RFLOW | extra
    ref, ours = pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, cfg)
    inp = inputs()
    x = inp["x"][..., 0] if cfg["spatial_dims"] == 2 else inp["x"]
    kw = dict(timesteps=torch.tensor([3, 999]), class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"])
    with torch.no_grad():
        assert rel(ours(x, **kw), ref(x, **kw)) < TOL  # integer timesteps too


def test_channels_last_input_matches_monai(rflow_pair):
    ref, ours = rflow_pair
    ours = copy.deepcopy(ours)
    inp = inputs()
    kw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"])
    with torch.no_grad():
        a = ref(inp["x"], **kw)
        b = ours.to(memory_format=torch.channels_last_3d)(inp["x"].contiguous(memory_format=torch.channels_last_3d),
                                                          **kw)
    assert rel(b, a) < TOL
    check = DiffusionModelUNetMaisi(**RFLOW)
    check.load_state_dict(ours.state_dict(), strict=True)  # layout changes nothing in the state_dict


def _residuals(x: torch.Tensor, net: torch.nn.Module, seed: int = 2):
    """Random ControlNet-like residuals with the skip shapes of `net` (batch and size of x)."""
    g = torch.Generator().manual_seed(seed)
    shapes, size = [], list(x.shape[2:])
    levels = len(net.block_out_channels)
    for i, c in enumerate(net.block_out_channels):
        if i == 0:
            shapes.append((c, *size))
        shapes += [(c, *size)] * net.num_res_blocks[i]
        if i < levels - 1:
            size = [s // 2 for s in size]
            shapes.append((c, *size))
    down = [torch.randn(x.shape[0], *s, generator=g) for s in shapes]
    mid = torch.randn(x.shape[0], net.block_out_channels[-1], *size, generator=g)
    return down, mid


def test_controlnet_residuals_inplace_quirk_matches_monai(rflow_pair):
    ref, ours = rflow_pair
    inp = inputs()
    kw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"])
    down, mid = _residuals(inp["x"], ours)
    with torch.no_grad():
        a = ref(inp["x"], **kw, down_block_additional_residuals=[d.clone() for d in down],
                mid_block_additional_residual=mid.clone())
        b = ours(inp["x"], **kw, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        # without the leak (the middle block seeing h, not h + down[-1]) the output is different
        no_leak = ours(inp["x"], **kw, down_block_additional_residuals=down[:-1] + [torch.zeros_like(down[-1])],
                       mid_block_additional_residual=mid)
    assert rel(b, a) < TOL
    assert rel(no_leak, a) > 1e-3
    assert down[0].abs().sum() > 0 and torch.equal(mid, _residuals(inp["x"], ours)[1])  # inputs left untouched


def test_base_unet_residuals_out_of_place_matches_monai(mask_pair):
    ref, ours = mask_pair
    inp = inputs()
    ctx = torch.randn(2, 1, 10)
    down, mid = _residuals(inp["x"], ours)
    with torch.no_grad():
        a = ref(inp["x"], inp["timesteps"], context=ctx, down_block_additional_residuals=down,
                mid_block_additional_residual=mid)
        b = ours(inp["x"], inp["timesteps"], context=ctx, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
    assert rel(b, a) < TOL


@pytest.mark.parametrize("context_len", [1, 3])
def test_mask_unet_matches_monai(mask_pair, context_len):
    ref, ours = mask_pair
    inp = inputs()
    ctx = torch.randn(2, context_len, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(ours(inp["x"], inp["timesteps"], context=ctx), ref(inp["x"], inp["timesteps"], context=ctx)) < TOL


def test_single_key_shortcut_equals_real_attention(mask_pair, monkeypatch):
    _, ours = mask_pair
    inp = inputs()
    ctx = torch.randn(2, 1, 10)
    calls = []
    real_context_only = CrossAttention.context_only
    monkeypatch.setattr(CrossAttention, "context_only", lambda self, c: calls.append(1) or real_context_only(self, c))
    with torch.no_grad():
        fast = ours(inp["x"], inp["timesteps"], context=ctx)
        assert len(calls) == 11  # every transformer block took the shortcut: 4 down, 1 middle, 6 up
        monkeypatch.setattr(CrossAttention, "single_key", lambda self, c: False)
        slow = ours(inp["x"], inp["timesteps"], context=ctx)
    assert len(calls) == 11 and rel(fast, slow) < TOL


# ------------------------------------------------------------------------------------------------ training, errors
def test_gradients_match_monai():
    cfg = MASK | dict(num_res_blocks=1)
    ref, ours = pair(monai_unet.DiffusionModelUNet, DiffusionModelUNet, cfg)
    ref.train(), ours.train()
    inp = inputs()
    ctx = torch.randn(2, 1, 10)
    for net in (ref, ours):
        net(inp["x"], inp["timesteps"], context=ctx).square().mean().backward()
    grads = dict(ref.named_parameters())
    worst = max(rel(p.grad, grads[n].grad) for n, p in ours.named_parameters() if grads[n].grad.abs().max() > 0)
    assert worst < 1e-4


def test_maisi_unet_backward_with_residuals(rflow_pair):
    ours = copy.deepcopy(rflow_pair[1]).train()
    inp = inputs()
    down, mid = _residuals(inp["x"], ours)
    down = [d.requires_grad_() for d in down]
    out = ours(inp["x"], inp["timesteps"], class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"],
               down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out.square().mean().backward()  # no in-place autograd error when the UNet itself is trained
    assert all(d.grad is not None for d in down) and ours.conv_in.conv.weight.grad is not None


@pytest.mark.parametrize("bad,match", [
    (dict(num_head_channels=(0, 0, 0, 8)), "num_head_channels"),
    (dict(num_head_channels=(0, 0, 8, 0)), "num_head_channels"),
    (dict(norm_num_groups=5), "norm_num_groups"),
    (dict(attention_levels=(False, True)), "attention_levels"),
    (dict(num_res_blocks=(1, 2)), "num_res_blocks"),
    (dict(with_conditioning=True), "cross_attention_dim"),
    (dict(cross_attention_dim=10), "with_conditioning"),
    (dict(dropout_cattn=1.5), "dropout_cattn"),
    (dict(spatial_dims=4), "spatial_dims"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        DiffusionModelUNetMaisi(**(RFLOW | bad))


def test_missing_inputs_raise():
    net = DiffusionModelUNetMaisi(**RFLOW)
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, spacing_tensor=torch.ones(1, 3))
    with pytest.raises(ValueError, match="spacing_tensor"):
        net(x, t, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="with_conditioning"):
        net(x, t, class_labels=torch.tensor([1]), spacing_tensor=torch.ones(1, 3), context=torch.ones(1, 1, 4))


# ------------------------------------------------------------------------------------------------------------ GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("mode", ["autocast", "half", "half_channels_last"])
def test_gpu_half_precision_close_to_fp32(mode):
    _, ours = pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, RFLOW | dict(use_flash_attention=True))
    ours = ours.cuda()
    inp = {k: v.cuda() for k, v in inputs().items()}
    kw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"])
    down, mid = _residuals(inp["x"], ours)
    down, mid = [d.cuda() for d in down], mid.cuda()
    with torch.no_grad():
        truth = ours(inp["x"], **kw, down_block_additional_residuals=[d.clone() for d in down],
                     mid_block_additional_residual=mid.clone())
        x16, down16, mid16 = inp["x"].half(), [d.half() for d in down], mid.half()
        if mode == "autocast":
            with torch.autocast("cuda", dtype=torch.float16):
                out = ours(x16, **kw, down_block_additional_residuals=down16, mid_block_additional_residual=mid16)
        else:
            net = ours.half()
            if mode == "half_channels_last":
                net = net.to(memory_format=torch.channels_last_3d)
                x16 = x16.contiguous(memory_format=torch.channels_last_3d)
            out = net(x16, **kw, down_block_additional_residuals=down16, mid_block_additional_residual=mid16)
    assert out.dtype == torch.float16 and rel(out, truth) < 2e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,groups", [((1, 64, 40, 48, 56), 32), ((2, 384, 6, 8, 10), 32), ((1, 16, 1, 1, 1), 8),
                                          ((2, 12, 4, 4), 4)])
def test_gpu_group_norm_kernels(dtype, channels_last, shape, groups):
    norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = (torch.randn(shape, device="cuda") * 3 + 5).to(dtype)  # offset mean: stresses the variance merge
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    pre = torch.randn(shape[0], shape[1], device="cuda")
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    for pre_bias in (None, pre):
        x32 = x.float() if pre_bias is None else x.float() + pre_bias.reshape(*pre_bias.shape, *[1] * (x.dim() - 2))
        truth = torch.nn.functional.silu(torch.nn.functional.group_norm(x32, groups, norm.weight, norm.bias, 1e-6))
        with torch.no_grad():
            y = group_norm(x, norm, silu=True, pre_bias=pre_bias)
        assert y.dtype == dtype and y.stride() == x.stride()
        assert (y.float() - truth).abs().max() < tol * max(1.0, truth.abs().max().item() / 4)


@cuda
def test_gpu_mask_unet_autocast():
    _, ours = pair(monai_unet.DiffusionModelUNet, DiffusionModelUNet, MASK | dict(use_flash_attention=True))
    ours = ours.cuda()
    x, t, ctx = torch.randn(SHAPE, device="cuda"), torch.tensor([10.0, 500.0], device="cuda"), \
        torch.randn(2, 1, 10, device="cuda")
    with torch.no_grad():
        truth = ours(x, t, context=ctx)
        with torch.autocast("cuda", dtype=torch.float16):
            out = ours(x.half(), t, context=ctx.half())
    assert rel(out, truth) < 2e-2


@pytest.mark.parametrize("mode", [True, "selective", "outer"])
def test_gradient_checkpointing_same_gradients(mode):
    """use_checkpointing recomputes blocks in backward: same loss and gradients, no new state_dict keys."""
    torch.manual_seed(0)
    a = randomize(DiffusionModelUNetMaisi(**RFLOW)).train()
    b = DiffusionModelUNetMaisi(**RFLOW).train()
    b.load_state_dict(a.state_dict())
    b.use_checkpointing = mode
    assert a.state_dict().keys() == b.state_dict().keys()
    inp = inputs()
    keys = ("x", "timesteps", "class_labels", "spacing_tensor")
    la = a(**{k: inp[k] for k in keys}).square().mean()
    lb = b(**{k: inp[k] for k in keys}).square().mean()
    la.backward(), lb.backward()
    assert torch.equal(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_selective_checkpointing_saves_less_than_plain():
    """Activation bytes still alive between forward and backward: full recompute < selective (conv / attention
    outputs kept) < plain autograd, and full < outer (full-resolution blocks recomputed) < plain. Tracked by weak
    references to every storage an op made during the forward."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.refs += [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(),
                           StorageWeakRef(t.untyped_storage())) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    torch.manual_seed(0)
    net = randomize(DiffusionModelUNetMaisi(**RFLOW)).train()
    inp = inputs()
    keys = ("x", "timesteps", "class_labels", "spacing_tensor")
    kept, grads = {}, {}
    for mode in (False, "selective", True, "outer"):
        net.use_checkpointing = mode
        net.zero_grad()
        with Made() as made:
            out = net(**{k: inp[k] for k in keys})
        kept[mode] = sum({ptr: n for ptr, n, ref in made.refs if not ref.expired()}.values())
        out.square().mean().backward()
        grads[mode] = [p.grad.clone() for p in net.parameters()]
    print("bytes kept for backward", kept)
    assert kept[True] < kept["selective"] < 0.8 * kept[False], kept
    assert kept[True] < kept["outer"] < 0.8 * kept[False], kept
    for mode in ("selective", "outer"):
        for g_plain, g_mode in zip(grads[False], grads[mode]):
            torch.testing.assert_close(g_mode, g_plain, rtol=1e-5, atol=1e-7)


def test_training_group_norm_keeps_only_its_input():
    """The training GroupNorm(+SiLU) stores its input (and the (N, G) statistics) for backward instead of autograd's
    input + normalised tensor + SiLU input; fp32: the output bit for bit, gradients within 1e-6 of plain autograd."""
    from fastmaisi.nets import ops

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 6, 5, 4, requires_grad=True)
    g = torch.randn(2, 8, 6, 5, 4)
    big = []

    def pack(t):
        if t.numel() == x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.group_norm(x, norm, silu=True)
    assert len(big) == 1 and big[0] is x  # autograd's own path keeps three such tensors
    grads = torch.autograd.grad(y, (x, norm.weight, norm.bias), g)
    y_ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    ref = torch.autograd.grad(y_ref, (x, norm.weight, norm.bias), g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
