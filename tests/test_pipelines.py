"""Workflow parity: our pipelines vs a MONAI-based loop written as NVIDIA's scripts run it (same weights, same noise).

Tiny random networks, fp32 on CPU: the final latents must agree to float rounding.
"""

import numpy as np
import pytest
import torch

from fastmaisi.pipelines import from_mask, image, paired
from fastmaisi.pipelines.common import latent_noise
from fastmaisi.pipelines.models import Models
from fastmaisi.variants import DDPM_SCHEDULER_DEF, RFLOW_SCHEDULER_DEF, get_variant
from test_nets_controlnet import CNET
from test_nets_unet import DDPM, MASK, RFLOW, pair, rel

monai_sched = pytest.importorskip("monai.networks.schedulers")
monai_cn = pytest.importorskip("monai.apps.generation.maisi.networks.controlnet_maisi")
monai_maisi = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")
monai_unet = pytest.importorskip("monai.networks.nets.diffusion_model_unet")

TOL = 1e-5
SIZE = (32, 32, 64)  # image grid; latent 8 x 8 x 16
SPACING = (1.5, 1.5, 2.0)


def _kw(d):
    return {k: v for k, v in d.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def rflow_nets():
    ref_unet, unet = pair(monai_maisi.DiffusionModelUNetMaisi, monai_maisi_cls("unet"), RFLOW, seed=11)
    ref_cn, cn = pair(monai_cn.ControlNetMaisi, monai_maisi_cls("cnet"), CNET, seed=12)
    return ref_unet, unet, ref_cn, cn


def monai_maisi_cls(which):
    from fastmaisi.nets.controlnet import ControlNetMaisi
    from fastmaisi.nets.unet import DiffusionModelUNetMaisi

    return DiffusionModelUNetMaisi if which == "unet" else ControlNetMaisi


def reference_loop(unet, cn, x, steps, spacing, cls, cond=None, uncond=None, scale=0.0, regions=None,
                   scheduler_def=RFLOW_SCHEDULER_DEF, seed=0):
    """The reference's loop (NV-Generate-CTMR scripts/utils_infer + diff_model_infer), with MONAI's scheduler."""
    name = scheduler_def["_target_"].rsplit(".", 1)[-1]
    sched = getattr(monai_sched, name)(**_kw(scheduler_def))
    if name == "RFlowScheduler":
        sched.set_timesteps(steps, input_img_size_numel=torch.prod(torch.tensor(x.shape[2:])))
    else:
        sched.set_timesteps(steps)
    next_ts = torch.cat((sched.timesteps[1:], torch.tensor([0], dtype=sched.timesteps.dtype)))
    spacing_t = torch.tensor([[s * 100 for s in spacing]])
    cfg = scale > 0
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t, next_t in zip(sched.timesteps, next_ts):
            xin = torch.cat([x, x]) if cfg else x
            n = xin.shape[0]
            tt = torch.Tensor((float(t),)).repeat(n)
            labels = torch.tensor([cls, 0][:n]) if cls is not None else None
            kw = dict(spacing_tensor=spacing_t.repeat(n, 1), class_labels=labels)
            if regions is not None:
                kw.update(top_region_index_tensor=regions[0].repeat(n, 1), bottom_region_index_tensor=regions[1].repeat(n, 1))
            if cn is not None:
                c = torch.cat([cond, uncond]) if cfg else cond
                down, mid = cn(x=xin, timesteps=tt, controlnet_cond=c, class_labels=labels)
                kw.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = unet(x=xin, timesteps=tt, **kw)
            if cfg:
                o_cond, o_uncond = out.chunk(2)
                out = o_uncond + scale * (o_cond - o_uncond)
            if name == "RFlowScheduler":
                x, _ = sched.step(out, t, x, next_t)
            else:
                x, _ = sched.step(out, t, x, generator=g)
    return x


def _models(variant, unet, cn=None, **kw):
    return Models(variant=get_variant(variant), autoencoder=None, diffusion_unet=unet, controlnet=cn,
                  scheduler_def=RFLOW_SCHEDULER_DEF if variant != "ddpm-ct" else DDPM_SCHEDULER_DEF, **kw)


def phantom_like_label(seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(SIZE, dtype=np.int16)
    label[4:28, 4:28, 4:60] = 200
    label[8:18, 8:20, 10:40] = 1  # liver
    label[12:16, 12:16, 20:26] = 26  # hepatic tumour
    label[20:26, 8:22, 30:56] = 28  # lung lobe
    label[rng.random(SIZE) < 0.002] = 0
    return label


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_image_only_matches_reference(rflow_nets, scale):
    ref_unet, unet, _, _ = rflow_nets
    ours = image.sample_image_latent(_models("rflow-ct", unet), size=SIZE, spacing=SPACING, modality_code=1, steps=6,
                                     guidance_scale=scale, seed=3, progress=False)
    x = latent_noise(3, (1, 4, *[s // 4 for s in SIZE]), "cpu", torch.float32)
    ref = reference_loop(ref_unet, None, x, 6, SPACING, 1, scale=scale)
    assert ours.shape == (1, 4, 8, 8, 16)
    assert rel(ours, ref) < TOL
    assert rel(ours, x) > 0.1  # the loop really moved the latent


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_from_mask_matches_reference(rflow_nets, scale):
    ref_unet, unet, ref_cn, cn = rflow_nets
    label = phantom_like_label()
    ours = from_mask.sample_latent_from_mask(_models("rflow-ct", unet, cn), label, spacing=SPACING, modality_code=1,
                                             steps=5, guidance_scale=scale, seed=4, progress=False)
    cond = from_mask.bit_channels(label, "cpu", torch.float32)
    uncond = from_mask.bit_channels(from_mask.remove_tumours(label), "cpu", torch.float32)
    assert not torch.equal(cond, uncond)  # the tumour really is removed for the unconditional branch
    x = latent_noise(4, (1, 4, *[s // 4 for s in SIZE]), "cpu", torch.float32)
    ref = reference_loop(ref_unet, ref_cn, x, 5, SPACING, 1, cond=cond, uncond=uncond, scale=scale)
    assert rel(ours, ref) < TOL


def test_label_ids_is_the_compact_condition():
    """The from-mask condition crosses to the device as uint8 ids (1, 1, X, Y, Z), whatever the map's integer dtype;
    the ControlNet's embedding of them equals its embedding of the 8 bit-channels; ids outside 0..255 are refused."""
    from fastmaisi.nets.controlnet import ControlNetMaisi

    label = np.array([[[0, 1], [200, 255]], [[7, 128], [64, 3]]], dtype=np.int16)
    ids = from_mask.label_ids(label, "cpu")
    assert ids.dtype == torch.uint8 and ids.shape == (1, 1, 2, 2, 2) and torch.equal(ids[0, 0].long(),
                                                                                       torch.from_numpy(label).long())
    torch.manual_seed(0)
    cn = ControlNetMaisi(**{**CNET, "conditioning_embedding_num_channels": (8, 16)}).eval()
    big = torch.randint(0, 256, (1, 1, 8, 8, 12), dtype=torch.uint8)
    with torch.no_grad():
        for p in cn.controlnet_cond_embedding.parameters():  # (its conv_out starts at zero, like MONAI's)
            p.normal_(0, 0.1)
        emb = cn.embed_labels(big)
        assert emb.abs().max() > 0.01
        torch.testing.assert_close(emb, cn.embed_condition(from_mask.bit_channels(big[0, 0].numpy(), "cpu",
                                                                                   torch.float32)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="0..255"):
        from_mask.label_ids(np.array([[[0, 300]]], dtype=np.int16), "cpu")


def test_from_mask_ddpm_regions_match_reference():
    from fastmaisi.nets.controlnet import ControlNetMaisi
    from fastmaisi.nets.unet import DiffusionModelUNetMaisi

    ddpm_cn = {k: v for k, v in CNET.items() if k not in ("num_class_embeds", "resblock_updown", "include_fc")}
    ddpm_cn["num_res_blocks"] = DDPM["num_res_blocks"]
    ref_unet, unet = pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, DDPM, seed=21)
    ref_cn, cn = pair(monai_cn.ControlNetMaisi, ControlNetMaisi, ddpm_cn, seed=22)
    label = phantom_like_label()
    ours = from_mask.sample_latent_from_mask(_models("ddpm-ct", unet, cn), label, spacing=SPACING, modality_code=1,
                                             steps=10, guidance_scale=0.0, seed=5, progress=False)
    # liver (abdomen) and a lung lobe (chest) -> top chest, bottom abdomen
    top, bottom = torch.zeros(1, 4), torch.zeros(1, 4)
    top[0, 1], bottom[0, 2] = 100, 100
    x = latent_noise(5, (1, 4, *[s // 4 for s in SIZE]), "cpu", torch.float32)
    ref = reference_loop(ref_unet, ref_cn, x, 10, SPACING, None, cond=from_mask.bit_channels(label, "cpu", torch.float32),
                         regions=(top, bottom), scheduler_def=DDPM_SCHEDULER_DEF, seed=5)
    assert rel(ours, ref) < TOL


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler"])
def test_mask_stage_matches_reference(scheduler, monkeypatch):
    """The mask stage's loop equals the reference loop with either scheduler: DDPM (what 1000 steps use) and DDIM
    (what fewer steps use, at η = 1: MONAI's DDPM step is t -> t-1). 10 steps each; DDPM forced for the test."""
    from fastmaisi.nets.unet import DiffusionModelUNet
    from fastmaisi.variants import DDIM_SCHEDULER_DEF

    if scheduler == "DDPMScheduler":  # the loop with DDPM, at 10 steps instead of 1000
        monkeypatch.setattr(paired, "DDIM_SCHEDULER_DEF", DDPM_SCHEDULER_DEF)
    ref, ours = pair(monai_unet.DiffusionModelUNet, DiffusionModelUNet, MASK, seed=31)
    sizes = [-1, 0.5, 0.3, -1, -1, -1, -1, 0.1, -1, -1]
    models = _models("rflow-ct", None, mask_diffusion=ours)
    models.diffusion_unet = ours  # Models.device reads the UNet's parameters
    z = paired.sample_mask_latent(models, sizes, seed=7, latent_shape=(4, 8, 8, 8), steps=10, progress=False)
    # reference: DiffusionInferer.sample with cross-attention context (B, 1, 10), same noise and generator
    sched = getattr(monai_sched, scheduler)(**_kw(DDPM_SCHEDULER_DEF if scheduler == "DDPMScheduler"
                                                   else DDIM_SCHEDULER_DEF))
    sched.set_timesteps(10)
    x = latent_noise(7, (1, 4, 8, 8, 8), "cpu", torch.float32)
    g = torch.Generator().manual_seed(8)
    ctx = torch.tensor(sizes).view(1, 1, 10)
    with torch.no_grad():
        for t in sched.timesteps:
            out = ref(x, timesteps=torch.Tensor((t,)), context=ctx)
            x, _ = sched.step(out, t, x, generator=g) if scheduler == "DDPMScheduler" \
                else sched.step(out, t, x, eta=1.0, generator=g)  # DDIM at η = 1: ancestral on the respaced grid
    assert rel(z, x) < TOL


def test_mask_stage_scheduler_by_step_count(monkeypatch):
    """All 1000 steps: the reference's DDPM; fewer: DDIM (never the reference's DDPM skipping timesteps)."""
    seen = []
    monkeypatch.setattr(paired, "sample", lambda denoise, scheduler, x, steps, **kw: seen.append(
        (type(scheduler).__name__, steps)) or x)
    models = _models("rflow-ct", torch.nn.Linear(1, 1))  # never called: `sample` is replaced
    models.mask_diffusion = models.diffusion_unet
    for steps in (1000, 100, 10):
        paired.sample_mask_latent(models, [-1] * 10, seed=0, latent_shape=(4, 8, 8, 8), steps=steps, progress=False)
    assert seen == [("DDPMScheduler", 1000), ("DDIMScheduler", 100), ("DDIMScheduler", 10)]


def test_ab2_sampler_option_changes_the_integrator(rflow_nets):
    from fastmaisi.schedulers import build
    from fastmaisi.schedulers.samplers import sample_rflow_ab2

    _, unet, _, _ = rflow_nets
    models = _models("rflow-ct", unet)
    kw = dict(size=SIZE, spacing=SPACING, modality_code=1, steps=6, guidance_scale=0.0, seed=3, progress=False)
    euler = image.sample_image_latent(models, **kw)
    ab2 = image.sample_image_latent(models, sampler="ab2", **kw)
    sched = build(RFLOW_SCHEDULER_DEF)
    x = latent_noise(3, euler.shape, "cpu", torch.float32)
    sched.set_timesteps(6, input_img_size_numel=x[0, 0].numel())
    spacing = torch.tensor([[s * 100 for s in SPACING]])
    with torch.no_grad():
        direct = sample_rflow_ab2(lambda x_, t: unet(x=x_, timesteps=t, spacing_tensor=spacing,
                                                     class_labels=torch.tensor([1])), x, sched.timesteps, disable=True)
    assert rel(ab2, direct) < TOL and rel(ab2, euler) > 1e-3


def test_image_denoiser_keeps_the_condition_embedding_not_the_condition(rflow_nets):
    """The from-mask loop holds the ControlNet's conditioning embedding, not the 8-channel full-resolution condition
    (2 GiB at 512^3 in fp16): the condition is freed once the denoiser exists, and the output is unchanged."""
    import gc
    import weakref

    from fastmaisi.pipelines.sampling import image_denoiser

    _, unet, _, cn = rflow_nets
    g = torch.Generator().manual_seed(3)
    cond = (torch.rand(1, 8, *SIZE, generator=g) > 0.5).float()
    x, t = torch.randn(1, 4, *[s // 4 for s in SIZE], generator=g), torch.tensor([500.0])
    kw = dict(spacing_tensor=torch.tensor([[150.0, 150.0, 200.0]]), class_labels=torch.tensor([1]))
    with torch.no_grad():
        down, mid = cn(x=x, timesteps=t, controlnet_cond=cond, class_labels=kw["class_labels"])
        want = unet(x=x, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kw)
        cn.clear_condition_cache()
        denoise = image_denoiser(unet, cn, spacing=kw["spacing_tensor"], class_labels=kw["class_labels"],
                                 condition=cond)
        alive = weakref.ref(cond)
        del cond
        gc.collect()
        assert alive() is None
        torch.testing.assert_close(denoise(x, t), want, rtol=0, atol=0)


def test_paired_sample_is_the_same_when_its_mask_is_cleaned_as_a_tensor(monkeypatch):
    """On a GPU the decoded mask stays a tensor and is cleaned, resampled and used there; on the CPU it goes through
    numpy. The glue between the stages must give the same sample either way (here: the tensor path forced on CPU)."""
    from fastmaisi import demo
    from fastmaisi.pipelines import paired

    models = demo.load_demo_models()
    host_image, host_label = demo.paired_volume(models, seed=3, steps=2, mask_steps=4)
    decode = paired.decode_mask
    kinds = []

    def decode_as_tensor(*args, **kwargs):
        out = decode(*args, **{**kwargs, "on_device": True})
        kinds.append(type(out).__name__)
        return out

    monkeypatch.setattr(paired, "decode_mask", decode_as_tensor)
    image, label = demo.paired_volume(models, seed=3, steps=2, mask_steps=4)
    assert kinds == ["Tensor"]
    assert np.array_equal(label, host_label) and np.array_equal(image, host_image)
