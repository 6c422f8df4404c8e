"""Benchmark of the paired workflow's mask post-process: ours on the host (fastmaisi.pipelines.mask_postprocess, with
its thread pool and with one thread) against its previous implementation (tests/mask_postprocess_oracle.py: scipy
binary morphology, one labelling per organ, one thread), on the same label maps, checking they agree voxel for voxel;
with --device cuda also the tensor path on the GPU (fastmaisi.pipelines.mask_postprocess_torch, the map already on
the GPU, timed to a synchronise), checked against the host path.

Maps (--size^3, a multiple of 64): the 64^3 phantom upsampled by repetition, then
  islands  boundary jitter (15 % of the voxels take a face neighbour's label) and 200 stray islands of 1-27 voxels
           of random labels: like a trained generator's raw output;
  salt     the same plus 1 % salt noise of 21 labels: every organ is everywhere (the worst case for per-organ boxes);
each with no tumour, a lung tumour (23) and a hepatic tumour (26) requested (a 5^3 tumour in the lung / liver).

Time: wall clock, the best of --repeats (the previous implementation: once). Writes one JSON to OUT.

    python3 bench/bench_mask_postprocess.py OUT.json --size 256
    python3 bench/bench_mask_postprocess.py OUT.json --size 256 --device cuda --no-reference   # GPU vs host
    python3 bench/bench_mask_postprocess.py /tmp/smoke.json --size 64 --maps islands   # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastmaisi.pipelines import mask_postprocess as mp  # noqa: E402
from fastmaisi.phantom import make_phantom  # noqa: E402

SIZES = {None: [0.1] * 5 + [-1] * 5, 23: [0.1] * 5 + [0.01, -1, -1, -1, -1], 26: [0.1] * 5 + [-1, -1, 0.01, -1, -1]}
NOISE_IDS = np.array([1, 3, 4, 5, 10, 12, 13, 19, 25, 28, 29, 30, 31, 32, 33, 37, 45, 62, 132, 200, 23])


def _reference():
    spec = importlib.util.spec_from_file_location("mask_postprocess_oracle", ROOT / "tests" / "mask_postprocess_oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.postprocess_mask_reference


def label_map(size: int, kind: str, target: int | None, seed: int = 0) -> np.ndarray:
    """A noisy (size^3) uint8 label map, see the module doc."""
    _, small = make_phantom((64, 64, 64), (4.5, 4.5, 4.0), seed=seed)
    f = size // 64
    label = np.ascontiguousarray(small.repeat(f, 0).repeat(f, 1).repeat(f, 2))
    rng = np.random.default_rng(seed)
    host = {23: 28, 26: 1}.get(target)
    if host is not None and (label == host).any():
        c = np.argwhere(label == host)[(label == host).sum() // 2]
        label[c[0] - 2:c[0] + 3, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3] = target
    which = rng.integers(0, 7, label.shape, dtype=np.uint8)  # 0..5: take that face neighbour's label (15 % of 6/7)
    take = rng.random(label.shape) < 0.15 * 7 / 6
    src = label.copy()
    for k, (axis, step) in enumerate(((0, 1), (0, -1), (1, 1), (1, -1), (2, 1), (2, -1))):
        sel = take & (which == k)
        label[sel] = np.roll(src, step, axis)[sel]
    for _ in range(200):
        c = rng.integers(0, size - 3, 3)
        e = rng.integers(1, 4, 3)
        label[c[0]:c[0] + e[0], c[1]:c[1] + e[1], c[2]:c[2] + e[2]] = rng.choice(NOISE_IDS)
    if kind == "salt":
        noise = rng.random(label.shape) < 0.01
        label[noise] = rng.choice(NOISE_IDS, int(noise.sum()))
    return label


def _best(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _best_on_device(label: np.ndarray, sizes, device: str, repeats: int) -> tuple[float, np.ndarray]:
    """The tensor path on `device` after one warm-up: (best seconds to a synchronise, output on the host)."""
    import torch

    from fastmaisi.pipelines.mask_postprocess_torch import postprocess_mask_tensor

    tensor = torch.from_numpy(label).to(device)
    sync = torch.cuda.synchronize if tensor.is_cuda else (lambda: None)

    def run():
        out = postprocess_mask_tensor(tensor, sizes)
        sync()
        return out

    run()
    best, out = _best(run, repeats)
    return best, out.cpu().numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--maps", nargs="+", default=["islands", "salt"], choices=["islands", "salt"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="leave out the previous implementation")
    ap.add_argument("--device", help="also the tensor path on this device (e.g. cuda)")
    args = ap.parse_args(argv)
    if args.size % 64:
        print(f"--size {args.size}: must be a multiple of 64", file=sys.stderr)
        return 2
    reference = None if args.no_reference else _reference()
    workers = mp._workers(args.size ** 3)
    rows = []
    for kind in args.maps:
        for target, sizes in SIZES.items():
            label = label_map(args.size, kind, target)
            row = {"map": kind, "target": target, "size": args.size, "workers": workers}
            row["ours_s"], ours = _best(lambda: mp.postprocess_mask(label, sizes), args.repeats)
            threads = mp._workers
            mp._workers = lambda *a: 1
            try:
                row["ours_1_thread_s"], one = _best(lambda: mp.postprocess_mask(label, sizes), args.repeats)
            finally:
                mp._workers = threads
            row["changed_fraction"] = float((ours != label).mean())
            same = np.array_equal(ours, one)
            if args.device:
                row["device_s"], on_device = _best_on_device(label, sizes, args.device, args.repeats)
                row["device_identical"] = bool(np.array_equal(on_device, ours))
                same = same and row["device_identical"]
            if reference is not None:
                row["reference_s"], ref = _best(lambda: reference(label, sizes), 1)
                same = same and np.array_equal(ours, ref)
                row["speed_up"] = row["reference_s"] / row["ours_s"]
            row["identical"] = bool(same)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"bench": "mask_postprocess", "host": platform.node(), "cpus": os.cpu_count(), "device": _device_name(args.device),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows,
              "all_identical": all(r["identical"] for r in rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0 if result["all_identical"] else 1


def _device_name(device: str | None) -> str | None:
    if not device:
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else device


if __name__ == "__main__":
    sys.exit(main())
