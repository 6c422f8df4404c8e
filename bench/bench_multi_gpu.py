"""Several GPUs: distributed training and generation on one 2-GPU machine (torchrun), measured end to end.

What it measures (every number comes from real `fastmaisi` CLI runs in subprocesses):

1. Training, `fastmaisi train diffusion` (rectified flow, the full-size rflow-ct DiffusionModelUNetMaisi, bf16 autocast
   by default) on a synthetic latent dataset written here (16 latents 4x64x64x64 + sidecar JSONs, fixed seed), every
   run starting from the same saved random init (`unet_state_dict` layout) with the same --seed and --lr 1e-4
   (10x the recipe's default, so that 40 steps move the weights measurably):
     (a) 1 process, 1 GPU, --batch-size 2            (b) torchrun --standalone --nproc-per-node 2, --batch-size 1
     (c) 1 process, 1 GPU, --batch-size 1            (weak scaling: (b) is (c) on each of 2 GPUs)
   (a) and (b) see the same global batches (fastmaisi.train.data.GlobalBatchSampler), so their loss curves and final
   weights must agree up to floating-point summation order. Reported: per-step loss difference (max, mean), final
   losses, final-weight difference (max abs, max relative per tensor, and ||w_a - w_b|| / ||w_a - w_init||: the part of
   the training update that differs), seconds per step = median of the per-step wall times in train_log.csv (the
   loop logs cumulative seconds after a `.item()` sync every step; the first --skip-steps steps are warm-up and left
   out), samples/s = global batch / that median, and the scalings (b) vs (c) and (b) vs (a). Start-up (imports,
   building the network, loading data) and the final checkpoint write are outside the logged steps; the whole run's
   wall time is reported separately.
2. Generation, `fastmaisi generate` image-only (rflow-ct, full-size autoencoder + UNet with random weights written
   here in the official layouts: autoencoder_v1.pt raw state dict, diff_unet_3d_rflow-ct.pt {"unet_state_dict",
   "scale_factor"}), --size 256 256 128 --spacing 1.7 1.7 2.0, N samples, --max-retries 0 (image-only has no quality
   check; the option only makes sure nothing retries): 1 GPU, then torchrun --nproc-per-node 2 with the same N.
   Reported: wall time (whole command, start-up included) and samples/minute, the same from the records' own
   per-sample seconds (sampling + decode, the slowest rank; start-up excluded), and the ratios. Checked: every
   sample index appears exactly once across ranks, rank == index % world, no file name repeats (record outputs and
   the printed `wrote` lines), no temporary files left, each record names its rank, world size, seed and GPU
   (cuda:<rank>); informational: whether the 2-GPU images equal the 1-GPU images of the same seeds.
   A 1-sample warm-up run (2 steps, same size) first fills the Triton kernel cache so neither timed run pays the
   one-time kernel compilation (--no-gen-warmup to skip it).

Every subprocess gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 (required on the
target machine) and PYTHONPATH=<repo root>. Heavy files (latents, weights, checkpoints) go to a temporary work folder
that is deleted at the end (--keep-work keeps it); OUT gets only small files: bench_multi_gpu.json,
bench_multi_gpu.md, the train_log.csv files, the generation records and each command's log.

Run on the 2-GPU machine from the repository root (needs nibabel; monai is not used):
    python3 bench/bench_multi_gpu.py                      # about 4-5 minutes; OUT=./bench_out_multi by default
CPU smoke run of the same code paths (tiny networks, gloo, 2 processes):
    python3 bench/bench_multi_gpu.py --tiny --device cpu
Prints one JSON line per measurement, a Markdown table at the end; exit code 1 when a run failed or a check failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# required on the target machine for every process (NVLink multicast off); never remove
REQUIRED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(REQUIRED_ENV)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastmaisi.tiny import TINY_NETWORK_CONFIG  # noqa: E402

# defaults: (full size on GPUs, --tiny)
DEFAULTS = {
    "latent_size": (64, 16), "gen_size": ((256, 256, 128), (32, 32, 64)),
    "gen_spacing": ((1.7, 1.7, 2.0), (10.0, 10.0, 5.0)), "gen_steps": (30, 3), "gen_samples": (8, 4),
}

RESULTS: list[dict] = []


def emit(record: dict) -> dict:
    """One measurement: printed as a JSON line now, kept for the JSON/Markdown files."""
    RESULTS.append(record)
    print(json.dumps(record), flush=True)
    return record


def note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- subprocesses
class Runner:
    """Runs `python3 -m ...` commands with the required environment, a deadline, and a log file per command."""

    def __init__(self, args, out: Path, deadline: float):
        self.args, self.out, self.deadline = args, out, deadline
        (out / "logs").mkdir(parents=True, exist_ok=True)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.gpus = [g for g in visible.split(",") if g.strip()] if visible else None

    def env(self, nproc: int) -> dict:
        env = dict(os.environ)
        env.update(REQUIRED_ENV)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["OMP_NUM_THREADS"] = str(self.args.threads)  # the same in every run (torchrun would set 1)
        env.setdefault("TRITON_CACHE_DIR", str(self.args.work / "triton_cache"))  # shared by all runs (warm-up)
        if self.args.device == "cuda":  # the first GPU for 1 process, the first nproc GPUs for torchrun
            gpus = self.gpus or [str(i) for i in range(torch.cuda.device_count())]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:nproc])
        return env

    def run(self, name: str, argv: list[str], nproc: int = 1) -> dict:
        """Run `python -m ...argv` (under torchrun when nproc > 1); returns rc, wall_s, stdout, stderr."""
        if nproc > 1:
            argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
        cmd = [sys.executable, *argv]
        left = self.deadline - time.time()
        if left < 20:
            note(f"{name}: skipped, the time limit (--time-limit) is reached")
            return {"rc": None, "wall_s": 0.0, "stdout": "", "stderr": "skipped: time limit", "skipped": True}
        timeout = min(self.args.timeout, left)
        note(f"{name}: {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=os.setsid)  # own process group: a timeout ends all of it
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            rc, stderr = 124, stderr + f"\n[bench] killed after {timeout:.0f} s\n"
        wall = time.perf_counter() - t0
        (self.out / "logs" / f"{name}.log").write_text(
            f"$ {' '.join(cmd)}\n# rc {rc}, {wall:.1f} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        note(f"{name}: rc {rc} in {wall:.1f} s")
        if rc != 0:
            note(f"{name} failed; stderr tail:\n{stderr[-3000:]}")
        return {"rc": rc, "wall_s": wall, "stdout": stdout, "stderr": stderr, "cmd": " ".join(cmd[1:])}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group this script started for `proc` (torchrun and its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------------------- inputs
def definitions(tiny: bool) -> dict:
    """role -> network definition: the tiny config's, or the built-in full-size rflow-ct ones."""
    if tiny:
        from fastmaisi.config import resolve_network_definition

        return {"autoencoder": resolve_network_definition(TINY_NETWORK_CONFIG, "autoencoder_def"),
                "diffusion_unet": resolve_network_definition(TINY_NETWORK_CONFIG, "diffusion_unet_def")}
    from fastmaisi.variants import get_variant

    return get_variant("rflow-ct").definitions()


def write_latents(folder: Path, n: int, size: int, seed: int) -> None:
    """n smooth random latents (4, size, size, size) + sidecars (what `fastmaisi encode` writes)."""
    from fastmaisi.train import data as D

    rng = np.random.default_rng(seed)
    for i in range(n):
        z = torch.from_numpy(rng.standard_normal((4, size, size, size), dtype=np.float32)).cumsum(1)
        z = z * (1.0 / math.sqrt(size)) + 0.1 * i
        D.write_latent(folder / f"case{i:03d}_emb.nii.gz", z, np.diag([6.0, 6.0, 6.0, 1.0]))
        D.write_json(folder / f"case{i:03d}_emb.nii.gz.json",
                     {"dim": [4 * size] * 3, "spacing": [1.5, 1.5, 1.5], "modality": ["ct", "ct_contrast"][i % 2]})


def write_weights(work: Path, tiny: bool, seed: int) -> dict:
    """Random-init networks (the default initialisation) saved in the official layouts. Returns the paths."""
    from fastmaisi.nets import build

    defs = definitions(tiny)
    weights = work / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = build(defs["diffusion_unet"]).state_dict()
    torch.save({"unet_state_dict": unet}, work / "init.pt")  # training init: no scale_factor (first-batch 1/std)
    torch.save({"unet_state_dict": unet, "scale_factor": torch.tensor(1.0), "epoch": 0},
               weights / "diff_unet_3d_rflow-ct.pt")
    torch.save(build(defs["autoencoder"]).state_dict(), weights / "autoencoder_v1.pt")  # raw state dict
    paths = {"init": work / "init.pt", "weights": weights}
    if tiny:
        paths["config"] = work / "config_network_tiny.json"
        paths["config"].write_text(json.dumps(TINY_NETWORK_CONFIG))
    return paths


# ------------------------------------------------------------------------------------------------------- training
def train_argv(args, paths: dict, run_dir: Path, batch: int) -> list[str]:
    argv = ["-m", "fastmaisi", "train", "diffusion", "-i", str(args.work / "latents"), "-o", str(run_dir),
            "--init", str(paths["init"]), "--steps", str(args.train_steps), "--batch-size", str(batch),
            "--lr", str(args.lr), "--precision", args.precision, "--seed", str(args.seed), "--no-progress",
            "--cache", "--num-workers", str(args.num_workers), "-d", args.device]
    if "config" in paths:
        argv += ["--network-config", str(paths["config"])]
    if args.gradient_checkpointing:
        argv += ["--gradient-checkpointing", args.gradient_checkpointing]
    return argv


def read_log(path: Path) -> list[dict]:
    with path.open() as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "seconds": float(r["seconds"])}
                for r in csv.DictReader(f)]


def step_seconds(rows: list[dict]) -> list[float]:
    """Per-step wall times from the cumulative `seconds` column (the loop syncs on the loss every logged step)."""
    cumulative = [r["seconds"] for r in rows]
    return [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]


def train_section(args, runner: Runner, paths: dict) -> dict:
    nproc, b = args.nproc, args.batch_per_gpu
    runs = {"a": (1, nproc * b), "b": (nproc, b), "c": (1, b)}
    out = {}
    for name, (procs, batch) in runs.items():
        run_dir = args.work / f"train_{name}"
        res = runner.run(f"train_{name}", train_argv(args, paths, run_dir, batch), nproc=procs)
        rec = {"measure": "train", "run": name, "processes": procs, "batch_per_process": batch,
               "global_batch": procs * batch, "precision": args.precision, "steps": args.train_steps,
               "rc": res["rc"], "wall_s": round(res["wall_s"], 2)}
        log = run_dir / "train_log.csv"
        if res["rc"] == 0 and log.is_file():
            rows = read_log(log)
            shutil.copy(log, runner.out / f"train_log_{name}.csv")
            times = step_seconds(rows)
            skip = min(args.skip_steps, max(len(times) - 3, 0))
            steady = times[skip:]
            med = statistics.median(steady)
            rec.update(logged_steps=len(rows), final_loss=rows[-1]["loss"], first_loss=rows[0]["loss"],
                       median_step_s=round(med, 4), min_step_s=round(min(steady), 4),
                       max_step_s=round(max(steady), 4), first_step_s=round(times[0], 3), skipped_steps=skip,
                       samples_per_s=round(procs * batch / med, 3),
                       loop_s=rows[-1]["seconds"], outside_loop_s=round(res["wall_s"] - rows[-1]["seconds"], 2))
            rec["_rows"] = rows
        else:
            rec["error"] = res["stderr"][-2000:]
        out[name] = rec
        emit({k: v for k, v in rec.items() if not k.startswith("_")})
        (run_dir / "resume.pt").unlink(missing_ok=True)  # GBs we do not need
    return out


def compare_weights(path_a: Path, path_b: Path, path_init: Path) -> dict:
    """Final weights of (a) vs (b).

    max_abs_diff, max_rel_diff (max over tensors of max|a-b| / max|a|), rel_l2_diff (||a-b|| / ||a||, whole model),
    update_rel_diff (||a-b|| / ||a-init||: the part of the training update that differs) over the whole model and its
    median over tensors. Parameters whose exact gradient is zero (attention key biases: softmax ignores them; biases
    in front of a GroupNorm with one channel per group) get only rounding noise as gradient, which Adam turns into
    full-size steps that differ between any two summation orders; they show up as tensors with update_rel_diff ~1
    (counted and named), so the median is the robust number.
    """
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    init = torch.load(path_init, map_location="cpu", weights_only=True)["unet_state_dict"]
    sa, sb = a["unet_state_dict"], b["unet_state_dict"]
    max_abs = max_rel = 0.0
    diff_sq = update_sq = norm_sq = 0.0
    worst, per_tensor = "", {}
    for k, x in sa.items():
        x, y, w0 = x.double(), sb[k].double(), init[k].double()
        d = (x - y).abs().max().item()
        rel = d / max(x.abs().max().item(), 1e-12)
        if rel > max_rel:
            max_rel, worst = rel, k
        max_abs = max(max_abs, d)
        dk, uk = (x - y).pow(2).sum().item(), (x - w0).pow(2).sum().item()
        diff_sq, update_sq, norm_sq = diff_sq + dk, update_sq + uk, norm_sq + x.pow(2).sum().item()
        if uk > 0:
            per_tensor[k] = math.sqrt(dk / uk)
    noisy = sorted((k for k, v in per_tensor.items() if v > 0.1), key=lambda k: -per_tensor[k])
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "max_rel_diff_tensor": worst,
            "rel_l2_diff": math.sqrt(diff_sq / norm_sq) if norm_sq > 0 else None,
            "update_rel_diff": math.sqrt(diff_sq / update_sq) if update_sq > 0 else None,
            "update_rel_diff_median_tensor": statistics.median(per_tensor.values()) if per_tensor else None,
            "tensors": len(sa), "tensors_update_rel_diff_over_0.1": len(noisy), "examples_over_0.1": noisy[:5],
            "update_norm": math.sqrt(update_sq),
            "scale_factor_a": float(a["scale_factor"]), "scale_factor_b": float(b["scale_factor"])}


def train_comparisons(args, train: dict) -> dict:
    a, b, c = train["a"], train["b"], train["c"]
    comp: dict = {"measure": "train_compare"}
    if "_rows" in a and "_rows" in b:
        la, lb = [r["loss"] for r in a["_rows"]], [r["loss"] for r in b["_rows"]]
        diffs = [abs(x - y) for x, y in zip(la, lb)]
        comp.update(loss_steps_compared=len(diffs), loss_max_abs_diff=max(diffs),
                    loss_mean_abs_diff=statistics.fmean(diffs),
                    loss_max_rel_diff=max(d / max(abs(x), 1e-12) for d, x in zip(diffs, la)),
                    final_loss_a=la[-1], final_loss_b=lb[-1])
        comp.update(compare_weights(args.work / "train_a" / "diffusion_unet.pt",
                                    args.work / "train_b" / "diffusion_unet.pt", args.work / "init.pt"))
        # numerics differ only by summation order (and the rounding noise it feeds through training): losses tight
        # in fp32, the typical tensor's update to 1%; looser under bf16/fp16 autocast (there: informational)
        tol_loss, tol_update = (1e-4, 1e-2) if args.precision in ("fp32", "fp64") else (5e-2, 0.25)
        comp["equivalence_tolerance"] = {"loss_max_rel_diff": tol_loss, "update_rel_diff_median_tensor": tol_update}
        comp["equivalent"] = bool(comp["loss_max_rel_diff"] <= tol_loss
                                  and (comp["update_rel_diff_median_tensor"] or 0.0) <= tol_update)
    if "samples_per_s" in b and "samples_per_s" in c:
        comp["speedup_b_vs_c"] = round(b["samples_per_s"] / c["samples_per_s"], 3)  # ideal: nproc
        comp["weak_scaling_efficiency"] = round(comp["speedup_b_vs_c"] / args.nproc, 3)
    if "samples_per_s" in b and "samples_per_s" in a:
        comp["speedup_b_vs_a"] = round(b["samples_per_s"] / a["samples_per_s"], 3)  # same global batch
    return emit(comp)


# ----------------------------------------------------------------------------------------------------- generation
def gen_argv(args, paths: dict, out_dir: Path, n: int, steps: int) -> list[str]:
    argv = ["-m", "fastmaisi", "generate", "-o", str(out_dir), "--weights", str(paths["weights"]),
            "--num-samples", str(n), "--size", *map(str, args.gen_size), "--spacing", *map(str, args.gen_spacing),
            "--steps", str(steps), "--seed", str(args.seed), "--max-retries", "0", "-q", "-d", args.device]
    if "config" in paths:
        argv += ["--network-config", str(paths["config"])]
    return argv


def check_generation(args, out_dir: Path, stdout: str, world: int) -> dict:
    """Per-sample records of one run: index coverage, rank split, unique names, rank/seed/device recorded."""
    n, problems = args.gen_samples, []
    indices, names, per_rank = Counter(), Counter(), {}
    records = sorted(out_dir.glob("*_record.json"))
    for f in records:
        rec = json.loads(f.read_text())
        rank, size, seed = rec.get("rank"), rec.get("world_size"), rec.get("seed")
        if rank is None or size is None or seed is None:
            problems.append(f"{f.name}: rank/world_size/seed missing")
            continue
        i = seed - rec["request"]["seed"]  # --max-retries 0: sample i has seed base + i
        indices[i] += 1
        per_rank.setdefault(rank, {"indices": [], "seeds": [], "compute_s": 0.0, "device": rec.get("device")})
        per_rank[rank]["indices"].append(i)
        per_rank[rank]["seeds"].append(seed)
        per_rank[rank]["compute_s"] += sum(a["seconds"] for a in rec["attempts"])
        if size != world:
            problems.append(f"{f.name}: world_size {size}, expected {world}")
        if i % world != rank:
            problems.append(f"{f.name}: sample {i} made by rank {rank}, expected rank {i % world}")
        if f.name != f"sample_{seed:06d}_record.json":
            problems.append(f"{f.name}: name does not match seed {seed}")
        if args.device == "cuda" and not str(rec.get("device", "")).startswith(f"cuda:{rank if world > 1 else 0}"):
            problems.append(f"{f.name}: rank {rank} ran on {rec.get('device')}")
        names[f.name] += 1
        for o in rec.get("outputs", {}).values():
            names[o["file"]] += 1
    written = Counter(re.findall(r"^wrote (\S+)", stdout, flags=re.M))
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    checks = {
        "each_index_once": sorted(indices) == list(range(n)) and all(c == 1 for c in indices.values()),
        "rank_split_i_mod_world": not any("made by rank" in p for p in problems),
        "no_file_name_repeats": all(c == 1 for c in names.values()) and all(c == 1 for c in written.values())
                                and len(written) == n,
        "records_name_rank_seed": len(records) == n and not any("missing" in p or "world_size" in p
                                                                 for p in problems),
        "no_temporary_files": not leftovers,
        "images_written": len(list(out_dir.glob("*_image.nii.gz"))) == n,
    }
    if args.device == "cuda":
        checks["rank_on_own_gpu"] = not any("ran on" in p for p in problems)
    problems += [f"missing sample {i}" for i in range(n) if i not in indices]
    problems += [f"printed twice: {p}" for p, c in written.items() if c > 1] + [f"left over: {x}" for x in leftovers]
    return {"checks": checks, "problems": problems[:20],
            "per_rank": {str(r): {**v, "compute_s": round(v["compute_s"], 2)} for r, v in sorted(per_rank.items())}}


def same_images(dir_1: Path, dir_2: Path) -> dict:
    """Informational: do the 1-GPU and the 2-GPU runs give the same volumes for the same seeds?"""
    import nibabel as nib

    identical, max_diff, compared = 0, 0, 0
    for f in sorted(dir_1.glob("*_image.nii.gz")):
        g = dir_2 / f.name
        if not g.is_file():
            continue
        x = np.asarray(nib.load(f).dataobj).astype(np.int32)
        y = np.asarray(nib.load(g).dataobj).astype(np.int32)
        compared += 1
        identical += bool(np.array_equal(x, y))
        max_diff = max(max_diff, int(np.abs(x - y).max()))
    return {"images_compared": compared, "images_identical": identical, "max_abs_hu_diff": max_diff}


def generate_section(args, runner: Runner, paths: dict) -> dict:
    n = args.gen_samples
    if args.gen_warmup:  # fills the Triton cache (TRITON_CACHE_DIR) for both timed runs
        res = runner.run("generate_warmup", gen_argv(args, paths, args.work / "gen_warmup", 1, 2))
        emit({"measure": "generate_warmup", "rc": res["rc"], "wall_s": round(res["wall_s"], 2)})
    out = {}
    for name, procs in (("1gpu", 1), (f"{args.nproc}gpu", args.nproc)):
        out_dir = args.work / f"gen_{name}"
        res = runner.run(f"generate_{name}", gen_argv(args, paths, out_dir, n, args.gen_steps), nproc=procs)
        rec = {"measure": "generate", "run": name, "processes": procs, "num_samples": n,
               "size": list(args.gen_size), "spacing": list(args.gen_spacing), "steps": args.gen_steps,
               "rc": res["rc"], "wall_s": round(res["wall_s"], 2)}
        if res["rc"] == 0:
            rec["samples_per_min"] = round(n / res["wall_s"] * 60, 3)
            rec.update(check_generation(args, out_dir, res["stdout"], procs))
            slowest = max(v["compute_s"] for v in rec["per_rank"].values()) if rec["per_rank"] else 0.0
            rec["compute_s_slowest_rank"] = round(slowest, 2)
            rec["compute_samples_per_min"] = round(n / slowest * 60, 3) if slowest else None
            keep = runner.out / f"gen_records_{name}"
            keep.mkdir(exist_ok=True)
            for f in out_dir.glob("*_record.json"):
                shutil.copy(f, keep / f.name)
        else:
            rec["error"] = res["stderr"][-2000:]
        out[name] = rec
        emit(rec)
    one, many = out["1gpu"], out[f"{args.nproc}gpu"]
    if one["rc"] == 0 and many["rc"] == 0:
        comp = {"measure": "generate_compare", "wall_speedup": round(one["wall_s"] / many["wall_s"], 3),
                "samples_per_min_ratio": round(many["samples_per_min"] / one["samples_per_min"], 3)}
        if one.get("compute_samples_per_min") and many.get("compute_samples_per_min"):
            comp["compute_samples_per_min_ratio"] = round(
                many["compute_samples_per_min"] / one["compute_samples_per_min"], 3)
        comp.update(same_images(args.work / "gen_1gpu", args.work / f"gen_{args.nproc}gpu"))
        out["compare"] = emit(comp)
    return out


# ------------------------------------------------------------------------------------------------------- reporting
def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(meta: dict, train: dict | None, tcomp: dict | None, gen: dict | None, checks: dict) -> str:
    lines = [f"# Multi-GPU benchmark ({meta['device_name']}, {meta['mode']})", "",
             f"torch {meta['torch']}, {meta['gpus']} GPU(s) visible, {meta['nproc']} processes, "
             f"precision {meta['precision']}, total {meta['total_s']:.0f} s", ""]
    if train:
        lines += [f"## Training: fastmaisi train diffusion, {meta['train_steps']} steps, latents "
                  f"4x{meta['latent_size']}^3, same init and seed", "",
                  "| run | processes x batch | median s/step | samples/s | first / final loss | wall s |",
                  "|---|---|---|---|---|---|"]
        unit = "GPU" if meta["gpus"] else "CPU process"
        labels = {"a": f"(a) 1 {unit}", "b": f"(b) torchrun {meta['nproc']} x {unit}", "c": f"(c) 1 {unit}"}
        for k, r in train.items():
            loss = f"{_fmt(r.get('first_loss'))} / {_fmt(r.get('final_loss'))}" if "final_loss" in r else "failed"
            lines.append(f"| {labels[k]} | {r['processes']} x {r['batch_per_process']} | {_fmt(r.get('median_step_s'))}"
                         f" | {_fmt(r.get('samples_per_s'))} | {loss} | {_fmt(r['wall_s'])} |")
        if tcomp:
            lines += ["", f"- (a) vs (b) loss per step: max |diff| {_fmt(tcomp.get('loss_max_abs_diff'))}, mean "
                      f"{_fmt(tcomp.get('loss_mean_abs_diff'))}, max relative {_fmt(tcomp.get('loss_max_rel_diff'))}; "
                      f"final {_fmt(tcomp.get('final_loss_a'))} vs {_fmt(tcomp.get('final_loss_b'))}",
                      f"- (a) vs (b) final weights: max |diff| {_fmt(tcomp.get('max_abs_diff'))}, max relative "
                      f"(per tensor) {_fmt(tcomp.get('max_rel_diff'))}, ||w_a - w_b|| / ||w_a|| "
                      f"{_fmt(tcomp.get('rel_l2_diff'))}; ||w_a - w_b|| / ||w_a - w_init|| "
                      f"{_fmt(tcomp.get('update_rel_diff'))} (median over tensors "
                      f"{_fmt(tcomp.get('update_rel_diff_median_tensor'))}; "
                      f"{tcomp.get('tensors_update_rel_diff_over_0.1')} of {tcomp.get('tensors')} tensors above 0.1: "
                      f"zero-gradient parameters, Adam-amplified rounding noise)",
                      f"- equivalent (loss max relative diff, median tensor update diff within "
                      f"{tcomp.get('equivalence_tolerance')}): {tcomp.get('equivalent')}",
                      f"- scaling: (b) vs (c) samples/s x{_fmt(tcomp.get('speedup_b_vs_c'))} (weak-scaling efficiency "
                      f"{_fmt(tcomp.get('weak_scaling_efficiency'))}); (b) vs (a) x{_fmt(tcomp.get('speedup_b_vs_a'))}"]
    if gen:
        lines += ["", f"## Generation: image-only rflow-ct, {meta['gen_samples']} samples "
                  f"{'x'.join(map(str, meta['gen_size']))}, {meta['gen_steps']} steps", "",
                  "| run | wall s | samples/min (wall) | compute s (slowest rank) | samples/min (compute) | checks |",
                  "|---|---|---|---|---|---|"]
        for k in ("1gpu", f"{meta['nproc']}gpu"):
            r = gen.get(k, {})
            ok = "failed" if r.get("rc") != 0 else ("pass" if all(r["checks"].values()) else "FAIL")
            lines.append(f"| {k} | {_fmt(r.get('wall_s'))} | {_fmt(r.get('samples_per_min'))} | "
                         f"{_fmt(r.get('compute_s_slowest_rank'))} | {_fmt(r.get('compute_samples_per_min'))} | {ok} |")
        c = gen.get("compare")
        if c:
            lines += ["", f"- {meta['nproc']} GPUs vs 1: wall x{_fmt(c['wall_speedup'])}, samples/min "
                      f"x{_fmt(c['samples_per_min_ratio'])}, compute samples/min "
                      f"x{_fmt(c.get('compute_samples_per_min_ratio'))}; images equal to the 1-GPU run's: "
                      f"{c['images_identical']} of {c['images_compared']} (max |HU diff| {c['max_abs_hu_diff']})"]
    lines += ["", "## Checks", ""] + [f"- {k}: {'pass' if v else 'FAIL'}" for k, v in checks.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny networks and sizes (a CPU smoke run with --device cpu)")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the torchrun runs")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--train-latents", type=int, default=16, help="synthetic latents in the dataset")
    p.add_argument("--latent-size", type=int, help="latent edge (default 64; --tiny 16)")
    p.add_argument("--batch-per-gpu", type=int, default=1, help="batch of (b) and (c); (a) gets nproc x this")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default bf16 (CUDA), fp32 (CPU)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gradient-checkpointing", choices=["full", "selective"], help="default: off")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per process (default 2 on CUDA, 0 on CPU)")
    p.add_argument("--skip-steps", type=int, default=5, help="warm-up steps left out of the step-time median")
    p.add_argument("--gen-samples", type=int, help="N samples of both generation runs (default 8; --tiny 4)")
    p.add_argument("--gen-size", type=int, nargs=3, help="default 256 256 128 (--tiny 32 32 64)")
    p.add_argument("--gen-spacing", type=float, nargs=3, help="default 1.7 1.7 2.0 (--tiny 10 10 5)")
    p.add_argument("--gen-steps", type=int, help="sampling steps (default 30; --tiny 3)")
    p.add_argument("--gen-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="a 1-sample run before the timed ones (fills the Triton cache; default on for CUDA)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (default cores / (2 nproc), >= 1)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per command")
    p.add_argument("--time-limit", type=float, default=450, help="seconds for the whole script: later commands are "
                   "skipped (and reported) once it is reached")
    p.add_argument("--work", type=Path, help="work folder for latents/weights/checkpoints (default: a temp folder)")
    p.add_argument("--keep-work", action="store_true", help="do not delete the work folder")
    args = p.parse_args(argv)
    t = 1 if args.tiny else 0
    args.latent_size = args.latent_size or DEFAULTS["latent_size"][t]
    args.gen_size = tuple(args.gen_size or DEFAULTS["gen_size"][t])
    args.gen_spacing = tuple(args.gen_spacing or DEFAULTS["gen_spacing"][t])
    args.gen_steps = args.gen_steps or DEFAULTS["gen_steps"][t]
    args.gen_samples = args.gen_samples or DEFAULTS["gen_samples"][t]
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.num_workers = args.num_workers if args.num_workers is not None else (2 if args.device == "cuda" else 0)
    args.gen_warmup = args.device == "cuda" if args.gen_warmup is None else args.gen_warmup
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // (2 * args.nproc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = Path(os.environ.get("OUT") or "bench_out_multi").resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus < args.nproc:
        print(f"bench_multi_gpu: needs {args.nproc} GPUs, {gpus} visible (use --device cpu --tiny for a CPU run)",
              file=sys.stderr)
        return 2
    own_work = args.work is None
    args.work = Path(args.work or tempfile.mkdtemp(prefix="bench_multi_gpu_")).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    device_name = "cpu"
    if args.device == "cuda":
        try:  # nvidia-smi: no CUDA context in this process
            device_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            device_name = "cuda"
    meta = {"measure": "meta", "mode": ("tiny" if args.tiny else "full size") + f" on {args.device}",
            "device_name": device_name, "gpus": gpus, "torch": torch.__version__, "python": sys.version.split()[0],
            "nproc": args.nproc, "precision": args.precision, "train_steps": args.train_steps,
            "latent_size": args.latent_size, "train_latents": args.train_latents, "lr": args.lr,
            "gen_samples": args.gen_samples, "gen_size": list(args.gen_size), "gen_spacing": list(args.gen_spacing),
            "gen_steps": args.gen_steps, "threads": args.threads, "num_workers": args.num_workers,
            "work": str(args.work), "env": REQUIRED_ENV}
    emit(meta)
    runner = Runner(args, out, start + args.time_limit)
    train = tcomp = gen = None
    checks: dict[str, bool] = {}
    try:
        t = time.time()
        paths = write_weights(args.work, args.tiny, args.seed)
        if not args.skip_train:
            write_latents(args.work / "latents", args.train_latents, args.latent_size, args.seed)
        emit({"measure": "setup", "seconds": round(time.time() - t, 1)})
        if not args.skip_train:
            train = train_section(args, runner, paths)
            tcomp = train_comparisons(args, train)
            checks.update({f"train_{k}_ran": r["rc"] == 0 for k, r in train.items()})
            if args.device == "cpu" and args.precision == "fp32":  # exact up to summation order: a hard check
                checks["train_a_b_equivalent"] = bool(tcomp.get("equivalent"))
        if not args.skip_generate:
            gen = generate_section(args, runner, paths)
            for k in ("1gpu", f"{args.nproc}gpu"):
                checks[f"generate_{k}_ran"] = gen[k]["rc"] == 0
                for name, ok in gen[k].get("checks", {}).items():
                    checks[f"generate_{k}_{name}"] = ok
    finally:
        meta["total_s"] = time.time() - start
        report = {"meta": meta, "measurements": [r for r in RESULTS if r is not meta], "checks": checks,
                  "ok": bool(checks) and all(checks.values())}
        (out / "bench_multi_gpu.json").write_text(json.dumps(report, indent=1) + "\n")
        md = markdown(meta, train, tcomp, gen, checks)
        (out / "bench_multi_gpu.md").write_text(md)
        print(md, flush=True)
        if own_work and not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
        note(f"done in {meta['total_s']:.0f} s; results in {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
