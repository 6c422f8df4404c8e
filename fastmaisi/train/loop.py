"""The one training loop every fastmaisi trainer runs (STYLE.md item 6), meant to be read top to bottom like
nanoGPT's train.py.

A trainer is a `Task`: the network(s) to train, `loss_fn(model, batch) -> per-sample loss (B,)`, a dataset, an
optimiser factory and `export` (the official checkpoint layout). The loop owns the rest: devices and
DistributedDataParallel, autocast (bf16/fp16, GradScaler for fp16), gradient accumulation, clipping, EMA, the LR
schedule (linear warmup, then polynomial decay with power 2 like the reference's PolynomialLR), the CSV/TensorBoard
log, the progress bar, and checkpoints:
    <out>/<official file(s)>   what generation and the reference load (weights: the EMA copy when EMA is on)
    <out>/resume.pt            model, optimiser, scaler, EMA, step, RNG states, sample-stream position: exact resume
The gradient is that of the mean per-sample loss over the global batch (batch_size x processes x grad_accum), so
N processes x batch b give the same update as 1 process x batch N*b (see data.GlobalBatchSampler).
"""

from __future__ import annotations

import copy
import csv
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from fastmaisi.train.data import GlobalBatchSampler, atomic_write, collate

RESUME_FORMAT = "fastmaisi-resume/1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": None}


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


@dataclass
class TrainConfig:
    out_dir: Path
    steps: int = 1000
    batch_size: int = 1  # per process; the global batch is batch_size x processes x grad_accum
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_power: float = 2.0  # polynomial decay (1 - step/steps)^power, as the reference's PolynomialLR
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler) | fp64 (numerics checks)
    ema_decay: float = 0.0  # 0 = off
    checkpoint_every: int = 0  # steps; 0 = only at the end
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0
    resume: Path | None = None
    progress: bool = True


@dataclass
class Task:
    name: str  # "vae", "diffusion", ... (a resume file must come from the same task and network)
    model: torch.nn.Module  # everything trained (frozen helpers live in loss_fn's closure)
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor]  # (model or its DDP wrapper, batch) -> (B,)
    dataset: torch.utils.data.Dataset
    export: Callable[[torch.nn.Module, dict], dict[str, Any]]  # (model, meta) -> {file name: object to save}
    definition: dict  # the network definition(s)
    optimizer: Callable[[list, float], torch.optim.Optimizer] = lambda params, lr: torch.optim.Adam(params, lr=lr)
    extra: dict = field(default_factory=dict)  # saved in every checkpoint and restored on resume (scale_factor)
    frozen: tuple = ()  # fixed networks loss_fn uses (moved to the device, cast for fp64)
    find_unused_parameters: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, times polynomial decay (1 - step/steps)^lr_power."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * (1.0 - step / cfg.steps) ** cfg.lr_power


def train(task: Task, cfg: TrainConfig, dist: Dist | None = None,
          on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `task` for cfg.steps optimiser steps; returns the log rows (step, loss, lr, seconds)."""
    dist = dist or Dist()
    device, main = dist.device, dist.is_main
    torch.manual_seed(cfg.seed + dist.rank)  # the per-sample randomness does not use it (see data.sample_generator)
    param_dtype = torch.float64 if cfg.precision == "fp64" else None  # fp64: everything in double (slow; tests)
    model = task.model.to(device, param_dtype).train()
    for net in task.frozen:
        net.to(device, param_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = task.optimizer(params, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    step, seconds = 0, 0.0
    if cfg.resume is not None:
        step, seconds = load_resume(cfg.resume, task, cfg, dist, model, opt, scaler, ema)
    wrapped = model
    if dist.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters)
    sampler = GlobalBatchSampler(len(task.dataset), cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                                 start=step * cfg.grad_accum)
    loader = iter(torch.utils.data.DataLoader(task.dataset, batch_sampler=sampler, collate_fn=collate,
                                              num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                              persistent_workers=cfg.num_workers > 0))
    dtype = PRECISIONS[cfg.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    logger = Logger(cfg.out_dir, step, main)
    history: list[dict] = []
    start = time.time() - seconds
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, disable=not (cfg.progress and main),
               desc=task.name)
    for step in bar:
        # 1. learning rate for this step
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        # 2. forward/backward over grad_accum micro-batches; DDP syncs gradients on the last one only
        loss_sum = torch.zeros((), device=device, dtype=param_dtype or torch.float32)
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(device, param_dtype if v.is_floating_point() else None, non_blocking=True)
                     for k, v in next(loader).items()}
            if dist.world_size > 1:
                wrapped.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast:
                loss = task.loss_fn(wrapped, batch).mean() / cfg.grad_accum  # per-sample losses: fp32 (fp64)
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # 3. clip, step, EMA
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay)
        # 4. log (the loss averaged over all processes)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            if dist.world_size > 1:
                tdist.all_reduce(loss_sum)
                loss_sum /= dist.world_size
            row = {"step": done, "loss": loss_sum.item(), "lr": lr, "seconds": round(time.time() - start, 3)}
            history.append(row)
            logger.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
        # 5. checkpoint: the official file(s) and resume.pt
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            if main:
                meta = {"step": done, "epoch": done * sampler.batch_size * dist.world_size * cfg.grad_accum
                        // len(task.dataset), "loss": float(loss_sum), **task.extra}
                for name, obj in task.export(ema if ema is not None else model, meta).items():
                    save(obj, cfg.out_dir / name)
                save_resume(cfg.out_dir / "resume.pt", task, cfg, dist, done, time.time() - start, model, opt,
                            scaler, ema)
            if dist.world_size > 1:
                tdist.barrier()
        if on_step is not None:
            on_step({"step": done, "loss": loss_sum, "model": model})
    logger.close()
    return history


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class Logger:
    """`train_log.csv` (step, loss, lr, seconds) and TensorBoard events when torch.utils.tensorboard imports;
    rank 0 only. On resume the CSV keeps its rows up to the resumed step."""

    FIELDS = ("step", "loss", "lr", "seconds")

    def __init__(self, out_dir: Path, start_step: int, active: bool) -> None:
        self.file = self.tb = None
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "train_log.csv"
        rows = []
        if start_step and path.is_file():
            rows = [r for r in csv.DictReader(path.open()) if int(r["step"]) <= start_step]
        self.file = path.open("w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.csv.writeheader()
        self.csv.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # optional
            pass

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.csv.writerow(row)
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", row["loss"], row["step"])
            self.tb.add_scalar("lr", row["lr"], row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------ checkpoint files
def save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename (never a half-written checkpoint)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _samples_per_step(cfg: TrainConfig, dist: Dist) -> int:
    return cfg.batch_size * dist.world_size * cfg.grad_accum


def save_resume(path: Path, task: Task, cfg: TrainConfig, dist: Dist, step: int, seconds: float, model, opt,
                scaler, ema) -> None:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    save({"format": RESUME_FORMAT, "task": task.name, "definition": task.definition, "step": step,
          "seconds": seconds, "model": model.state_dict(), "optimizer": opt.state_dict(),
          "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
          "extra": task.extra, "rng": _rng_states(), "config": config,
          "data": {"seed": cfg.seed, "samples_per_step": _samples_per_step(cfg, dist), "grad_accum": cfg.grad_accum,
                   "next_position": step * _samples_per_step(cfg, dist), "dataset_size": len(task.dataset)}}, path)


def load_resume(path: Path, task: Task, cfg: TrainConfig, dist: Dist, model, opt, scaler, ema) -> tuple[int, float]:
    """Restore a resume.pt written by the same task and network; returns (step, seconds). ValueError otherwise."""
    from fastmaisi.weights import CheckpointError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - missing, corrupt, or a pickle that is not plain data
        raise CheckpointError(f"cannot read the resume file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path} is not a fastmaisi resume file (resume.pt); to start from trained weights "
                              "use --init instead of --resume")
    if state["task"] != task.name or state["definition"] != task.definition:
        raise CheckpointError(f"{path} was written by a '{state['task']}' run of network "
                              f"{_target(state['definition'])}; this run trains '{task.name}' with network "
                              f"{_target(task.definition)} (resume needs the same task and network definition)")
    data = state["data"]
    if data["seed"] != cfg.seed or data["samples_per_step"] != _samples_per_step(cfg, dist):
        raise ValueError(f"{path}: resume with the same --seed ({data['seed']}) and the same samples per step "
                         f"(batch size x processes x grad-accum = {data['samples_per_step']}); got --seed {cfg.seed}, "
                         f"{_samples_per_step(cfg, dist)} samples per step")
    if data["dataset_size"] != len(task.dataset):
        raise ValueError(f"{path}: the dataset had {data['dataset_size']} items, now {len(task.dataset)}; the "
                         "sample order would not continue exactly")
    model.load_state_dict(state["model"], strict=True)
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"] if state["ema"] is not None else state["model"], strict=True)
    task.extra.update(state["extra"])
    _set_rng_states(state["rng"])
    return int(state["step"]), float(state["seconds"])


def _target(definition: dict) -> str:
    targets = [d.get("_target_", "?").rsplit(".", 1)[-1] for d in definition.values() if isinstance(d, dict)]
    return "+".join(targets) if targets else str(definition.get("_target_", "?")).rsplit(".", 1)[-1]
