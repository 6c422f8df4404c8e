"""`fastmaisi eval`: Frechet distance, the 2.5D FID recipe, the ResNet-50 layouts, reconstruction metrics, the quality
table and the CLI. Small volumes and a narrow (width-8) ResNet-50 keep everything fast on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastmaisi.evaluation import fid, recon
from fastmaisi.evaluation.cli import eval_main
from fastmaisi.evaluation.quality import find_pairs, format_report, quality_report
from fastmaisi.evaluation.resnet import ResNet50, layout_of, resnet50_from_file
from fastmaisi.evaluation.volumes import list_volumes, pad_crop
from fastmaisi.weights import CheckpointError


def _write(path: Path, array: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return path


def _phantom(rng: np.random.Generator, n: int = 32) -> np.ndarray:
    """An ellipsoid 'body' at 40 HU with noise, in air; a different random shape per call."""
    x = np.linspace(-1, 1, n)
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    r = rng.uniform(0.4, 0.7, 3)
    body = (X / r[0]) ** 2 + (Y / r[1]) ** 2 + (Z / r[2]) ** 2 < 1
    return (np.where(body, 40.0, -900.0) + 30 * rng.standard_normal((n, n, n))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return ResNet50("torchvision", width=8).eval()


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(0)
    return [_phantom(rng) for _ in range(2)], rng.standard_normal((32, 32, 32)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ Frechet distance
def _closed_form(mu1, s1, mu2, s2) -> float:
    """Tr sqrt(S1 S2) from an eigendecomposition: sqrt(S1) = V sqrt(L) V^T, then eig of sqrt(S1) S2 sqrt(S1)."""
    lam, vec = np.linalg.eigh(s1)
    r = vec @ np.diag(np.sqrt(lam)) @ vec.T
    tr = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_closed_form(method):
    rng = np.random.default_rng(1)
    for d in (1, 5, 32):
        a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        want = _closed_form(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(want, rel=1e-8, abs=1e-8)
    # commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    va, vb = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    got = fid.frechet_distance(np.zeros(8), np.diag(va), np.ones(8), np.diag(vb), method=method)
    assert got == pytest.approx(8 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum(), rel=1e-10)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # inside MONAI
def test_fid_from_features_matches_monai():
    monai_fid = pytest.importorskip("monai.metrics").FIDMetric
    rng = np.random.default_rng(2)
    real = torch.from_numpy(rng.standard_normal((200, 24)))
    fake = torch.from_numpy(rng.standard_normal((150, 24)) * 1.2 + 0.3)
    want = float(monai_fid()(fake, real))
    assert fid.fid_from_features(real, fake) == pytest.approx(want, rel=1e-9)
    assert fid.fid_from_features(real, fake, method="eigh") == pytest.approx(want, rel=1e-9)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes do not agree"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="unknown Frechet distance method"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(ValueError, match="N >= 2"):
        fid.fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------------- 2.5D recipe
def test_center_slices_and_planes_follow_the_reference():
    assert fid.center_range(512, 0.4) == range(153, 358)  # floor(0.3 N) .. floor(0.7 N) - 1
    assert fid.center_range(32, 0.4) == range(9, 22)
    assert fid.center_range(10, 1.0) == range(10)
    v = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    xy, yz, zx = (fid.plane_slices(v, p, None) for p in fid.PLANES)
    assert xy.shape == (6, 4, 5) and torch.equal(xy[2], v[:, :, 2])  # XY: along the 3rd axis, (X, Y)
    assert yz.shape == (4, 5, 6) and torch.equal(yz[1], v[1])  # YZ: along the 1st axis, (Y, Z)
    assert zx.shape == (5, 4, 6) and torch.equal(zx[3], v[:, 3, :])  # ZX: along the 2nd axis, (X, Z)


def test_slice_normalisation_is_joint_min_max_then_bgr_means():
    class Extremes(torch.nn.Module):  # per-slice, per-channel (min, max) of the network input
        def forward(self, x):
            return torch.cat([x.amin(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    slices = torch.stack([torch.full((4, 4), -500.0), torch.linspace(-1000, 1000, 16).reshape(4, 4)])
    out = fid.slice_features(slices, Extremes(), batch_size=1)
    means = torch.tensor(fid.BGR_MEANS)
    torch.testing.assert_close(out[0, :3], 0.25 - means)  # -500 in [-1000, 1000] -> 0.25 over the whole plane
    torch.testing.assert_close(out[1, :3], -means)
    torch.testing.assert_close(out[1, 3:], 1.0 - means, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,target", [((5, 8, 3), (4, 4, 4)), ((7, 6, 9), (10, 3, 8)), ((6, 6, 6), (3, 6, 5))])
def test_pad_crop_matches_monai(shape, target):
    transforms = pytest.importorskip("monai.transforms")
    v = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    want = transforms.CenterSpatialCrop(target)(transforms.SpatialPad(target, value=-1000)(v[None]))[0]
    assert torch.equal(pad_crop(v, target, -1000.0), torch.as_tensor(want))


def test_fid_self_zero_and_monotone_in_perturbation(tmp_path, tiny_net, volumes):
    vols, noise = volumes
    real = [_write(tmp_path / "real" / f"case{i}.nii.gz", v) for i, v in enumerate(vols)]
    _write(tmp_path / "real" / "case0_label.nii.gz", np.zeros((32, 32, 32), np.uint8))  # skipped by list_volumes
    assert list_volumes(tmp_path / "real") == real
    same = fid.fid_2p5d(real, real, tiny_net, batch_size=16)
    feats = fid.dataset_features(real, tiny_net, fid.FidSettings(), device=torch.device("cpu"))
    for plane in fid.PLANES:
        assert same["slices"][plane] == {"real": 26, "fake": 26}  # 13 central slices of 32, two volumes
        scale = 2 * np.trace(np.cov(feats[plane].double().numpy(), rowvar=False))
        assert abs(same[plane]) < 1e-6 * scale
    # a growing perturbation gives a growing FID (features of preprocessed volumes; no files needed)
    settings, cpu = fid.FidSettings(), torch.device("cpu")

    def features(arrays):
        per = [fid.volume_features(fid.preprocess(a, (1, 1, 1), settings, cpu), tiny_net, 0.4, 32) for a in arrays]
        return {p: torch.cat([f[p] for f in per]) for p in fid.PLANES}

    base = features(vols)
    means = [np.mean([fid.fid_from_features(base[p], f[p], method="eigh") for p in fid.PLANES])
             for f in (features([v + s * noise for v in vols]) for s in (0, 20, 60, 180))]
    assert abs(means[0]) < 1e-3 * means[1]
    assert all(a < b for a, b in zip(means, means[1:])), means


def test_feature_cache_is_reused_and_keyed(tmp_path, tiny_net, volumes):
    path = _write(tmp_path / "v.nii.gz", volumes[0][0])
    kwargs = dict(device=torch.device("cpu"), cache_dir=tmp_path / "cache", net_id="a")
    first = fid.dataset_features([path], tiny_net, fid.FidSettings(), **kwargs)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    torch.save({p: f * 0 for p, f in first.items()}, files[0])  # a planted value proves the cache is read
    assert float(fid.dataset_features([path], tiny_net, fid.FidSettings(), **kwargs)["XY"].abs().sum()) == 0
    other = fid.dataset_features([path], tiny_net, fid.FidSettings(center_slices_ratio=0.2), **kwargs)
    assert other["XY"].shape[0] == 7 and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_resample_and_target_shape(tiny_net):
    v = np.full((20, 16, 10), 50.0, np.float32)
    out = fid.preprocess(v, (1.0, 1.0, 2.0), fid.FidSettings(spacing=(2.0, 2.0, 2.0), target_shape=(12, 6, 8)),
                         torch.device("cpu"))
    assert out.shape == (12, 6, 8)
    assert float(out[0, 0, 0]) == -1000.0 and float(out[6, 3, 4]) == 50.0  # padded with air, interior kept


# ------------------------------------------------------------------------------------------------------ ResNet-50
def test_resnet50_torchvision_layout():
    net = ResNet50("torchvision")
    sd = net.state_dict()
    assert len(sd) == 320  # torchvision.models.resnet50().state_dict(): 53 convs, 53 BN x 5 entries, fc weight+bias
    assert sum(p.numel() for p in net.parameters()) == 25_557_032  # torchvision's published count
    assert list(sd)[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                            "bn1.num_batches_tracked"]
    assert list(sd)[-2:] == ["fc.weight", "fc.bias"]
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
              "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.running_var": (256,),
              "layer2.0.conv2.weight": (128, 128, 3, 3), "layer3.5.bn3.weight": (1024,),
              "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (1000, 2048)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.endswith("downsample.0.weight") for k in sd) == 4 and not any(k.endswith("conv1.bias") for k in sd)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # v1.5: stride on 3x3
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 2048)


def test_resnet50_radimagenet_layout():
    net = ResNet50("radimagenet")
    sd = net.state_dict()
    assert len(sd) == 371 and "fc.weight" not in sd  # Keras-converted: conv biases, no head
    assert "conv1.bias" in sd and "layer1.0.downsample.0.bias" in sd
    assert sum(p.numel() for p in net.parameters()) == 23_534_592  # Keras ResNet50 (no top): trainable parameters
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    assert net.bn1.eps == pytest.approx(1.001e-5)
    assert layout_of(sd) == ("radimagenet", 64, 0)


@pytest.mark.parametrize("layout,ext", [("torchvision", ".pth"), ("radimagenet", ".safetensors")])
def test_resnet50_from_file_loads_strictly(tmp_path, layout, ext):
    torch.manual_seed(3)
    net = ResNet50(layout, width=8).eval()
    sd = net.state_dict()
    path = tmp_path / f"w{ext}"
    if ext == ".safetensors":  # some converters drop num_batches_tracked: filled with 0
        save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    else:
        torch.save(sd, path)
    loaded = resnet50_from_file(path)
    assert loaded.layout == layout and loaded.num_features == 256 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x))
    torch.save({k: v for k, v in sd.items() if k != "layer1.0.bn2.weight"}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="layer1.0.bn2.weight"):
        resnet50_from_file(tmp_path / "broken.pth")
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a ResNet-50"):
        resnet50_from_file(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------- reconstruction metrics
def test_recon_metrics_identical_and_degrading():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.uniform(0, 1, (24, 20, 16)))
    a = torch.nn.functional.avg_pool3d(a[None, None], 3, 1, 1)[0, 0]  # some local structure
    assert recon.psnr(a, a, 1.0) == float("inf")
    assert recon.ssim3d(a, a, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert recon.mae(a, a.numpy()) == 0.0
    noisy = [(a + s * torch.from_numpy(rng.standard_normal(a.shape))).clamp(0, 1) for s in (0.01, 0.05, 0.2)]
    psnrs = [recon.psnr(a, b, 1.0) for b in noisy]
    ssims = [recon.ssim3d(a, b, 1.0) for b in noisy]
    maes = [recon.mae(a, b) for b in noisy]
    assert psnrs[0] > psnrs[1] > psnrs[2] and 1 > ssims[0] > ssims[1] > ssims[2] and maes[0] < maes[1] < maes[2]
    mse = float(((a - noisy[1]) ** 2).mean())
    assert psnrs[1] == pytest.approx(10 * np.log10(1 / mse))
    # PSNR on HU with data range 2000 is PSNR on [0, 1]; SSIM is scale- but not offset-invariant (luminance term)
    assert recon.psnr(a * 2000 - 1000, noisy[1] * 2000 - 1000, 2000.0) == pytest.approx(psnrs[1])
    assert recon.ssim3d(a * 2000, noisy[1] * 2000, 2000.0) == pytest.approx(ssims[1], rel=1e-9)


def test_ssim3d_matches_monai():
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(5)
    a = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 30, 26, 22, generator=torch.Generator().manual_seed(5)),
                                       3, 1, 1)[0, 0]
    for s in (0.02, 0.1):
        b = (a + s * torch.from_numpy(rng.standard_normal(a.shape)).float()).clamp(0, 1)
        m = metrics.SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)
        want = float(m(b[None, None], a[None, None]))
        assert recon.ssim3d(a, b, 1.0, slab=5) == pytest.approx(want, abs=2e-5)


def test_evaluate_reconstruction_with_injected_model(tmp_path, volumes):
    paths = [_write(tmp_path / f"c{i}.nii.gz", v) for i, v in enumerate(volumes[0])]
    exact = recon.evaluate_reconstruction(paths, lambda x: x)
    assert [r["file"] for r in exact["volumes"]] == ["c0.nii.gz", "c1.nii.gz"]
    assert exact["mean"] == {"psnr": float("inf"), "ssim": pytest.approx(1.0), "mae_hu": 0.0}
    shifted = recon.evaluate_reconstruction(paths, lambda x: x + 0.01)  # +20 HU everywhere (clipped at 1000 HU)
    assert shifted["mean"]["mae_hu"] == pytest.approx(20.0, rel=1e-3)
    assert shifted["mean"]["psnr"] == pytest.approx(10 * np.log10(1 / 1e-4), rel=1e-3)


def test_recon_cli_through_the_tiled_vae(tmp_path, volumes, capsys):
    from fastmaisi.nets.autoencoder import AutoencoderKlMaisi

    tiny = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[8, 16, 16],
                num_res_blocks=[1, 1, 1], norm_num_groups=4, attention_levels=[False, False, False])
    config = tmp_path / "net.json"
    config.write_text(json.dumps({"autoencoder_def": {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi", **tiny}}))
    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(**tiny).eval()
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    data = tmp_path / "data"
    _write(data / "a.nii.gz", volumes[0][0][:, :30, :26])  # sides not multiples of 4: padded, then cropped
    out = tmp_path / "recon.json"
    rc = eval_main(["recon", "--vae", str(tmp_path / "vae.safetensors"), "--network-config", str(config),
                    "--data", str(data), "--device", "cpu", "--json", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    row = report["volumes"][0]
    assert row["shape"] == [32, 30, 26] and 0 < row["ssim"] < 1 and row["mae_hu"] > 0
    # the tiled path equals the plain whole-volume reconstruction of the padded volume
    x = recon.hu_to_unit(torch.from_numpy(volumes[0][0][:, :30, :26]))[None, None]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1, 0, 0))
    with torch.no_grad():
        want = vae.reconstruct(padded)[:, :, :, 1:31, 1:27].clamp(0, 1)[0, 0]
    assert row["psnr"] == pytest.approx(recon.psnr(x[0, 0], want, 1.0), rel=1e-4)
    assert "PSNR dB" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------------- quality
class _Result:
    def __init__(self, medians, failed):
        self.medians, self.failed, self.passed = medians, failed, not failed


def test_quality_report_table_and_pairs(tmp_path):
    for stem, hu in (("s0", 60.0), ("s1", 900.0)):
        _write(tmp_path / f"{stem}_image.nii.gz", np.full((4, 4, 4), hu, np.int16))
        _write(tmp_path / f"{stem}_label.nii.gz", np.ones((4, 4, 4), np.uint8))
    _write(tmp_path / "lonely_image.nii.gz", np.zeros((4, 4, 4), np.int16))

    def check(image, label):
        med = float(np.median(image[label == 1]))
        return _Result({"liver": med, "brain": None}, [] if med < 200 else ["liver"])

    report = quality_report(tmp_path, check=check)
    assert [r["stem"] for r in report["volumes"]] == ["s0", "s1"] and report["unpaired"] == ["lonely_image.nii.gz"]
    assert report["volumes"][1] == {"stem": "s1", "passed": False, "failed": ["liver"],
                                    "medians": {"liver": 900.0, "brain": None}}
    assert (report["passed"], report["total"], report["pass_rate"]) == (1, 2, 0.5)
    table = format_report(report)
    assert "FAIL" in table and "passed 1/2 (50.0%)" in table and "lonely_image.nii.gz" in table
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no <stem>_image"):
        find_pairs(tmp_path / "empty")


def test_quality_cli_with_the_real_check(tmp_path, capsys):
    labels = pytest.importorskip("fastmaisi.labels")
    liver = labels.QC_ORGAN_GROUPS["liver"][0]
    low, high = labels.qc_thresholds()["liver"]
    for stem, hu in (("ok", (low + high) / 2), ("bad", high + 100)):
        image = np.full((6, 6, 6), -1000, np.int16)
        image[2:4, 2:4, 2:4] = int(hu)
        label = np.zeros((6, 6, 6), np.uint8)
        label[2:4, 2:4, 2:4] = liver
        _write(tmp_path / f"{stem}_image.nii.gz", image)
        _write(tmp_path / f"{stem}_label.nii.gz", label)
    out = tmp_path / "qc.json"
    assert eval_main(["quality", str(tmp_path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["stem"]: r["passed"] for r in report["volumes"]} == {"bad": False, "ok": True}
    assert report["volumes"][0]["failed"] == ["liver"] and report["pass_rate"] == 0.5
    assert "passed 1/2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------ CLI
def test_fid_cli_missing_weights_is_one_line(tmp_path, capsys):
    assert eval_main(["fid", "--real", str(tmp_path), "--fake", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights FILE is required" in err[0] and "nothing is downloaded" in err[0]
    assert eval_main(["fid", "--real", str(tmp_path), "--fake", str(tmp_path), "--weights", "nope.pth"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["recon", "--data", str(tmp_path)]) == 2
    assert "--vae WEIGHTS is required" in capsys.readouterr().err
    assert eval_main(["quality", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no <stem>_image" in err[0]


def test_fid_cli_end_to_end(tmp_path, tiny_net, volumes, capsys):
    vols, noise = volumes
    for i, v in enumerate(vols):
        _write(tmp_path / "real" / f"r{i}.nii.gz", v)
        _write(tmp_path / "fake" / f"f{i}_image.nii.gz", v + 60 * noise)
    torch.save(tiny_net.state_dict(), tmp_path / "resnet.pth")
    out = tmp_path / "fid.json"
    rc = eval_main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--weights",
                    str(tmp_path / "resnet.pth"), "--device", "cpu", "--batch-size", "8", "--json", str(out), "-q",
                    "--cache", str(tmp_path / "cache"), "--frechet-method", "eigh"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert set(report["fid"]) == {"XY", "YZ", "ZX", "mean"} and report["fid"]["mean"] > 1
    assert report["fid"]["mean"] == pytest.approx(sum(report["fid"][p] for p in fid.PLANES) / 3)
    assert report["features"]["dim"] == 256 and report["real"]["volumes"] == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4
    assert "mean" in capsys.readouterr().out
