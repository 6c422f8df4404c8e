"""`fastmaisi train mask-diffusion --mask-generator v2`: the v2 recipe's loss falls on phantoms, its checkpoint loads
strictly into the v2 net, and the training conditions follow the inference rules (CPU, tiny networks)."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from fastmaisi import mask_conditions as mc
from fastmaisi.train.cli import train_main
from fastmaisi.train.mask_v2 import V2_CHECKPOINT, draw_condition, item_demographics, size_slots

_AE = dict(_target_="monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi", spatial_dims=3,
           in_channels=8, out_channels=125, latent_channels=4, num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1],
           norm_num_groups=4, norm_eps=1e-6, attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
           with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=True, norm_float16=False,
           num_splits=1, dim_split=1)
_V2 = dict(_target_="scripts.adagn_unet.DiffusionModelUNetMaisiAdaGN", spatial_dims=3, in_channels=4, out_channels=4,
           num_channels=[8, 16, 16, 32], attention_levels=[False, False, True, True], num_head_channels=[0, 0, 8, 8],
           num_res_blocks=1, norm_num_groups=4, with_conditioning=True, upcast_attention=True, include_fc=True,
           cross_attention_dim=19, include_spacing_input=True, adagn_condition_dim=19, adagn_context_embed_dim=32)
# an 8^3 latent: MAISI's resolution shift would put nearly every training timestep at tiny noise (see test_train.py)
_SCHED = dict(_target_="monai.networks.schedulers.rectified_flow.RFlowScheduler", num_train_timesteps=1000,
              use_discrete_timesteps=False, use_timestep_transform=False, sample_method="uniform", scale=1.0)
SHAPE, SPACING = (32, 32, 32), (9.0, 9.0, 8.0)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from fastmaisi.nets import build
    from fastmaisi.phantom import make_phantom

    root = tmp_path_factory.mktemp("train_v2")
    _, label = make_phantom(SHAPE, SPACING, seed=1, tumour="lung")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.diag([*SPACING, 1.0])), str(root / "case.nii.gz"))
    (root / "list.json").write_text(json.dumps({"training": [{"label": "case.nii.gz", "age": 40, "sex": "F"}]}))
    config = {"mask_generation_autoencoder_def": _AE, "mask_generation_diffusion_def": _V2,
              "mask_generation_noise_scheduler": _SCHED, "autoencoder_def": dict(_AE, in_channels=1, out_channels=1)}
    (root / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    torch.save(build(_AE).state_dict(), root / "mask_ae.pt")
    return root, label


def test_v2_recipe_loss_falls_and_checkpoint_loads(work, tmp_path):
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into

    root, _ = work
    argv = ["mask-diffusion", "--mask-generator", "v2", "-i", str(root / "list.json"), "-o", str(tmp_path),
            "--network-config", str(root / "config.json"), "--mask-autoencoder", str(root / "mask_ae.pt"),
            "--spacing", ",".join(map(str, SPACING)), "--size", "32", "--latent", "mean", "--batch-size", "2",
            "--steps", "30", "--lr", "3e-3", "--lr-power", "0", "--no-progress", "-d", "cpu"]
    torch.set_num_threads(1)
    assert train_main(argv) == 0
    losses = [float(r.split(",")[1]) for r in (tmp_path / "train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    meta = load_into(build(_V2), tmp_path / V2_CHECKPOINT)
    assert meta["layout"] == "unet_state_dict" and meta["scale_factor"] > 0


def test_v2_recipe_refuses_a_v1_definition(work, tmp_path, capsys):
    root, _ = work
    config = json.loads((root / "config.json").read_text())
    config["mask_generation_diffusion_def"] = dict(
        _target_="monai.networks.nets.diffusion_model_unet.DiffusionModelUNet", spatial_dims=3, in_channels=4,
        out_channels=4, channels=[8, 16, 16, 32], attention_levels=[False, False, True, True],
        num_head_channels=[0, 0, 8, 8], num_res_blocks=1, norm_num_groups=4, with_conditioning=True,
        cross_attention_dim=10)
    (tmp_path / "v1.json").write_text(json.dumps(config))
    argv = ["mask-diffusion", "--mask-generator", "v2", "-i", str(root / "list.json"), "-o", str(tmp_path / "o"),
            "--network-config", str(tmp_path / "v1.json"), "--mask-autoencoder", str(root / "mask_ae.pt"),
            "--steps", "1", "--no-progress", "-d", "cpu"]
    assert train_main(argv) == 2
    assert "DiffusionModelUNetMaisiAdaGN" in capsys.readouterr().err


def test_training_conditions_follow_the_inference_rules(work):
    _, label = work
    sizes = size_slots(label)
    assert sizes[mc.SIZE_SLOTS.index("liver")] > 0 and sizes[mc.SIZE_SLOTS.index("lung")] > 0
    assert sizes[mc.SIZE_SLOTS.index("lung tumor")] > 0 and sizes[mc.SIZE_SLOTS.index("bone lesion")] == -1
    demo = item_demographics({"age": 40, "sex": "f", "weight": 70, "bmi": 24})
    assert demo == {"age": 40.0, "sex": "F", "bmi": 24.0}  # weight and bmi never together: bmi kept
    rng = np.random.default_rng(0)
    draws = [draw_condition(sizes, demo, rng) for _ in range(400)]
    set_sizes = [sum(v != -1 for v in d[:14]) for d in draws]
    assert max(set_sizes) == 1  # at most one size target, as at inference
    assert 0.05 < np.mean([all(v == -1 for v in d) for d in draws]) < 0.2  # the unconditional branch
    assert all(d[15] in (-1.0, 0.0) for d in draws) and any(d[14] == 40 / 120 for d in draws)
    for d in draws:  # every draw passes the inference checks
        organ = {mc.SIZE_SLOTS[i]: d[i] for i in range(14) if d[i] != -1}
        assert len(organ) <= 1
