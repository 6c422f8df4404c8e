"""The v2 mask UNet (`DiffusionModelUNetMaisiAdaGN`): NVIDIA's golden tensors (tiny net made with their class, loaded
strictly into ours), the full-size keys against the official 2026-10 config, and the condition handling."""

import json
from pathlib import Path

import pytest
import torch

from fastmaisi.nets import build
from fastmaisi.nets.adagn_unet import DiffusionModelUNetMaisiAdaGN
from fastmaisi.schedulers import build as build_scheduler

# the `shared` folder beside the checkout (or beside the folder of worktrees)
SHARED = next((p / "shared" / "reference" for p in Path(__file__).resolve().parents[2:4]
               if (p / "shared" / "reference").is_dir()), Path("shared-not-found"))
GOLDEN = SHARED / "golden" / "adagn_tiny.safetensors"
CONFIG = SHARED / "configs" / "config_network_rflow_2026-10.json"
MASK_RFLOW = dict(_target_="monai.networks.schedulers.rectified_flow.RFlowScheduler", num_train_timesteps=1000,
                  use_discrete_timesteps=False, use_timestep_transform=True, sample_method="uniform", scale=1.0)


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.skip("shared golden tensors not present")
    from safetensors.torch import load_file

    tensors = load_file(str(GOLDEN))
    kwargs = json.loads(GOLDEN.with_suffix(".json").read_text())["network_kwargs"]
    net = DiffusionModelUNetMaisiAdaGN(**kwargs).eval()
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    return net, tensors


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_forward_matches_nvidia_class(golden):
    net, t = golden
    y = net(x=t["in.x"], timesteps=t["in.timesteps"], context=t["in.context"], spacing_tensor=t["in.spacing_tensor"])
    assert _rel(y, t["out.y"]) < 1e-5


@torch.no_grad()
def test_guided_rflow_loop_matches_nvidia(golden):
    from fastmaisi.pipelines.paired_v2 import rflow_mask_loop

    net, t = golden
    sched = build_scheduler(MASK_RFLOW)
    out = rflow_mask_loop(net, sched, t["loop.noise"].clone(), t["in.context"][0:1], t["in.spacing_tensor"][0:1],
                          steps=10, guidance_scale=2.0, progress=False)
    torch.testing.assert_close(sched.timesteps.float(), t["loop.timesteps"])
    assert _rel(out, t["loop.latent"]) < 1e-4


def test_full_size_keys_and_shapes_match_the_config():
    if not CONFIG.is_file():
        pytest.skip("shared configs not present")
    from fastmaisi.config import resolve_network_definition

    definition = resolve_network_definition(json.loads(CONFIG.read_text()), "mask_generation_diffusion_def")
    with torch.device("meta"):
        net = build(definition)
    sd = net.state_dict()
    assert isinstance(net, DiffusionModelUNetMaisiAdaGN)
    assert sd["adagn_context_embed.0.weight"].shape == (256, 19)
    assert sd["adagn_context_embed.2.weight"].shape == (256, 256)
    # every resnet: (time 256 + spacing 256 + condition 256) -> (scale, shift)
    proj = {k: v.shape for k, v in sd.items() if k.endswith("time_emb_proj.weight")}
    assert proj and all(s[1] == 768 for s in proj.values())
    assert sd["down_blocks.0.resnets.0.time_emb_proj.weight"].shape == (128, 768)
    assert sd["middle_block.resnet_1.time_emb_proj.weight"].shape == (1024, 768)
    assert sd["down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (256, 19)


@torch.no_grad()
def test_condition_forms_agree_and_none_means_unconditional(golden):
    net, t = golden
    x, ts, sp = t["in.x"][:1], t["in.timesteps"][:1], t["in.spacing_tensor"][:1]
    ctx = t["in.context"][:1]
    a = net(x=x, timesteps=ts, context=ctx, spacing_tensor=sp)
    b = net(x=x, timesteps=ts, context=ctx[:, 0], spacing_tensor=sp)
    torch.testing.assert_close(a, b)
    uncond = net(x=x, timesteps=ts, context=torch.full_like(ctx, -1.0), spacing_tensor=sp)
    assert _rel(uncond, a) > 1e-3  # the condition changes the output
    with pytest.raises(ValueError, match="context dim"):
        net(x=x, timesteps=ts, context=torch.zeros(1, 1, 7), spacing_tensor=sp)
