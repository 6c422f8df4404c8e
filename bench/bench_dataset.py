"""Dataset throughput: `generate` in-process making rflow-ct paired samples back to back, the write included.

What it measures, per size (256^3 at 1.5 mm and 512^3 at 1.0 mm by default):
  - one `fastmaisi.pipelines.generate.generate` call making --warmup + --samples paired samples (organ sizes
    liver=0.5, 30 rectified-flow steps, the 1000-step DDPM mask stage, --max-retries 0: random weights fail the HU
    check and a retry would double a sample) into a fresh folder, NIfTI written by the background writer;
  - seconds per sample in steady state = (time the last sample was written - time the last warm-up sample was
    written) / --samples, from the `on_sample` callback (so writing, compression, preview and record are included;
    the warm-up samples pay Triton compilation, cuDNN autotuning and CUDA-graph capture); samples/hour = 3600 / that;
  - GPU idle share over the same window: 1 - mean NVML utilisation (the share of time at least one kernel was
    running, sampled every 100 ms by `torch.cuda.utilization()` through pynvml, else by `nvidia-smi -lms 100`);
  - how long the GPU-driving thread waited for the writer (blocked handing a volume over, or waiting for the last
    ones), per sample: the time the GPU was held up by the disk;
  - the stage times of each sample from its record (mask, sample, decode), the deflate used, peak GPU memory
    (torch.cuda.max_memory_allocated);
  - the reference's per-sample time for the same work, from its per-stage measurements on an H100 in
    ../shared/baselines (MONAI 1.6.1's MAISI classes): mask DM 1000 DDPM steps + mask VAE decode + 30 ControlNet+UNet
    steps at the latent size + the fastest measured sliding-window decode of that size; the ratio against ours.
    With --mask-generator v2 the mask stages are replaced by the reference's v2 loop + decode that
    bench/bench_mask_v2.py measured in the same run (--reference-mask-v2 its JSON); without it, no ratio.
Networks: the official rflow-ct definitions (fastmaisi.variants, the official config_network values), random weights
(timings do not depend on weight values) saved in the official checkpoint layouts into a temporary folder.

Run on one GPU from the repository root (no monai needed; python-isal, if installed, gives the faster deflate):
    python3 bench/bench_dataset.py bench_dataset_h100.json
CPU smoke run of the same code path (tiny networks, 32^3 and 64^3, 2 steps):
    python3 bench/bench_dataset.py /tmp/bench_dataset.json --tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastmaisi.pipelines import writer as writer_module  # noqa: E402
from fastmaisi.pipelines.generate import GenerateRequest, generate  # noqa: E402
from fastmaisi.variants import get_variant  # noqa: E402

LAYOUTS = {"diffusion_unet": "unet", "controlnet": "controlnet", "mask_diffusion": "unet"}  # others: raw state dict


def write_weights(folder: Path, tiny: bool, mask_generator: str = "v1") -> Path | None:
    """Random-init rflow-ct networks in the official layouts; returns the tiny network config (None: built-in)."""
    from fastmaisi.nets import build

    variant = get_variant("rflow-ct")
    defs, config = variant.definitions(), None
    if tiny:
        from fastmaisi.config import resolve_network_definition
        from fastmaisi.tiny import TINY_NETWORK_CONFIG
        from fastmaisi.variants import ROLE_CONFIG_KEYS

        config = folder / "config_network_tiny.json"
        config.write_text(json.dumps(TINY_NETWORK_CONFIG))
        defs = {role: resolve_network_definition(TINY_NETWORK_CONFIG, ROLE_CONFIG_KEYS[role]) for role in defs}
    torch.manual_seed(0)
    for role, stem in variant.files.items():
        state = build(defs[role]).state_dict()
        layout = LAYOUTS.get(role)
        obj = ({"unet_state_dict": state, "scale_factor": torch.tensor(1.0)} if layout == "unet"
               else {"controlnet_state_dict": state} if layout == "controlnet" else state)
        torch.save(obj, folder / f"{stem}.pt")
    if mask_generator == "v2":  # NVIDIA's rflow-mask generator beside the v1 one (generate picks v2 when asked)
        v2 = variant.with_mask_generator("v2")
        definition = v2.definitions()["mask_diffusion"]
        torch.save({"unet_state_dict": build(definition).state_dict(), "scale_factor": torch.tensor(1.0)},
                   folder / f"{v2.v2_mask_file}.pt")
    return config


class UtilisationSampler:
    """GPU utilisation (NVML: % of time a kernel ran) sampled every 100 ms on a thread: [(time, percent)]."""

    def __init__(self, device: torch.device):
        self.samples: list[tuple[float, float]] = []
        self.method, self._stop, self._proc = None, threading.Event(), None
        if device.type != "cuda":
            return
        try:
            torch.cuda.utilization(device)
            self.method = "torch.cuda.utilization (pynvml), every 100 ms"
        except Exception:  # no pynvml: nvidia-smi's loop
            index = device.index if device.index is not None else torch.cuda.current_device()
            try:
                self._proc = subprocess.Popen(["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu",
                                               "--format=csv,noheader,nounits", "-lms", "100"],
                                              stdout=subprocess.PIPE, text=True)
                self.method = "nvidia-smi -lms 100"
            except OSError:
                return
        self._thread = threading.Thread(target=self._run, args=(device,), daemon=True)
        self._thread.start()

    def _run(self, device) -> None:
        while not self._stop.is_set():
            if self._proc is not None:
                line = self._proc.stdout.readline()
                if not line:
                    return
                try:
                    self.samples.append((time.perf_counter(), float(line.strip())))
                except ValueError:
                    pass
            else:
                self.samples.append((time.perf_counter(), float(torch.cuda.utilization(device))))
                time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()

    def mean_between(self, t0: float, t1: float) -> float | None:
        values = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.fmean(values) if values else None


class WriterWaits:
    """Seconds the GPU-driving thread spends in BackgroundWriter.submit / wait_idle (held up by the writer)."""

    def __init__(self):
        self.total = 0.0
        self.calls: list[tuple[float, float]] = []  # (end time, seconds)
        self._originals = {}

    def __enter__(self):
        cls = writer_module.BackgroundWriter
        for name in ("submit", "wait_idle"):
            original = getattr(cls, name)
            self._originals[name] = original

            def timed(self_, *a, _original=original, **k):
                t = time.perf_counter()
                try:
                    return _original(self_, *a, **k)
                finally:
                    now = time.perf_counter()
                    self.calls.append((now, now - t))

            setattr(cls, name, timed)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(writer_module.BackgroundWriter, name, original)

    def between(self, t0: float, t1: float) -> float:
        return sum(s for end, s in self.calls if t0 < end <= t1)


def reference_per_sample(baselines: Path, size: int, steps: int) -> dict:
    """The reference's seconds for one paired sample of size^3 from its measured stages (None where not measured)."""
    rows = []
    for f in sorted(baselines.glob("*.json")):
        rows += json.loads(f.read_text()).get("results", [])
    latent = [size // 4] * 3
    dm = [r for r in rows if r["what"] == "dm_step_fp16_autocast" and r["latent"] == latent and r["controlnet"]]
    decodes = [r for r in rows if r["what"] == "vae_decode_sliding_window" and r["output"] == [size] * 3]
    mask_dm = [r for r in rows if r["what"] == "mask_dm_step"]
    mask_decode = [r for r in rows if r["what"] == "mask_vae_decode_whole"]
    stages = {"mask_dm_1000_ddpm_s": mask_dm[0]["ddpm1000_s"] if mask_dm else None,
              "mask_vae_decode_s": mask_decode[0]["s"] if mask_decode else None,
              f"dm_{steps}_steps_s": round(dm[0]["s_per_step"] * steps, 2) if dm else None,
              "vae_decode_s": min(r["s"] for r in decodes) if decodes else None}
    best = min(decodes, key=lambda r: r["s"]) if decodes else None
    total = None if None in stages.values() else round(sum(stages.values()), 2)
    return {"s_per_sample": total, "stages": stages,
            "decode_setting": {k: best[k] for k in ("roi", "overlap", "splits")} if best else None,
            "source": str(baselines), "device": "NVIDIA H100 80GB HBM3 (the baselines' machine)"}


def with_v2_mask_stage(reference: dict | None, mask_v2_json: Path | None) -> dict | None:
    """The reference per sample with its v1 mask stages replaced by its v2 mask stage (100 guided steps + decode)
    as bench_mask_v2.py measured it, on this machine in the same device run; None without that file."""
    if reference is None or mask_v2_json is None:
        return None
    measured = json.loads(mask_v2_json.read_text())
    mask_s = measured["mask_stage"]["reference"]["stage_s_without_postprocess"]
    stages = {k: v for k, v in reference["stages"].items() if not k.startswith("mask_")}
    stages["mask_v2_loop_and_decode_s"] = mask_s
    total = None if None in stages.values() else round(sum(stages.values()), 2)
    return {**reference, "s_per_sample": total, "stages": stages,
            "mask_stage_source": f"{mask_v2_json.name} ({measured.get('device')}, same run)"}


def run_size(size: int, spacing: float, args, weights: Path, config: Path | None, work: Path) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = work / f"out_{size}"
    request = GenerateRequest(output_dir=str(out), variant="rflow-ct", weights=str(weights),
                              network_config=str(config) if config else None, size=(size,) * 3,
                              spacing=(spacing,) * 3, organ_sizes={"liver": 0.5}, workflow_name="paired",
                              steps=args.steps, mask_steps=args.mask_steps, seed=args.seed,
                              mask_generator=args.mask_generator,
                              num_samples=args.warmup + args.samples, max_retries=0, device=str(device))
    done: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = UtilisationSampler(device)
    t_start = time.perf_counter()
    with WriterWaits() as waits:
        results = generate(request, progress=not args.quiet, on_sample=lambda r: done.append(time.perf_counter()))
    sampler.stop()
    t0, t1 = done[args.warmup - 1] if args.warmup else t_start, done[-1]
    s_per_sample = (t1 - t0) / args.samples
    util = sampler.mean_between(t0, t1)
    records = sorted((r["record"] for r in results), key=lambda r: r["seed"])
    steady = records[args.warmup:]
    stages = {k: round(statistics.median(r["attempts"][-1]["timings"].get(k, 0.0) for r in steady), 2)
              for k in ("mask_s", "mask_postprocess_s", "sample_s", "decode_s")}
    reference = reference_per_sample(args.baselines, size, args.steps) if args.baselines else None
    if args.mask_generator == "v2":  # the baselines hold the v1 mask stage only: take v2's from bench_mask_v2.py
        reference = with_v2_mask_stage(reference, args.reference_mask_v2)
    ref_s = reference and reference["s_per_sample"]
    row = {"size": [size] * 3, "spacing": [spacing] * 3, "workflow": "paired", "steps": args.steps,
           "mask_generator": args.mask_generator,
           "mask_steps": args.mask_steps, "warmup_samples": args.warmup, "samples": args.samples,
           "s_per_sample": round(s_per_sample, 3), "samples_per_hour": round(3600 / s_per_sample, 1),
           "gpu_idle_share": None if util is None else round(1 - util / 100, 3),
           "gpu_utilisation_method": sampler.method,
           "writer_wait_s_per_sample": round(waits.between(t0, t1) / args.samples, 3),
           "stage_s_median": stages,
           "gpu_stages_s_median": round(stages["mask_s"] + stages["sample_s"] + stages["decode_s"], 2),
           "deflate": records[-1].get("deflate"), "first_samples_s": [round(t - t_start, 2) for t in done],
           "peak_alloc_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
           else None,
           "reference": reference, "speedup_vs_reference": round(ref_s / s_per_sample, 2) if ref_s else None}
    print(json.dumps(row), flush=True)
    if not args.keep_work:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="JSON file to write")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--spacings", type=float, nargs="+", default=[1.5, 1.0])
    p.add_argument("--samples", type=int, default=5, help="steady-state samples timed (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mask-steps", type=int, help="default: 1000 (v1), 100 (v2)")
    p.add_argument("--mask-generator", choices=["v1", "v2"], default="v1",
                   help="v1: the 1000-step DDPM mask generator; v2: NVIDIA's rflow-mask (100 guided steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny networks, sizes 32 and 64, 2 steps")
    p.add_argument("--baselines", type=Path, help="the reference's measurements (default: shared/baselines in or "
                   "beside the checkout)", default=next((d / "shared" / "baselines" for d in (ROOT, *ROOT.parents[:2])
                                                        if (d / "shared" / "baselines").is_dir()), None))
    p.add_argument("--reference-mask-v2", type=Path,
                   help="bench_mask_v2.py's JSON from the same run: the reference's v2 mask stage for the v2 ratio")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.mask_steps is None:
        args.mask_steps = 1000 if args.mask_generator == "v1" else 100
    if args.tiny:
        args.sizes, args.spacings, args.steps, args.mask_steps = [32, 64], [10.0, 5.0], 2, 2
        args.samples, args.warmup = min(args.samples, 2), 1
    if len(args.spacings) != len(args.sizes):
        p.error("--spacings needs one value per size")
    work = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    try:
        weights = work / "weights"
        weights.mkdir()
        config = write_weights(weights, args.tiny, args.mask_generator)
        rows = [run_size(s, sp, args, weights, config, work) for s, sp in zip(args.sizes, args.spacings)]
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    device = "cpu" if not torch.cuda.is_available() or args.device == "cpu" else torch.cuda.get_device_name()
    result = {"what": "rflow-ct paired dataset generation, write included, steady state", "device": device,
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "tiny": args.tiny,
              "weights": "random (timings do not depend on weight values)", "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
