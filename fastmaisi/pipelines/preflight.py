"""Check before compute: the planners' memory estimate against the device (GPU memory, or RAM on a CPU) and the
outputs' size against free disk space, so that a run too big for this machine is refused in one line instead of
swapping, being killed, or failing after the whole compute."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

_GiB = 1 << 30
CPU_OVERHEAD = 1 * _GiB  # the Python process, torch's runtime and the buffers the estimates leave out
CUDA_FACTOR = 1.2  # allocator rounding and cuDNN workspaces on top of the counted activations (see estimate.py)


def _gib(n: float) -> str:
    return f"{n / _GiB:.1f} GiB" if n >= _GiB / 10 else f"{n / (1 << 20):.0f} MiB"


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (what a new allocation can take without swapping), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(folder: str | os.PathLike) -> int | None:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def output_bytes(size, workflow: str, num_samples: int) -> int:
    """An upper bound of what the outputs take on disk: int16 image and uint8 label map uncompressed (NIfTI's gzip
    and the SEG's bits take less), previews and records (a few hundred KiB)."""
    voxels = math.prod(size)
    return num_samples * (voxels * (2 + (workflow != "image")) + (1 << 20))


@dataclass
class ResourceCheck:
    """The memory estimate and what the machine has; `refusal()` is the one-line reason not to start, or None."""

    device: str
    memory_bytes: int
    memory_available: int | None
    disk_bytes: int
    disk_free: int | None
    advice: str = ""
    costs: dict = field(default_factory=dict, repr=False)  # estimate.sampling_costs, reused by the dry run's plan

    @property
    def fits_memory(self) -> bool:
        return self.memory_available is None or self.memory_bytes <= self.memory_available

    @property
    def fits_disk(self) -> bool:
        return self.disk_free is None or self.disk_bytes <= self.disk_free

    @property
    def where(self) -> str:
        return "GPU memory" if self.device.startswith("cuda") else "RAM"

    def describe(self) -> str:
        have = "unknown" if self.memory_available is None else _gib(self.memory_available)
        disk = "unknown" if self.disk_free is None else _gib(self.disk_free)
        verdict = ("fits" if self.fits_memory and self.fits_disk
                   else "DOES NOT FIT: the run would be refused (--force to try anyway)")
        return (f"Resources: about {_gib(self.memory_bytes)} of {self.where} needed, {have} available; outputs up to "
                f"{_gib(self.disk_bytes)} on disk, {disk} free: {verdict}.")

    def refusal(self) -> str | None:
        if not self.fits_memory:
            return (f"this run needs about {_gib(self.memory_bytes)} of {self.where} and {self.device} has "
                    f"{_gib(self.memory_available)} available{self.advice}; --force tries anyway, --dry-run shows "
                    "the plan")
        if not self.fits_disk:
            return (f"the outputs need up to {_gib(self.disk_bytes)} and the output folder's disk has "
                    f"{_gib(self.disk_free)} free; free space or choose another folder (--force tries anyway)")
        return None


def check_resources(variant, workflow: str, opts: dict, device, budget: int | None, out_dir: str,
                    num_samples: int, decode_plan) -> ResourceCheck:
    """Estimate the peak memory of one sample (the networks' weights + the largest stage: a sampling step's
    activations, or the decode's plan + the volume's copies) and compare it with what `device` has."""
    import torch

    from fastmaisi.nets import build
    from fastmaisi.pipelines.estimate import sampling_costs, weight_bytes

    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    costs = sampling_costs(variant, workflow, opts, device)
    defs = variant.definitions()
    with torch.device("meta"):
        vaes = [build(defs[r]) for r in ("autoencoder", "mask_autoencoder") if r in defs and
                (r == "autoencoder" or workflow == "paired")]
    weights = sum(c[1] for c in costs.values()) + weight_bytes(*vaes, dtype=dtype)
    sampling = max(c[0].activation_bytes for c in costs.values())
    voxels = math.prod(opts["size"])
    if cuda:
        # the decode plans itself into the free memory (or the budget), so the sampling loop is what can fail
        need = weights + int(sampling * CUDA_FACTOR)
        have = torch.cuda.mem_get_info(device)[0]
        scalable = int(sampling * CUDA_FACTOR)
    else:
        volume = voxels * (4 + 4 + 2 + 1)  # the decoded float volume, its HU copy, the int16 image and the label
        decode = decode_plan.peak_bytes + volume
        if budget is not None:  # on a CPU the budget bounds a slab's working set; the stored activations stay in RAM
            decode += 3 * voxels * defs["autoencoder"]["num_channels"][0] * 4
        need = weights + CPU_OVERHEAD + max(sampling, decode)
        have = available_ram()
        scalable = max(sampling, decode)
    check = ResourceCheck(str(device), int(need), have, output_bytes(opts["size"], workflow, num_samples),
                          free_disk(out_dir), costs=costs)
    if have is not None and need > have:
        check.advice = _advice(opts["size"], need - scalable, scalable, have)
    return check


def _advice(size, fixed: int, scalable: int, have: int) -> str:
    """What would fit: the largest cube (a multiple of 32) whose activations, scaled by voxels, fit."""
    room = have - fixed
    side = int(math.prod(size) ** (1 / 3) * (room / scalable) ** (1 / 3)) // 32 * 32 if room > 0 else 0
    return f" (about --size {side} {side} {side} would fit)" if side >= 32 else " (no size would fit)"
