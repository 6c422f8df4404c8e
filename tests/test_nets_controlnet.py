"""ControlNetMaisi: MONAI's keys, outputs equal to MONAI's, residuals into the UNet, no stale condition embedding."""

import pytest
import torch

from fastmaisi.nets.controlnet import ControlNetMaisi
from fastmaisi.nets.unet import DiffusionModelUNetMaisi
from fastmaisi.variants import controlnet_def
from test_nets_unet import RFLOW, SHAPE, TOL, check_keys, inputs, kwargs, pair, rel

monai_cn = pytest.importorskip("monai.apps.generation.maisi.networks.controlnet_maisi")
monai_maisi = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")

CNET = dict(spatial_dims=3, in_channels=4, num_channels=(8, 16, 16, 32), attention_levels=(False, False, True, True),
            num_head_channels=(0, 0, 8, 8), num_res_blocks=2, norm_num_groups=8, num_class_embeds=8,
            resblock_updown=True, include_fc=True, conditioning_embedding_in_channels=8,
            conditioning_embedding_num_channels=(8, 16, 16))


@pytest.fixture(scope="module")
def nets():
    ref_cn, cn = pair(monai_cn.ControlNetMaisi, ControlNetMaisi, CNET, seed=4)
    ref_unet, unet = pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, RFLOW)
    return ref_cn, cn, ref_unet, unet


def condition(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE[0], 8, *[4 * s for s in SHAPE[2:]], generator=g) > 0.5).float()


def test_full_size_state_dict_keys():
    with torch.device("meta"):
        net = ControlNetMaisi(**kwargs(controlnet_def(False)))
    check_keys(net, "controlnet")
    with torch.device("meta"):
        ddpm = ControlNetMaisi(**kwargs(controlnet_def(True)))
    assert ddpm.state_dict()["down_blocks.0.resnets.0.time_emb_proj.weight"].shape == (64, 256)


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_outputs_match_monai(nets, scale):
    ref_cn, cn, _, _ = nets
    inp, cond = inputs(), condition()
    kw = dict(timesteps=inp["timesteps"], conditioning_scale=scale, class_labels=inp["class_labels"])
    with torch.no_grad():
        down_a, mid_a = ref_cn(inp["x"], controlnet_cond=cond, **kw)
        down_b, mid_b = cn(inp["x"], controlnet_cond=cond, **kw)
    assert len(down_b) == len(down_a) == 12
    assert max(rel(b, a) for a, b in zip(down_a, down_b)) < TOL and rel(mid_b, mid_a) < TOL


def test_residuals_into_unet_match_monai(nets):
    ref_cn, cn, ref_unet, unet = nets
    inp, cond = inputs(), condition()
    ukw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"])
    with torch.no_grad():
        down_a, mid_a = ref_cn(inp["x"], inp["timesteps"], cond, 0.8, class_labels=inp["class_labels"])
        a = ref_unet(inp["x"], **ukw, down_block_additional_residuals=down_a, mid_block_additional_residual=mid_a)
        down_b, mid_b = cn(inp["x"], inp["timesteps"], cond, 0.8, class_labels=inp["class_labels"])
        b = unet(inp["x"], **ukw, down_block_additional_residuals=down_b, mid_block_additional_residual=mid_b)
    assert rel(b, a) < TOL


def test_condition_is_embedded_at_every_call_never_stale(nets):
    """No implicit condition cache: a condition refilled in place (numpy, `.data`) or embedding weights updated
    through `.data` take effect at the next call, as with MONAI's class (the oracle)."""
    import numpy as np

    ref_cn, cn, _, _ = nets
    inp = inputs()
    cond = condition()
    kw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"])

    def agree():
        with torch.no_grad():
            a, b = ref_cn(inp["x"], controlnet_cond=cond, **kw), cn(inp["x"], controlnet_cond=cond, **kw)
        return max(rel(y, x) for x, y in zip(a[0] + [a[1]], b[0] + [b[1]]))

    assert agree() < TOL
    np.copyto(cond.numpy(), 1 - cond.numpy())  # refilled through numpy: no version counter moves
    assert agree() < TOL
    cond.data[:, :, :4] = 0.5  # and through .data
    assert agree() < TOL
    saved = [p.detach().clone() for p in cn.controlnet_cond_embedding.parameters()]
    try:
        for p, q in zip(cn.controlnet_cond_embedding.parameters(), ref_cn.controlnet_cond_embedding.parameters()):
            p.data.mul_(0.5).add_(0.1)  # the EMA idiom
            q.data.mul_(0.5).add_(0.1)
        assert agree() < TOL
    finally:
        for p, q, v in zip(cn.controlnet_cond_embedding.parameters(), ref_cn.controlnet_cond_embedding.parameters(),
                           saved):
            p.data.copy_(v)
            q.data.copy_(v)
    emb = cn.embed_condition(cond)  # the explicit path gives the same
    with torch.no_grad():
        explicit = cn(inp["x"], controlnet_cond=None, controlnet_cond_embedding=emb, **kw)
        implicit = cn(inp["x"], controlnet_cond=cond, **kw)
    assert all(torch.equal(a, b) for a, b in zip(explicit[0], implicit[0]))


def test_controlnet_under_inference_mode_and_saved_after_forward(nets, tmp_path):
    """Built and run under torch.inference_mode (NVIDIA's image-only script runs so), then torch.save'd."""
    ref_cn, cn, _, _ = nets
    inp, cond = inputs(), condition()
    kw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"])
    with torch.inference_mode():
        fresh = ControlNetMaisi(**CNET).eval()
        fresh.load_state_dict(cn.state_dict())
        first = fresh(inp["x"], controlnet_cond=cond, **kw)
        second = fresh(inp["x"], controlnet_cond=cond, **kw)
        want = ref_cn(inp["x"], controlnet_cond=cond, **kw)
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert max(rel(b, a) for a, b in zip(want[0], first[0])) < TOL
    with torch.no_grad():
        cn(inp["x"], controlnet_cond=cond, **kw)
    torch.save(cn, tmp_path / "cn.pt")  # no weakref or cache left on the module
    assert isinstance(torch.load(tmp_path / "cn.pt", weights_only=False), ControlNetMaisi)


def test_backward_through_controlnet(nets):
    _, cn, _, unet = nets
    inp, cond = inputs(), condition()
    cn.train()
    try:
        down, mid = cn(inp["x"], inp["timesteps"], cond, class_labels=inp["class_labels"])
        out = unet(inp["x"], inp["timesteps"], class_labels=inp["class_labels"], spacing_tensor=inp["spacing_tensor"],
                   down_block_additional_residuals=down, mid_block_additional_residual=mid)
        out.square().mean().backward()
        grad = cn.controlnet_cond_embedding.conv_in.conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        cn.zero_grad(set_to_none=True), unet.zero_grad(set_to_none=True)
        cn.eval()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_head_channels"):
        ControlNetMaisi(**(CNET | dict(num_head_channels=(0, 0, 0, 0))))
    with pytest.raises(ValueError, match="controlnet_cond"):
        ControlNetMaisi(**CNET)(torch.randn(1, 4, 8, 8, 8), torch.tensor([1.0]), None, class_labels=torch.tensor([1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["autocast", "half_channels_last"])
def test_gpu_half_precision_close_to_fp32(mode):
    _, cn = pair(monai_cn.ControlNetMaisi, ControlNetMaisi, CNET | dict(use_flash_attention=True), seed=4)
    cn = cn.cuda()
    inp, cond = {k: v.cuda() for k, v in inputs().items()}, condition().cuda()
    kw = dict(timesteps=inp["timesteps"], class_labels=inp["class_labels"], conditioning_scale=0.5)
    with torch.no_grad():
        down_t, mid_t = cn(inp["x"], controlnet_cond=cond, **kw)
        x16, cond16 = inp["x"].half(), cond.half()
        if mode == "autocast":
            with torch.autocast("cuda", dtype=torch.float16):
                down, mid = cn(x16, controlnet_cond=cond16, **kw)
                down, mid = cn(x16, controlnet_cond=cond16, **kw)  # cached embedding
        else:
            cl = torch.channels_last_3d
            cn = cn.half().to(memory_format=cl)
            down, mid = cn(x16.contiguous(memory_format=cl), controlnet_cond=cond16.contiguous(memory_format=cl), **kw)
    assert mid.dtype == torch.float16
    assert max(rel(b, a) for a, b in zip(down_t, down)) < 2e-2 and rel(mid, mid_t) < 2e-2
