"""GPU check of `fastmaisi eval`: 2.5D FID feature extraction at 512^3 (chunked vs the reference's one-batch
forward), the Frechet distance at 2048-d (sqrtm vs eigh), and VAE reconstruction metrics through the tiled VAE.

Random weights (the numbers are timings and memory, not FIDs). One JSON line per measurement; writes
$OUT/bench_eval.json when OUT is set.

Run (device tool):  python3 bench/bench_eval.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fastmaisi.evaluation import fid, recon
from fastmaisi.evaluation.resnet import ResNet50

GiB = 1 << 30
dev = torch.device("cuda")
results = []


def emit(d):
    print(json.dumps(d), flush=True)
    results.append(d)


def phantom(n: int, seed: int) -> np.ndarray:
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.linspace(-1, 1, n, device=dev)
    X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
    body = (X / 0.8) ** 2 + (Y / 0.6) ** 2 < 1
    v = torch.where(body, 40.0, -1000.0) + 20 * torch.randn(n, n, n, generator=g, device=dev)
    return v.clamp(-1024, 3000).short().cpu().numpy()


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, round(time.perf_counter() - t, 3), round((torch.cuda.max_memory_allocated() - base) / GiB, 2)


def torchvision_parity():
    """Our torchvision-layout ResNet-50 loads torchvision's resnet50 state dict strictly and matches its features."""
    try:
        import torchvision
    except ImportError:
        emit({"what": "torchvision_parity", "skipped": "torchvision not installed"})
        return
    from fastmaisi.weights import load_into

    torch.manual_seed(1)
    ref = torchvision.models.resnet50().eval()
    with torch.no_grad():  # non-trivial BN statistics so that the comparison sees them
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours = ResNet50("torchvision")
    n_keys = len(ref.state_dict())
    load_into(ours, ref.state_dict())
    ref.fc = torch.nn.Identity()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        a, b = ours.eval()(x), ref(x)
    emit({"what": "torchvision_parity", "keys": n_keys, "max_abs": float((a - b).abs().max()),
          "max_ref": float(b.abs().max())})


def main():
    torchvision_parity()
    torch.manual_seed(0)
    net = ResNet50("radimagenet").to(dev).eval()
    tmp = Path(tempfile.mkdtemp())
    vol = phantom(512, 0)
    path = tmp / "v.nii"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 1.0, 1.0])), path)

    # 1. features of one 512^3 volume: chunked (ours) vs all central slices at once (the reference)
    v = fid.preprocess(vol, (1, 1, 1), fid.FidSettings(), dev)
    fid.slice_features(fid.plane_slices(v, "XY", 0.4)[:8], net, 8)  # warm-up (cuDNN autotune, allocator)
    xy = None
    for bs in (16, 32, 64, 205):
        try:
            feats, s, peak = timed(lambda: fid.volume_features(v, net, 0.4, bs))
            emit({"what": "fid_features_512", "batch_size": bs, "slices": sum(len(f) for f in feats.values()),
                  "s": s, "peak_GiB": peak, "reference_like": bs == 205})
            xy = feats["XY"].double().numpy()
        except torch.OutOfMemoryError:
            emit({"what": "fid_features_512", "batch_size": bs, "error": "OOM"})
        torch.cuda.empty_cache()

    # 2. whole pipeline from a file (read, RAS, clip, 3 planes) for one volume
    _, s, peak = timed(lambda: fid.dataset_features([path], net, fid.FidSettings(), device=dev, batch_size=32))
    emit({"what": "fid_volume_from_file_512", "s": s, "peak_GiB": peak})

    # 3. Frechet distance at 2048-d, 615 vs 615 slices (one 512^3 volume per set), on this machine's CPUs
    rng = np.random.default_rng(0)
    a = xy if xy is not None else rng.standard_normal((205, 2048))
    f1 = np.concatenate([a, a + 0.01 * rng.standard_normal(a.shape)])
    f2 = f1 + 0.05 * rng.standard_normal(f1.shape)
    for method in ("eigh", "sqrtm"):
        t = time.perf_counter()
        d = fid.fid_from_features(f1, f2, method=method)
        emit({"what": "frechet_2048", "method": method, "fid": d, "s": round(time.perf_counter() - t, 2),
              "cpus": os.cpu_count()})

    # 4. VAE reconstruction metrics through the tiled encode/decode (MAISI VAE, random weights, fp16)
    from fastmaisi.nets import build
    from fastmaisi.variants import image_autoencoder_def

    vae = build(image_autoencoder_def()).to(device=dev, dtype=torch.float16).eval().requires_grad_(False)
    for shape in ((256, 256, 128), (512, 512, 128)):
        rpath = tmp / f"r{shape[0]}.nii"
        nib.save(nib.Nifti1Image(phantom(shape[0], 1)[:, :, : shape[2]].copy(), np.eye(4)), rpath)
        for budget in (None, 8 * GiB):
            rec = recon.vae_reconstructor(vae, memory_budget_bytes=budget)
            out, s, peak = timed(lambda: recon.evaluate_reconstruction([rpath], rec, device=dev))
            emit({"what": "recon_metrics", "shape": shape, "budget_GiB": None if budget is None else budget / GiB,
                  "s": s, "peak_GiB": peak, "metrics": out["mean"]})
            torch.cuda.empty_cache()
    t = time.perf_counter()
    x = torch.rand(512, 512, 512, device=dev)
    s3 = recon.ssim3d(x, x.clamp(0.1, 0.9), 1.0)
    torch.cuda.synchronize()
    emit({"what": "ssim3d_512", "s": round(time.perf_counter() - t, 3), "ssim": s3})

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_eval.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
