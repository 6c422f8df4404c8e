"""A released checkpoint holds more than weights (Adam state, epoch, loss, num_train_timesteps): loading takes the
state dict, ignores the rest and never reads it into memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmaisi.weights import load_into, load_state_dict_file


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv3d(8, 4, 1))


def _checkpoint(path, net, optimizer_mib: int = 0):
    """What NVIDIA's training saves: the weights beside an Adam state (inflated to `optimizer_mib` MiB if asked)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.randn(1, 4, 6, 6, 6)).square().mean().backward()
    opt.step()
    state = opt.state_dict()
    if optimizer_mib:
        state["state"][99] = {"exp_avg": torch.ones(optimizer_mib << 18), "exp_avg_sq": torch.ones(optimizer_mib << 18)}
    torch.save({"unet_state_dict": net.state_dict(), "optimizer_state_dict": state, "epoch": 250,
                "loss": torch.tensor(0.0123), "num_train_timesteps": 1000, "scale_factor": torch.tensor(1.0125)}, path)


def test_weights_load_and_the_rest_is_ignored(tmp_path, monkeypatch):
    net = _net()
    _checkpoint(tmp_path / "diff_unet.pt", net)
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state_dict, meta = load_state_dict_file(tmp_path / "diff_unet.pt")
    assert seen["weights_only"] is True and seen["mmap"] is True
    assert set(state_dict) == set(net.state_dict())
    assert meta == {"layout": "unet_state_dict", "scale_factor": meta["scale_factor"]}
    assert abs(meta["scale_factor"] - 1.0125) < 1e-6
    fresh = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv3d(8, 4, 1))
    load_into(fresh, tmp_path / "diff_unet.pt")
    x = torch.randn(1, 4, 6, 6, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for the peak memory")
def test_optimizer_state_is_never_read_into_memory(tmp_path):
    """192 MiB of optimizer state beside a few KiB of weights: loading raises the peak resident memory by far less
    (and by the whole file when the checkpoint is read without memory-mapping, which shows the measure works)."""
    _checkpoint(tmp_path / "big.pt", _net(), optimizer_mib=96)
    code = (
        "import json, re, sys\n"
        "import fastmaisi.weights as weights\n"
        "def peak():  # this process's own peak resident memory, KiB (ru_maxrss would carry the parent's over exec)\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "weights.MMAP = sys.argv[2] == '1'\n"
        "before = peak()\n"
        "sd, meta = weights.load_state_dict_file(sys.argv[1])\n"
        "print(json.dumps({'grew_kib': peak() - before, 'n': len(sd)}))\n"
    )
    grew = {}
    for mmap in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.pt"), mmap], capture_output=True,
                             text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["n"] == 6
        grew[mmap] = result["grew_kib"] / 1024
    assert grew["1"] < 48 and grew["0"] > 150, grew  # MiB
