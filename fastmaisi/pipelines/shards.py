"""Which samples this process makes: sample i belongs to shard i mod N.

The shard comes from `--shard I/N`, else from a Slurm job array (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT), and
is split further across torchrun's processes (RANK / WORLD_SIZE, one node or several): the global shard is
(outer index * world size + rank) of (outer count * world size). Seeds belong to samples, not to shards, so a sample
made by any shard is bit-identical to the same sample made alone.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the samples i with i % count == index."""

    index: int = 0
    count: int = 1

    def takes(self, i: int) -> bool:
        return i % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """argparse type for `--shard I/N` (0 <= I < N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return Shard(int(m[1]), int(m[2]))


def slurm_array_shard(env: Mapping[str, str]) -> Shard | None:
    """The shard of a Slurm job-array task (`sbatch --array=0-(N-1)`), or None outside an array."""
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    except ValueError:
        raise ValueError("SLURM_ARRAY_TASK_ID / _COUNT / _MIN / _STEP are not integers") from None
    index = (task - first) // step
    if count < 1 or not 0 <= index < count or (task - first) % step:
        raise ValueError(f"Slurm array task {task} of {count} (min {first}, step {step}) is not one of {count} "
                         "evenly spaced tasks; use a contiguous --array=0-(N-1), or pass --shard I/N")
    return Shard(index, count)


def current_shard(explicit: Shard | None = None, env: Mapping[str, str] | None = None) -> Shard:
    """This process's global shard: `explicit` (--shard) or the Slurm array task, split across torchrun ranks."""
    env = os.environ if env is None else env
    outer = explicit or slurm_array_shard(env) or Shard()
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} / WORLD_SIZE {world} from the environment are inconsistent")
    return Shard(outer.index * world + rank, outer.count * world)
