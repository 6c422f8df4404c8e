"""Multi-process training (torchrun, gloo on CPU): 2 processes x batch b give the weights of 1 process x batch 2b,
and of 1 process x batch b x 2 accumulation steps (the gradient of the mean per-sample loss of the global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastmaisi.train import data as D

_UNET = "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi"
TINY = {"diffusion_unet_def": dict(
    _target_=_UNET, spatial_dims=3, in_channels=4, out_channels=4, num_channels=[8, 16, 16, 32],
    attention_levels=[False, False, True, True], num_head_channels=[0, 0, 8, 8], num_res_blocks=1, norm_num_groups=4,
    use_flash_attention=False, num_class_embeds=128, resblock_updown=True, include_fc=True,
    include_spacing_input=True)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    for i in range(5):  # smooth random latents (4, 8, 8, 8) with sidecars
        z = torch.from_numpy(rng.standard_normal((4, 8, 8, 8)).astype(np.float32)).cumsum(1) * 0.3 + i
        D.write_latent(root / "latents" / f"c{i}_emb.nii.gz", z, np.diag([1.5, 1.5, 2.0, 1.0]))
        modality = ["ct", "ct_contrast", "mri_t1"][i % 3]
        D.write_json(root / "latents" / f"c{i}_emb.nii.gz.json",
                     {"dim": [32, 32, 32], "spacing": [1.5, 1.5, 2.0], "modality": modality})
    (root / "tiny.json").write_text(json.dumps(TINY))
    from fastmaisi.nets import build

    torch.manual_seed(0)
    init = build(TINY["diffusion_unet_def"]).state_dict()
    torch.save({"unet_state_dict": init}, root / "init.pt")  # no scale_factor: computed from the first batch
    return root, init


def _train(root, out, extra, nproc=1):
    argv = ["-m", "fastmaisi", "train", "diffusion", "-i", str(root / "latents"), "-o", str(root / out),
            "--network-config", str(root / "tiny.json"), "--init", str(root / "init.pt"), "--steps", "3",
            "--lr", "1e-3", "--precision", "fp64", "--no-progress", "-d", "cpu", *extra]
    if nproc > 1:
        argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(root / out / "diffusion_unet.pt", weights_only=True)


def test_two_processes_equal_one_with_the_double_batch(setup):
    root, init = setup
    one = _train(root, "one", ["--batch-size", "4"])
    two = _train(root, "two", ["--batch-size", "2"], nproc=2)
    accum = _train(root, "accum", ["--batch-size", "2", "--grad-accum", "2"])
    for other in (two, accum):  # 1/std of the 4 latents of the first step, however they are split
        assert float(other["scale_factor"]) == pytest.approx(float(one["scale_factor"]), rel=1e-12)
    moved = max((one["unet_state_dict"][k].double() - init[k].double()).abs().max().item() for k in init)
    assert moved > 1e-3  # the comparison below is meaningful
    for other in (two, accum):
        for k, v in one["unet_state_dict"].items():
            torch.testing.assert_close(other["unet_state_dict"][k], v, atol=1e-5, rtol=0, msg=k)
    log = [(root / d / "train_log.csv").read_text().splitlines()[1:] for d in ("one", "two")]
    losses = [[float(r.split(",")[1]) for r in rows] for rows in log]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
