"""AutoencoderKlMaisi: MONAI's state_dict keys exactly, and the same outputs as MONAI's class (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastmaisi.nets.autoencoder import AutoencoderKlMaisi

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "keys"  # MONAI's dumps, when beside us

# The official `autoencoder_def` / `mask_generation_autoencoder_def` of config_network_rflow.json, `@` refs resolved
# by hand (spatial_dims 3, image_channels 1, latent_channels 4).
IMAGE_AE_DEF = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
    num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-06, attention_levels=[False, False, False],
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_checkpointing=False,
    use_convtranspose=False, norm_float16=True, num_splits=4, dim_split=1)
MASK_AE_DEF = dict(
    spatial_dims=3, in_channels=8, out_channels=125, latent_channels=4, num_channels=[32, 64, 128],
    num_res_blocks=[1, 2, 2], norm_num_groups=32, norm_eps=1e-06, attention_levels=[False, False, False],
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_flash_attention=False,
    use_checkpointing=True, use_convtranspose=True, norm_float16=True, num_splits=8, dim_split=1)

TINY = {
    "image": dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=(8, 16, 16),
                  num_res_blocks=(1, 2, 2), norm_num_groups=4, attention_levels=(False, False, False)),
    "image_wide": dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=(32, 32, 32),
                       num_res_blocks=(2, 2, 2), norm_num_groups=8, attention_levels=(False, False, False)),
    "mask": dict(spatial_dims=3, in_channels=8, out_channels=13, latent_channels=4, num_channels=(8, 16, 16),
                 num_res_blocks=(1, 2, 2), norm_num_groups=4, attention_levels=(False, False, False),
                 use_convtranspose=True, use_checkpointing=True),
}


def _read_tsv(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def _monai_pair(kwargs: dict, seed: int = 0):
    maisi = pytest.importorskip("monai.apps.generation.maisi.networks.autoencoderkl_maisi")
    torch.manual_seed(seed)
    ref = maisi.AutoencoderKlMaisi(**kwargs, norm_float16=False, num_splits=1, save_mem=False).eval()
    with torch.no_grad():
        for p in ref.parameters():  # randomise everything, GroupNorm affine included
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 and p.numel() else 0))
    ours = AutoencoderKlMaisi(**kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    rel = (a - b).abs().max() / b.abs().max().clamp_min(1e-12)
    assert rel < rtol, f"max relative difference {rel:.3g}"


@pytest.mark.parametrize("kind, size", [("image", (20, 24, 28)), ("image_wide", (16, 16, 24)), ("mask", (16, 20, 12))])
def test_parity_with_monai(kind, size):
    kwargs = TINY[kind]
    ref, ours = _monai_pair(kwargs)
    x = torch.randn(2, kwargs["in_channels"], *size)
    with torch.no_grad():
        mu_r, sig_r = ref.encode(x)
        mu_o, sig_o = ours.encode(x)
        _assert_close(mu_o, mu_r)
        _assert_close(sig_o, sig_r)
        z = torch.randn_like(mu_r)
        _assert_close(ours.decode(z), ref.decode(z))
        _assert_close(ours.reconstruct(x), ref.reconstruct(x))
        torch.manual_seed(7)
        out_r = ref(x)
        torch.manual_seed(7)
        out_o = ours(x)
        for a, b in zip(out_o, out_r):
            _assert_close(a, b)
        torch.manual_seed(3)
        zs_r = ref.encode_stage_2_inputs(x)
        torch.manual_seed(3)
        _assert_close(ours.encode_stage_2_inputs(x), zs_r)
        _assert_close(ours.decode_stage_2_outputs(z), ref.decode_stage_2_outputs(z))
    assert out_o[0].shape == (2, kwargs["out_channels"], *size)


def test_checkpointed_training_matches_plain():
    kwargs = TINY["mask"]
    torch.manual_seed(0)
    a = AutoencoderKlMaisi(**kwargs).train()
    b = AutoencoderKlMaisi(**{**kwargs, "use_checkpointing": False}).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 8, 8, 8)
    for m in (a, b):
        torch.manual_seed(1)
        recon, mu, sigma = m(x)
        (recon.square().mean() + mu.mean() + sigma.mean()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("definition, tsv", [(IMAGE_AE_DEF, "ae.tsv"), (MASK_AE_DEF, "mask_ae.tsv")])
def test_official_configs_have_monai_keys_and_shapes(definition, tsv):
    with torch.device("meta"):
        net = AutoencoderKlMaisi(**definition)
        monai_net = pytest.importorskip(
            "monai.apps.generation.maisi.networks.autoencoderkl_maisi").AutoencoderKlMaisi(**definition)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in monai_net.state_dict().items()}
    if (KEYS / tsv).exists():
        assert got == _read_tsv(tsv)


def test_build_from_official_definition():
    from fastmaisi.nets import build

    target = "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi"
    with torch.device("meta"):
        net = build({"_target_": target, **MASK_AE_DEF})
    assert isinstance(net, AutoencoderKlMaisi) and net.use_convtranspose


@pytest.mark.parametrize("bad, match", [
    (dict(attention_levels=(False, False, True)), "attention blocks are not implemented"),
    (dict(with_decoder_nonlocal_attn=True), "attention blocks are not implemented"),
    (dict(norm_num_groups=3), "multiple of norm_num_groups=3"),
    (dict(num_res_blocks=(1, 2)), "num_res_blocks"),
    (dict(spatial_dims=2), "spatial_dims must be 3"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKlMaisi(**{**TINY["image"], **bad})


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_weights_and_autocast_run(dtype):
    torch.manual_seed(0)
    net = AutoencoderKlMaisi(**TINY["image"]).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net.reconstruct(x)
        with torch.autocast("cpu", dtype=dtype):
            auto = net.reconstruct(x)
        half = net.to(dtype).reconstruct(x.to(dtype))
    assert half.dtype == dtype
    for y in (auto, half):
        assert torch.isfinite(y).all()
        assert (y.float() - ref).abs().max() / ref.abs().max() < 0.1
