"""The exact decode split along D over several GPUs (`decode_latent(devices=...)` in one process, and a torchrun
process group), against our one-GPU decode and the reference presets, on one multi-GPU machine.

MAISI's image autoencoder (official config), random weights (timings do not depend on them), fp16; latents 128^3
(512^3 image) and 128x128x192 (512x512x768). Per shape, in one run:
  split     decode_latent(z, budget, devices=DEVICES) at each per-GPU budget (--budgets-gb): seconds (3 calls), peak
            allocated per device (torch.cuda.max_memory_allocated of each device, above what it held before), the
            plan's estimated peak and host memory per device, max |split - one-GPU| / max |one-GPU| (the one-GPU
            decode at the first budget that ran)
  one-GPU   decode_latent(z, budget) on the first device at each of the same budgets
  torchrun  the same split through a process group: `python -m torch.distributed.run --nproc-per-node N` runs this
            file with --worker (NCCL), each rank timing decode_latent(z, budget, group=WORLD) and its own peak
  reference MONAI's AutoencoderKlMaisi with SlidingWindowInferer (NVIDIA's presets: window, overlap, conv splits,
            stitched on the CPU), and fastmaisi's decode_latent_sliding_window (same windows, blended on the GPU)
A budget the split planner refuses is reported with its message and skipped.

Run on a 2-GPU machine from the repository root:
    python3 bench/bench_split_decode.py --out bench_split_decode.json
        [--devices cuda:0,cuda:1] [--budgets-gb 12 24 70] [--sections split one_gpu torchrun reference]
CPU smoke run of the same code paths (tiny autoencoder, small latents, gloo):
    python3 bench/bench_split_decode.py --out /tmp/split.json --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastmaisi.decode import decode_latent, decode_latent_sliding_window, free_host_memory  # noqa: E402
from fastmaisi.decode.split import plan_split  # noqa: E402
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi  # noqa: E402

GiB = 1 << 30
SHAPES = [(1, 4, 128, 128, 128), (1, 4, 128, 128, 192)]
TINY_SHAPES = [(1, 4, 13, 10, 12), (1, 4, 15, 9, 11)]
PRESETS = [((80, 80, 80), 0.4, 4), ((64, 64, 48), 0.4, 2)]  # NVIDIA's decode presets (window, overlap, conv splits)
SECTIONS = ["split", "one_gpu", "torchrun", "reference"]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def autoencoder_kwargs(tiny: bool) -> dict:
    if tiny:
        from fastmaisi.tiny import TINY_NETWORK_CONFIG

        d = TINY_NETWORK_CONFIG["autoencoder_def"]
    else:
        from fastmaisi.variants import image_autoencoder_def

        d = image_autoencoder_def()
    return {k: v for k, v in d.items() if not k.startswith("_")}


def build_vae(tiny: bool, device, dtype) -> AutoencoderKlMaisi:
    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(**autoencoder_kwargs(tiny)).eval()
    with torch.no_grad():
        for p in vae.parameters():  # MONAI's init zeroes some convs: perturb everything so no work is skipped
            p.add_(torch.randn_like(p) * 0.01)
    return vae.to(device=device, dtype=dtype)


def latent(shape, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def sync(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def timed(fn, devices, repeats: int):
    """(last output, seconds per call, peak allocated GiB per device above what it held before the calls)."""
    base = {}
    for d in devices:
        if d.type == "cuda":
            sync([d])
            torch.cuda.reset_peak_memory_stats(d)
            base[d] = torch.cuda.memory_allocated(d)
    out, times = None, []
    for _ in range(repeats):
        out = None
        sync(devices)
        t = time.perf_counter()
        out = fn()
        sync(devices)
        times.append(round(time.perf_counter() - t, 3))
    peaks = {str(d): round((torch.cuda.max_memory_allocated(d) - b) / GiB, 2) for d, b in base.items()}
    return out, times, peaks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def worker(args) -> None:
    """One torchrun rank: the split decode through the default process group; writes its record to --out.rank."""
    import torch.distributed as dist

    cuda = not args.tiny
    if cuda:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    dtype = torch.float16 if cuda else torch.float32
    vae = build_vae(args.tiny, dev, dtype)
    recs = []
    for shape in (TINY_SHAPES if args.tiny else SHAPES):
        z = latent(shape, dev, dtype)
        for budget in args.budgets:
            try:
                (y, plan), times, peaks = timed(lambda: decode_latent(vae, z, budget, group=dist.group.WORLD,
                                                                        return_plan=True), [dev], 3)
            except ValueError as e:
                recs.append({"latent": list(shape[2:]), "budget_per_gpu_GiB": budget / GiB, "skipped": str(e)})
                continue
            recs.append({"latent": list(shape[2:]), "budget_per_gpu_GiB": round(budget / GiB, 3),
                         "rank": dist.get_rank(), "s": times, "peak_GiB": peaks,
                         "plan_peak_GiB": [round(p / GiB, 2) for p in plan.peaks],
                         "checksum": float(y.float().sum().cpu())})
            del y
            free_host_memory()
            if cuda:
                torch.cuda.empty_cache()
    Path(f"{args.out}.rank{dist.get_rank()}").write_text(json.dumps(recs))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--devices", default=None, help="comma-separated (default: every visible GPU; --tiny: cpu,cpu)")
    ap.add_argument("--budgets-gb", type=float, nargs="+", default=None,
                    help="per-GPU budgets, each for the split and the one-GPU decode (default 12 24 70; --tiny: "
                         "0.05 0.002)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny autoencoder, small latents, gloo")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.update(ENV)
    budgets_gb = args.budgets_gb or ([0.05, 0.002] if args.tiny else [12.0, 24.0, 70.0])
    args.budgets = [int(b * GiB) for b in budgets_gb]
    if args.worker:
        worker(args)
        return 0
    if args.tiny:
        names = (args.devices or "cpu,cpu").split(",")
    else:
        names = args.devices.split(",") if args.devices else [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    devices = [torch.device(n) for n in names]
    cuda = devices[0].type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    results = {"device": torch.cuda.get_device_name(devices[0]) if cuda else "cpu", "devices": names,
               "torch": torch.__version__, "weights": "random", "dtype": str(dtype), "budgets_per_gpu_GiB": budgets_gb,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "records": []}

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        results["records"].append(rec)

    vae = build_vae(args.tiny, devices[0], dtype)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    try:
        for shape in shapes:
            z = latent(shape, devices[0], dtype)
            lat = list(shape[2:])
            reference_y = None
            for b in args.budgets if ("one_gpu" in args.sections or "split" in args.sections) else []:
                try:
                    (y, plan), times, peaks = timed(lambda: decode_latent(vae, z, b, return_plan=True), devices[:1], 3)
                except (ValueError, RuntimeError) as e:
                    emit({"what": "one-GPU decode_latent", "latent": lat, "budget_GiB": b / GiB, "error": str(e)})
                    continue
                emit({"what": "one-GPU decode_latent", "latent": lat, "budget_GiB": round(b / GiB, 3),
                      "s": times, "peak_GiB": peaks, "plan_peak_GiB": round(plan.peak_bytes / GiB, 2),
                      "est_s": round(plan.est_seconds, 2), "plan": str(plan)})
                if reference_y is None:
                    reference_y = y.cpu()
                del y
                free_host_memory()
                if cuda:
                    torch.cuda.empty_cache()
            for b in args.budgets if "split" in args.sections else []:
                try:
                    plan = plan_split(shape, devices, b, dtype, vae)
                except ValueError as e:
                    emit({"what": "split decode_latent(devices=...)", "latent": lat, "budget_per_gpu_GiB": b / GiB,
                          "skipped": str(e)})
                    continue
                y, times, peaks = timed(lambda: decode_latent(vae, z, b, devices=devices), devices, 3)
                rec = {"what": "split decode_latent(devices=...)", "latent": lat, "devices": names,
                       "budget_per_gpu_GiB": round(b / GiB, 3), "s": times, "peak_GiB": peaks,
                       "plan_peak_GiB": [round(p / GiB, 2) for p in plan.peaks],
                       "host_GiB": [round(h / GiB, 2) for h in plan.host_bytes], "est_s": round(plan.est_seconds, 2),
                       "plan": str(plan)}
                if reference_y is not None:
                    rec["max_rel_diff_vs_one_gpu"] = rel(y, reference_y)
                emit(rec)
                del y
                free_host_memory()
                if cuda:
                    torch.cuda.empty_cache()
            if "reference" in args.sections:
                for roi, overlap, splits in PRESETS:
                    roi = roi if not args.tiny else (8, 8, 8)
                    _, times, peaks = timed(lambda: decode_latent_sliding_window(vae, z, roi, overlap), devices[:1], 1)
                    emit({"what": "fastmaisi decode_latent_sliding_window (reference windows, one GPU)",
                          "latent": lat, "window": list(roi), "overlap": overlap, "s": times, "peak_GiB": peaks})
                    if cuda:
                        emit(monai_reference(vae, z, roi, overlap, splits, devices[0]) | {"latent": lat})
                        torch.cuda.empty_cache()
        if "torchrun" in args.sections:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "rank"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={len(devices)}", __file__, "--worker", "--out", str(out),
                       "--budgets-gb", *map(str, budgets_gb)] + (["--tiny"] if args.tiny else [])
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                if cuda:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.index) for d in devices)
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                rec = {"what": "split decode, torchrun process group", "nproc": len(devices), "rc": proc.returncode,
                       "wall_s": round(time.perf_counter() - t, 1)}
                if proc.returncode != 0:
                    rec["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
                else:
                    rec["ranks"] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(len(devices))]
                emit(rec)
    finally:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def monai_reference(vae, z, roi, overlap, splits, dev) -> dict:
    """MONAI's class, fp16 autocast, NVIDIA's preset, stitched on the CPU (as NVIDIA's inference script does)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi as MonaiVAE
    from monai.inferers import SlidingWindowInferer

    ref = MonaiVAE(**autoencoder_kwargs(False)).to(dev).eval()
    ref.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    for m in ref.modules():
        if hasattr(m, "num_splits"):
            m.num_splits = splits
    inferer = SlidingWindowInferer(roi_size=list(roi), sw_batch_size=1, mode="gaussian", overlap=overlap,
                                   sw_device=dev, device=torch.device("cpu"), progress=False)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        _, times, peaks = timed(lambda: inferer(network=ref.decode_stage_2_outputs, inputs=z.float()), [dev], 1)
    return {"what": "reference decode (MONAI SlidingWindowInferer, NVIDIA preset)", "window": list(roi),
            "overlap": overlap, "splits": splits, "s": times, "peak_GiB": peaks}


if __name__ == "__main__":
    sys.exit(main())
