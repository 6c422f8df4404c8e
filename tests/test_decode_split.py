"""fastmaisi.decode.split: the decode split along D (several devices of one process, or gloo processes) equals the
whole-volume `vae.decode`."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastmaisi.decode import decode_latent
from fastmaisi.decode import split
from fastmaisi.decode.split import _band
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi

sys.path.insert(0, os.path.dirname(__file__))
from test_decode import TINY, TINY_MASK, _randomised, _rel  # noqa: E402
from test_generate import run, weights  # noqa: E402,F401  (a tiny weights folder; the CLI runner)

SHAPE = (1, 4, 11, 7, 9)  # odd sizes: the bands do not line up across resolutions (latent 11 rows, image 44)


def _nets():
    return {"vae": _randomised(AutoencoderKlMaisi(**TINY)), "mask_vae": _randomised(AutoencoderKlMaisi(**TINY_MASK), 1)}


def _latent(shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


SLAB_VOXELS = 3 * 28 * 36  # three rows of the 44x28x36 image per slab: 15 slabs per part (5 with 3 parts) or more
BUDGET = 64 << 20


@pytest.fixture(autouse=True)
def _thin_slabs(monkeypatch):
    monkeypatch.setattr(split, "_SLAB_VOXELS", SLAB_VOXELS)


def _check_slabs(plan, parts: int) -> None:
    slabs = [-(-(b - a) // r) for (a, b), r in zip(plan.bands, plan.slab_rows)]
    assert len(slabs) == parts and min(slabs) >= 4 and sum(slabs) >= 8, slabs


@pytest.fixture(scope="module")
def nets():
    return _nets()


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("net", ["vae", "mask_vae"])
def test_in_process_split_equals_whole_volume(nets, net, parts):
    vae, z = nets[net], _latent()
    with torch.no_grad():
        ref = vae.decode(z)
    y, plan = decode_latent(vae, z, BUDGET, devices=["cpu"] * parts, return_plan=True)
    _check_slabs(plan, parts)
    assert _rel(y, ref) < 1e-5
    assert len(plan.bands) == parts and plan.bands[0][0] == 0 and plan.bands[-1][1] == ref.shape[2]
    assert "rows" in plan.describe() and "estimated peak" in str(plan)


def _least_budget(vae, parts: int, where: str) -> int:
    """The least budget (from a ladder of 10 % steps) that the split planner accepts when it may move activations
    off the device only to `where` (recomputed or host); the plan does so."""
    split._OFF_DEVICE = (where,)
    budget = 1 << 16
    while True:
        try:
            plan = split.plan_split(SHAPE, ["cpu"] * parts, budget, torch.float32, vae)
        except ValueError:
            budget = int(budget * 1.1)
            continue
        assert where in plan._place
        assert (plan.host_bytes[0] > 0 and "of host memory" in str(plan)) == (where == "host")
        return budget


@pytest.mark.parametrize("where", ["host", "recompute"])
@pytest.mark.parametrize("net", ["vae", "mask_vae"])
def test_off_device_bands_are_exact(nets, net, where, monkeypatch):
    """Under a budget too small for every band on the device, the largest activations are recomputed when read or
    kept in host memory: the same result."""
    monkeypatch.setattr(split, "_OFF_DEVICE", split._OFF_DEVICE)
    vae, z = nets[net], _latent()
    with torch.no_grad():
        ref = vae.decode(z)
    y = decode_latent(vae, z, _least_budget(vae, 2, where), devices=["cpu", "cpu"])
    assert _rel(y, ref) < 1e-5


def test_bands_cover_the_axis_once():
    for n in (1, 2, 11, 44, 97):
        for parts in (1, 2, 3, 5):
            bands = [_band(n, p, parts) for p in range(parts)]
            assert bands[0][0] == 0 and bands[-1][1] == n
            assert all(b0[1] == b1[0] for b0, b1 in zip(bands, bands[1:]))
            assert max(b - a for a, b in bands) - min(b - a for a, b in bands) <= 1


def test_more_parts_than_latent_rows(nets):
    """Empty bands at the latent level (2 rows, 3 parts) still give the whole-volume decode."""
    vae, z = nets["vae"], _latent((2, 4, 2, 5, 3))
    with torch.no_grad():
        ref = vae.decode(z)
    assert _rel(decode_latent(vae, z, devices=["cpu"] * 3), ref) < 1e-5


def test_a_budget_too_small_for_the_bands_says_so(nets):
    with pytest.raises(ValueError, match="too small for a split decode"):
        decode_latent(nets["vae"], _latent(), 1 << 12, devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="devices of one kind"):
        decode_latent(nets["vae"], _latent(), devices=["cpu", "cuda:0"])


def _worker(rank: int, world: int, init: str, net: str, out: str, where: str | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    split._SLAB_VOXELS = SLAB_VOXELS
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        vae = _nets()[net]
        budget = _least_budget(vae, world, where) if where else BUDGET
        y, plan = decode_latent(vae, _latent(), budget, group=dist.group.WORLD, return_plan=True)
        _check_slabs(plan, world)
        assert set(plan._place) - {"GPU"} == ({where} if where else set())
        assert plan.devices[rank] == f"rank {rank} (cpu)" and f"rank {(rank + 1) % world}:" in str(plan)
        torch.save(y, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("net,world,where", [("vae", 2, None), ("mask_vae", 3, None), ("vae", 2, "host"),
                                             ("mask_vae", 2, "recompute")])
def test_gloo_processes_split_equals_whole_volume(tmp_path, nets, net, world, where):
    vae, z = nets[net], _latent()
    with torch.no_grad():
        ref = vae.decode(z)
    mp.start_processes(_worker, args=(world, f"file://{tmp_path / 'rendezvous'}", net, str(tmp_path / "y"), where),
                       nprocs=world, join=True, start_method="fork")  # fork: no re-import of torch per process
    for rank in range(world):  # every rank returns the whole volume
        assert _rel(torch.load(tmp_path / f"y.{rank}"), ref) < 1e-5


def test_generate_decode_devices_option(weights, tmp_path, capsys):
    """`generate --decode-devices cpu,cpu`: the same volume as the one-device decode; --dry-run prints the split;
    a device the machine lacks: exit 2, one line, nothing written."""
    import nibabel as nib
    import numpy as np

    assert run(weights, tmp_path / "one", "--device", "cpu") == 0
    assert run(weights, tmp_path / "two", "--device", "cpu", "--decode-devices", "cpu,cpu") == 0
    name = "sample_000000_image.nii.gz"
    a = np.asarray(nib.load(tmp_path / "one" / name).dataobj).astype(int)
    b = np.asarray(nib.load(tmp_path / "two" / name).dataobj).astype(int)
    assert a.std() > 0 and np.abs(a - b).max() <= 1  # fp32, then rounded to whole HU
    record = json.loads((tmp_path / "two" / "sample_000000_record.json").read_text())
    assert "split along D over 2 parts" in record["decode_plan"]
    capsys.readouterr()
    assert run(weights, tmp_path / "dry", "--device", "cpu", "--decode-devices", "cpu,cpu", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "split along D over 2 parts" in text and "cpu: rows 0-" in text and not (tmp_path / "dry").exists()
    assert run(weights, tmp_path / "bad", "--device", "cpu", "--decode-devices", "cuda:7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decode-devices" in err[0] and not (tmp_path / "bad").exists()
    if torch.cuda.is_available():
        assert run(weights, tmp_path / "mix", "--decode-devices", "cpu,cuda:0") == 2
        assert "one kind" in capsys.readouterr().err and not (tmp_path / "mix").exists()
