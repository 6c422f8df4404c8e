"""Training: the five recipes learn on tiny problems, checkpoints load into the generation networks, exact resume,
latent pre-computation, and clear errors for bad inputs (CPU, tiny networks)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastmaisi.train import data as D
from fastmaisi.train.cli import encode_main, train_main
from fastmaisi.train.loop import Dist, TrainConfig, train
from fastmaisi.train.trainers import TRAINERS, Recipe
from fastmaisi.variants import DDPM_SCHEDULER_DEF, RFLOW_SCHEDULER_DEF

_AE = "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi"
_UNET = "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi"
_CNET = "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi"
_MASK_UNET = "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet"
_AE_KW = dict(spatial_dims=3, latent_channels=4, num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4,
              norm_eps=1e-6, attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
              with_decoder_nonlocal_attn=False, use_checkpointing=False, norm_float16=False, num_splits=1, dim_split=1)
_TRUNK = dict(spatial_dims=3, in_channels=4, num_channels=[8, 16, 16, 32], attention_levels=[False, False, True, True],
              num_head_channels=[0, 0, 8, 8], num_res_blocks=1, norm_num_groups=4, use_flash_attention=False,
              num_class_embeds=128, resblock_updown=True, include_fc=True)
# the official network-config layout (`*_def` entries), tiny
TINY = {
    "autoencoder_def": dict(_target_=_AE, in_channels=1, out_channels=1, use_convtranspose=False, **_AE_KW),
    "diffusion_unet_def": dict(_target_=_UNET, out_channels=4, include_spacing_input=True, **_TRUNK),
    "controlnet_def": dict(_target_=_CNET, conditioning_embedding_in_channels=8,
                           conditioning_embedding_num_channels=[8, 8, 8], **_TRUNK),
    "mask_generation_autoencoder_def": dict(_target_=_AE, in_channels=8, out_channels=125, use_convtranspose=True,
                                            **_AE_KW),
    "mask_generation_diffusion_def": dict(
        _target_=_MASK_UNET, spatial_dims=3, in_channels=4, out_channels=4, channels=[8, 16, 16, 32],
        attention_levels=[False, False, True, True], num_head_channels=[0, 0, 8, 8], num_res_blocks=1,
        norm_num_groups=4, with_conditioning=True, cross_attention_dim=10, upcast_attention=True),
}
ROLE_KEYS = {"autoencoder": "autoencoder_def", "diffusion_unet": "diffusion_unet_def", "controlnet": "controlnet_def",
             "mask_autoencoder": "mask_generation_autoencoder_def", "mask_diffusion": "mask_generation_diffusion_def"}
SHAPE, SPACING = (32, 32, 32), (9.0, 9.0, 8.0)
# MAISI's resolution shift sends an 8^3 latent's training timesteps to tiny noise levels, where the velocity target
# x0 - eps is nearly all unpredictable noise and the loss can hardly fall; the loss-falls tests use uniform timesteps.
RFLOW_UNIFORM = dict(RFLOW_SCHEDULER_DEF, use_timestep_transform=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from threads, and on a busy machine OpenMP spins: one thread keeps timings stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def _phantom(seed: int, tumour=None):
    if importlib.util.find_spec("fastmaisi.phantom") is None:  # synthetic stand-in: a body with two organs
        g = np.indices(SHAPE).astype(np.float32)
        r = np.sqrt(((g - 15.5) ** 2).sum(0))
        label = np.where(r < 14, 200, 0).astype(np.uint8)
        label[(r < 6)] = 1
        label[(g[0] > 20) & (r < 14)] = 28 + seed % 5
        if tumour:
            label[(r < 2)] = 23
        image = np.where(label == 0, -1000, 40.0 + 5 * seed).astype(np.float32)
        return image, label
    from fastmaisi.phantom import make_phantom

    return make_phantom(SHAPE, SPACING, seed=seed, tumour=tumour)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Phantom images + labels, a tiny random autoencoder, its latents (via `fastmaisi encode`), a tiny DM file."""
    root = tmp_path_factory.mktemp("train")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for s in range(3):
        image, label = _phantom(s, tumour="lung" if s != 1 else None)
        _save(root / "images" / f"case{s}.nii.gz", image.astype(np.float32))
        _save(root / "labels" / f"case{s}.nii.gz", label.astype(np.uint8))
    (root / "tiny.json").write_text(json.dumps(TINY))
    from fastmaisi.nets import build

    torch.manual_seed(0)
    torch.save(build(TINY["autoencoder_def"]).state_dict(), root / "ae.pt")
    argv = ["-i", str(root / "images"), "-o", str(root / "latents"), "--autoencoder", str(root / "ae.pt"),
            "--network-config", str(root / "tiny.json"), "--labels", str(root / "labels"), "--multiple", "32",
            "--no-progress"]
    assert encode_main(argv) == 0
    dm = build(TINY["diffusion_unet_def"])
    torch.save({"unet_state_dict": dm.state_dict(), "scale_factor": torch.tensor(1.0), "epoch": 0, "loss": 0.0,
                "num_train_timesteps": 1000}, root / "dm.pt")
    return root


def recipe(work: Path, data: Path, roles, **kw) -> Recipe:
    defs = {r: dict(TINY[ROLE_KEYS[r]]) for r in roles}
    kw.setdefault("scheduler", RFLOW_SCHEDULER_DEF)
    kw.setdefault("exclude_fold", None)
    return Recipe(data=data, definitions=defs, **kw)


def fit(name: str, rec: Recipe, out: Path, steps: int, on_step=None, **cfg_kw):
    torch.manual_seed(0)
    cfg = TrainConfig(out_dir=out, steps=steps, progress=False, **cfg_kw)
    task = TRAINERS[name](rec, cfg, Dist())
    return train(task, cfg, Dist(), on_step), task


def falls(history, n: int = 10, factor: float = 0.95) -> bool:
    """The mean loss of the last n steps is below `factor` x that of the first n (runs are deterministic on CPU; a
    network that does not learn stays at 1.00 +- 0.01)."""
    losses = [row["loss"] for row in history]
    assert all(math.isfinite(v) for v in losses), losses
    return np.mean(losses[-n:]) < factor * np.mean(losses[:n])


# ------------------------------------------------------------------------------------------------------- encode
def test_encode_outputs(work):
    lat = work / "latents"
    z = D.read_latent(lat / "case0_emb.nii.gz")
    assert z.shape == (4, 8, 8, 8) and z.dtype == torch.float32
    img = nib.load(str(lat / "case0_emb.nii.gz"))
    assert img.shape == (8, 8, 8, 4) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.header.get_zooms()[:3], SPACING)  # the resized image's affine, as the reference
    side = json.loads((lat / "case0_emb.nii.gz.json").read_text())
    assert side["dim"] == [32, 32, 32] and side["spacing"] == list(SPACING) and side["modality"] == "ct"
    assert nib.load(str(lat / side["label"])).shape == SHAPE
    assert set(side) >= {"top_region_index", "bottom_region_index"}
    # existing outputs are skipped; --latent mean is deterministic, the sampled default is seeded per image
    argv = ["-i", str(work / "images"), "--autoencoder", str(work / "ae.pt"), "--network-config",
            str(work / "tiny.json"), "--multiple", "32", "--no-progress"]
    assert encode_main(argv + ["-o", str(lat)]) == 0
    assert torch.equal(D.read_latent(lat / "case0_emb.nii.gz"), z)
    assert encode_main(argv + ["-o", str(work / "mean"), "--latent", "mean"]) == 0
    mean = D.read_latent(work / "mean" / "case0_emb.nii.gz")
    assert not torch.equal(mean, z) and (mean - z).abs().max() < 10


def test_encode_rules():
    assert D.encoded_shape((100, 200, 64)) == (128, 256, 128)
    assert D.encoded_shape((300, 512, 191)) == (256, 512, 128)
    assert D.encoded_shape((40, 50, 16), multiple=32) == (32, 64, 32)
    ct = D.scale_intensity(np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0]), "ct")
    np.testing.assert_allclose(ct, [0, 0, 0.5, 1, 1])
    mr = D.scale_intensity(np.arange(1000, dtype=np.float32), "mri_t1")
    assert mr[0] == 0 and mr.max() > 1.0  # percentiles 0..99.5 -> 0..1, not clipped
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(D.resized_affine(a, (100, 100, 100), (200, 50, 100))[:3, :3], np.diag([0.5, 4, 3]))


def test_encode_label_shape_mismatch(work, tmp_path):
    (tmp_path / "labels").mkdir()
    _save(tmp_path / "labels" / "case0.nii.gz", np.zeros((32, 32, 16), np.uint8))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "case0.nii.gz").symlink_to(work / "images" / "case0.nii.gz")
    with pytest.raises(ValueError, match=r"label map .*case0.nii.gz has shape \(32, 32, 16\) but its image"):
        from fastmaisi.train.encode import EncodeRequest, encode_volumes

        encode_volumes(EncodeRequest(tmp_path / "images", tmp_path / "out", work / "ae.pt", TINY["autoencoder_def"],
                                     labels=tmp_path / "labels", multiple=32), progress=False)


def test_encode_counts_unreadable_images(work, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "case0.nii.gz").symlink_to(work / "images" / "case0.nii.gz")
    (tmp_path / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    argv = ["-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"), "--autoencoder", str(work / "ae.pt"),
            "--network-config", str(work / "tiny.json"), "--multiple", "32", "--no-progress"]
    assert encode_main(argv + ["--max-bad-fraction", "0.5"]) == 0
    assert "encoded 1 volumes" in (out := capsys.readouterr().out) and "1 unreadable" in out
    assert (tmp_path / "out" / "case0_emb.nii.gz").is_file() and not (tmp_path / "out" / "broken_emb.nii.gz").exists()
    assert encode_main(argv + ["--overwrite"]) == 2  # 1 of 2 > 0.1
    assert "1 of 2 volumes are unreadable" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the five recipes
def test_vae_loss_falls_and_checkpoint_loads(work, tmp_path):
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into

    rec = recipe(work, work / "images" / "case0.nii.gz", ["autoencoder"], patch_size=(24, 24, 24))
    rec.data = work / "one_image.json"
    rec.data.write_text(json.dumps({"training": [{"image": "images/case0.nii.gz", "modality": "ct"}]}))
    history, _ = fit("vae", rec, tmp_path, 24, lr=2e-3, lr_power=0.0)
    assert falls(history)
    assert load_into(build(TINY["autoencoder_def"]), tmp_path / "autoencoder.pt")["layout"] == "raw"
    disc = torch.load(tmp_path / "discriminator.pt", weights_only=True)
    assert "initial_conv.conv.weight" in disc and "final_conv.conv.weight" in disc


def test_diffusion_rflow_loss_falls_and_checkpoint_loads(work, tmp_path):
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into

    one = work / "latents_one"
    one.mkdir(exist_ok=True)
    for f in ("case0_emb.nii.gz", "case0_emb.nii.gz.json", "case0_label.nii.gz"):
        if not (one / f).exists():
            (one / f).symlink_to(work / "latents" / f)
    rec = recipe(work, one, ["diffusion_unet"], scheduler=RFLOW_UNIFORM)
    history, task = fit("diffusion", rec, tmp_path, 100, lr=3e-3, lr_power=0.0, batch_size=2)
    assert falls(history)
    ckpt = torch.load(tmp_path / "diffusion_unet.pt", weights_only=True)
    assert set(ckpt) == {"unet_state_dict", "scale_factor", "epoch", "loss", "num_train_timesteps"}
    assert isinstance(ckpt["scale_factor"], torch.Tensor) and ckpt["num_train_timesteps"] == 1000
    z = D.read_latent(one / "case0_emb.nii.gz")
    first_batch = torch.stack([z, z]).double()  # the one latent, twice
    assert float(ckpt["scale_factor"]) == pytest.approx(1 / first_batch.std().item(), rel=1e-6)
    meta = load_into(build(TINY["diffusion_unet_def"]), tmp_path / "diffusion_unet.pt")
    assert meta["scale_factor"] == pytest.approx(float(ckpt["scale_factor"]))


def test_diffusion_ddpm_with_body_regions_runs(work, tmp_path):
    rec = recipe(work, work / "latents", [], scheduler=DDPM_SCHEDULER_DEF)
    rec.definitions = {"diffusion_unet": dict(
        TINY["diffusion_unet_def"], num_class_embeds=None, include_top_region_index_input=True,
        include_bottom_region_index_input=True, include_fc=False, resblock_updown=False)}
    history, _ = fit("diffusion", rec, tmp_path, 3, lr=1e-3, batch_size=2)
    assert len(history) == 3 and all(math.isfinite(r["loss"]) for r in history)


def test_controlnet_loss_falls_and_checkpoint_loads(work, tmp_path):
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into

    one = work / "latents_one_tumour"
    one.mkdir(exist_ok=True)
    for f in ("case0_emb.nii.gz", "case0_emb.nii.gz.json", "case0_label.nii.gz"):
        if not (one / f).exists():
            (one / f).symlink_to(work / "latents" / f)
    # the full rflow-ct loss (x100 ROI weighting, region-contrastive term) with DDPM's epsilon target, which a tiny
    # ControlNet on a random DM learns much faster than the velocity target
    rec = recipe(work, one, ["diffusion_unet", "controlnet"], diffusion=work / "dm.pt", roi_labels=(23,),
                 contrastive_weight=0.01, scheduler=DDPM_SCHEDULER_DEF)
    history, _ = fit("controlnet", rec, tmp_path, 60, lr=3e-3, lr_power=0.0, batch_size=2)
    assert falls(history)
    ckpt = torch.load(tmp_path / "controlnet.pt", weights_only=True)
    assert {"controlnet_state_dict", "epoch", "loss"} <= set(ckpt)
    assert load_into(build(TINY["controlnet_def"]), tmp_path / "controlnet.pt")["layout"] == "controlnet_state_dict"


def test_controlnet_starts_from_the_diffusion_model(work):
    from fastmaisi.nets import build
    from fastmaisi.train.trainers import copy_matching_weights

    dm = build(TINY["diffusion_unet_def"])
    cn = build(TINY["controlnet_def"])
    n = copy_matching_weights(cn, dm.state_dict())
    assert n > 50 and torch.equal(cn.state_dict()["conv_in.conv.weight"], dm.state_dict()["conv_in.conv.weight"])


def test_mask_vae_runs_and_mask_diffusion_loss_falls(work, tmp_path):
    from fastmaisi.nets import build
    from fastmaisi.weights import load_into

    labels = work / "labels"
    history, _ = fit("mask-vae", recipe(work, labels, ["mask_autoencoder"], patch_size=(16, 16, 16), spacing=SPACING),
                     tmp_path / "mvae", 3, lr=1e-3)
    assert len(history) == 3 and all(math.isfinite(r["loss"]) for r in history)
    load_into(build(TINY["mask_generation_autoencoder_def"]), tmp_path / "mvae" / "mask_generation_autoencoder.pt")

    one = tmp_path / "one_label.json"
    one.write_text(json.dumps({"training": [{"label": str(labels / "case0.nii.gz")}]}))
    rec = recipe(work, one, ["mask_autoencoder", "mask_diffusion"], scheduler=DDPM_SCHEDULER_DEF,
                 mask_autoencoder=tmp_path / "mvae" / "mask_generation_autoencoder.pt", spacing=SPACING, size=SHAPE)
    history, _ = fit("mask-diffusion", rec, tmp_path / "mdm", 60, lr=3e-3, lr_power=0.0, batch_size=2)
    assert falls(history)
    meta = load_into(build(TINY["mask_generation_diffusion_def"]),
                     tmp_path / "mdm" / "mask_generation_diffusion_unet.pt")
    assert meta["layout"] == "unet_state_dict" and meta["scale_factor"] > 0


def test_vae_perceptual_term(work, tmp_path, caplog):
    from fastmaisi.train.losses import PerceptualLoss

    torch.manual_seed(0)
    weights = tmp_path / "lpips.pt"
    torch.save(PerceptualLoss().state_dict(), weights)
    net = PerceptualLoss.from_file(weights)
    x = torch.rand(2, 1, 32, 32, 32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    d = net(x, x.flip(2), gens)
    assert d.shape == (2,) and (d > 0).all() and net(x, x, gens).abs().max() == 0
    torch.save({k: v for k, v in PerceptualLoss().state_dict().items() if not k.startswith("lin")}, weights)
    with pytest.raises(ValueError, match="missing keys"):
        PerceptualLoss.from_file(weights)
    # without weights the term is off and the log says so
    rec = recipe(work, work / "images", ["autoencoder"], patch_size=(24, 24, 24), adv_weight=0.0)
    with caplog.at_level("WARNING", logger="fastmaisi.train"):
        fit("vae", rec, tmp_path / "off", 1)
    assert "perceptual loss OFF" in caplog.text


def test_patch_discriminator_matches_monai():
    monai_nets = pytest.importorskip("monai.networks.nets")
    from fastmaisi.train.losses import PatchDiscriminator

    ref = monai_nets.PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1, out_channels=1,
                                        norm="INSTANCE")
    ours = PatchDiscriminator(1, 32, 3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.testing.assert_close(ours(x), ref(x)[-1])


# ----------------------------------------------------------------------------------------------------- the loop
def test_kill_and_resume_is_bitwise(work, tmp_path):
    rec = lambda: recipe(work, work / "latents", ["diffusion_unet"])  # noqa: E731
    kw = dict(lr=1e-3, batch_size=2, checkpoint_every=3, warmup_steps=2, ema_decay=0.9)
    fit("diffusion", rec(), tmp_path / "full", 6, **kw)

    def kill(info):
        if info["step"] == 5:
            raise KeyboardInterrupt  # dies after step 5; the last checkpoint is step 3

    with pytest.raises(KeyboardInterrupt):
        fit("diffusion", rec(), tmp_path / "cut", 6, on_step=kill, **kw)
    fit("diffusion", rec(), tmp_path / "cut", 6, resume=tmp_path / "cut" / "resume.pt", **kw)
    a = torch.load(tmp_path / "full" / "resume.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    ua = torch.load(tmp_path / "full" / "diffusion_unet.pt", weights_only=True)
    ub = torch.load(tmp_path / "cut" / "diffusion_unet.pt", weights_only=True)
    assert all(torch.equal(ua["unet_state_dict"][k], ub["unet_state_dict"][k]) for k in ua["unet_state_dict"])
    log = (tmp_path / "cut" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log] == ["step", "1", "2", "3", "4", "5", "6"][:1] + ["1", "2", "3", "4", "5", "6"]


def test_cli_trains_and_resumes(work, tmp_path, capsys):
    argv = ["diffusion", "-i", str(work / "latents"), "-o", str(tmp_path), "--network-config", str(work / "tiny.json"),
            "--batch-size", "2", "--no-progress", "-d", "cpu", "--precision", "bf16"]
    assert train_main(argv + ["--steps", "2"]) == 0
    assert train_main(argv + ["--steps", "3", "--resume"]) == 0  # default: OUTPUT/resume.pt
    assert "trained diffusion for 3 steps" in capsys.readouterr().out
    assert [r.split(",")[0] for r in (tmp_path / "train_log.csv").read_text().splitlines()] == ["step", "1", "2", "3"]
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["step"] == 3


def test_encode_datalist_keeps_layout(work, tmp_path):
    (tmp_path / "data" / "ct").mkdir(parents=True)
    (tmp_path / "data" / "ct" / "a.nii.gz").symlink_to(work / "images" / "case1.nii.gz")
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "ct/a.nii.gz", "modality": "mri_t1"}]}))
    argv = ["-i", str(tmp_path / "list.json"), "--data-base-dir", str(tmp_path / "data"), "-o", str(tmp_path / "out"),
            "--autoencoder", str(work / "ae.pt"), "--network-config", str(work / "tiny.json"), "--multiple", "16",
            "--no-progress"]
    assert encode_main(argv) == 0
    side = json.loads((tmp_path / "out" / "ct" / "a_emb.nii.gz.json").read_text())
    assert side["modality"] == "mri_t1" and side["dim"] == [32, 32, 32] and "label" not in side


def test_lr_schedule():
    from fastmaisi.train.loop import lr_at

    cfg = TrainConfig(out_dir=Path("."), steps=10, lr=1.0, warmup_steps=2, lr_power=2.0)
    assert [round(lr_at(s, cfg), 4) for s in (0, 1, 5, 9)] == [0.5, 0.81, 0.25, 0.01]


def test_sampler_splits_global_batches():
    one = D.GlobalBatchSampler(7, 4, seed=3)
    two = [D.GlobalBatchSampler(7, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(5):
        assert next(it1) == next(it2[0]) + next(it2[1])
    resumed = iter(D.GlobalBatchSampler(7, 4, seed=3, start=2))
    it = iter(one)
    next(it), next(it)
    assert next(it) == next(resumed)


def test_modality_augmentation():
    from fastmaisi.train.trainers import augment_modality

    seeds = torch.arange(4000)
    m = augment_modality(torch.full((4000,), 3), seeds, 0.1)
    assert set(m.tolist()) <= {0, 1, 3}
    assert 0.05 < (m == 1).float().mean() < 0.15 and 0.05 < (m == 0).float().mean() < 0.15
    m = augment_modality(torch.full((4000,), 10), seeds, 0.1)
    assert set(m.tolist()) <= {0, 8, 10}
    assert torch.equal(augment_modality(torch.full((4000,), 10), seeds, 0.1), m)  # per-sample seeds: reproducible


def test_organ_size_vector():
    label = np.zeros((10, 10, 10), np.uint8)
    label[:5] = 200
    label[0, :5] = 1  # liver: 50 voxels of 500 body voxels
    label[1, 0, 0] = 23  # lung tumour
    v = D.organ_size_vector(label)
    assert len(v) == 10 and v[1] == pytest.approx(0.1) and v[5] == pytest.approx(1 / 500) and v[0] == -1.0


# ------------------------------------------------------------------------------------------------- bad inputs
def test_empty_dataset(tmp_path, work, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["diffusion", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--network-config",
            str(work / "tiny.json"), "--steps", "1", "--no-progress"]
    assert train_main(argv) == 2
    assert "no training data" in capsys.readouterr().err


def test_unreadable_volumes_are_counted(tmp_path, work, caplog):
    data = tmp_path / "images"
    data.mkdir()
    for s in range(3):
        (data / f"case{s}.nii.gz").symlink_to(work / "images" / f"case{s}.nii.gz")
    (data / "broken.nii.gz").write_bytes(b"not a nifti file")
    rec = recipe(work, data, ["autoencoder"], patch_size=(24, 24, 24), adv_weight=0.0, max_bad_fraction=0.3)
    with caplog.at_level("WARNING", logger="fastmaisi.train"):
        history, task = fit("vae", rec, tmp_path / "ok", 1)
    assert len(task.dataset) == 3 and "broken.nii.gz" in caplog.text
    rec.max_bad_fraction = 0.1
    with pytest.raises(ValueError, match="1 of 4 volumes are unreadable"):
        fit("vae", rec, tmp_path / "fail", 1)


def test_label_grid_mismatch(tmp_path, work):
    lat = tmp_path / "lat"
    lat.mkdir()
    (lat / "case0_emb.nii.gz").symlink_to(work / "latents" / "case0_emb.nii.gz")
    _save(lat / "small_label.nii.gz", np.zeros((16, 16, 16), np.uint8))
    side = json.loads((work / "latents" / "case0_emb.nii.gz.json").read_text())
    (lat / "case0_emb.nii.gz.json").write_text(json.dumps({**side, "label": "small_label.nii.gz"}))
    rec = recipe(work, lat, ["diffusion_unet", "controlnet"], diffusion=work / "dm.pt")
    with pytest.raises(ValueError, match=r"small_label.nii.gz has shape \(16, 16, 16\), but latent .*case0_emb"):
        fit("controlnet", rec, tmp_path / "o", 1)


def test_resume_from_another_network(tmp_path, work):
    fit("diffusion", recipe(work, work / "latents", ["diffusion_unet"]), tmp_path / "dm", 1)
    rec = recipe(work, work / "latents", ["diffusion_unet", "controlnet"], diffusion=work / "dm.pt")
    with pytest.raises(ValueError, match="written by a 'diffusion' run .* this run trains 'controlnet'"):
        fit("controlnet", rec, tmp_path / "cn", 2, resume=tmp_path / "dm" / "resume.pt")
    wider = recipe(work, work / "latents", [])
    wider.definitions = {"diffusion_unet": dict(TINY["diffusion_unet_def"], num_channels=[8, 16, 16, 16])}
    with pytest.raises(ValueError, match="network definition"):
        fit("diffusion", wider, tmp_path / "dm2", 2, resume=tmp_path / "dm" / "resume.pt")
    with pytest.raises(ValueError, match="not a fastmaisi resume file"):
        fit("diffusion", recipe(work, work / "latents", ["diffusion_unet"]), tmp_path / "dm3", 2,
            resume=tmp_path / "dm" / "diffusion_unet.pt")


def test_cli_usage_errors(capsys, work, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_main(["diffusion", "-i", "x", "-o", "y", "--steps", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train_main(["controlnet", "-i", "x", "-o", "y"])  # --diffusion is required
    assert e.value.code == 2
    argv = ["controlnet", "-i", str(work / "latents"), "-o", str(tmp_path), "--diffusion", str(tmp_path / "nope.pt"),
            "--network-config", str(work / "tiny.json"), "--no-progress"]
    assert train_main(argv) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_official_network_config_resolves():
    config = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs" / "config_network_rflow.json"
    if not config.is_file():
        pytest.skip("shared/reference/configs not beside the checkout")
    import argparse

    from fastmaisi.train.cli import _definitions
    from fastmaisi.variants import get_variant

    args = argparse.Namespace(variant="rflow-ct", network_config=config, recipe="controlnet")
    defs, scheduler = _definitions(args, ("diffusion_unet", "controlnet"))
    ours = get_variant("rflow-ct").definitions()
    for role in defs:
        assert {k: v for k, v in defs[role].items() if k != "_target_"} == \
            {k: v for k, v in ours[role].items() if k != "_target_"}
    assert scheduler["_target_"].endswith("RFlowScheduler")


def test_gradient_checkpointing_modes_reach_the_networks():
    """--gradient-checkpointing full / selective / outer: the UNets take the mode; the autoencoder and ControlNet,
    which know only whole-block recomputation, get True for any."""
    from fastmaisi.train.cli import build_parser, checkpointing_mode
    from fastmaisi.train.trainers import build_net

    flag = {}
    for argv, want in ((["--gradient-checkpointing"], "full"), (["--gradient-checkpointing", "selective"],
                                                                  "selective"),
                      (["--gradient-checkpointing", "outer"], "outer"), ([], None)):
        args = build_parser().parse_args(["diffusion", "-i", "x", "-o", "y", *argv])
        assert args.gradient_checkpointing == want
        flag[want] = checkpointing_mode(args.gradient_checkpointing)
    assert build_net(TINY["diffusion_unet_def"], flag["selective"]).use_checkpointing == "selective"
    assert build_net(TINY["diffusion_unet_def"], flag["outer"]).use_checkpointing == "outer"
    assert build_net(TINY["controlnet_def"], flag["outer"]).use_checkpointing is True
    assert build_net(TINY["mask_generation_diffusion_def"], flag["full"]).use_checkpointing is True
    assert build_net(TINY["autoencoder_def"], flag["selective"]).use_checkpointing is True
    assert build_net(TINY["controlnet_def"], flag["selective"]).use_checkpointing is True
    assert build_net(TINY["diffusion_unet_def"], flag[None]).use_checkpointing is False
