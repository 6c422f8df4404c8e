"""One output folder, one job: request fingerprints, locks, and sorting samples into kept / to make on a rerun.

`job.json` names the request that owns the folder (its fingerprint: every input that changes the files, not the
device or the sample count). A rerun of the same request resumes: complete samples (record written last, its files
present with their recorded sizes, the same per-sample fingerprint) are kept byte for byte, leftovers of an
interrupted sample (files without a record, hidden `.partial` / `.old` temporaries) are removed and the sample is
made again. Another request is refused unless `overwrite`. Locks (POSIX `flock` on hidden files in the folder):
every run holds `.fastmaisi.lock` shared while it runs (starting or taking over a folder for a request needs it
exclusively: refused while another request's run writes there), and `.fastmaisi-shard-I-of-N.lock` exclusively, so
the same shard never runs twice at once; `.fastmaisi-claim.lock` makes these checks take turns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from fastmaisi.io import output_paths
from fastmaisi.io.locks import file_lock, relock
from fastmaisi.io.record import _jsonable

JOB_FILE = "job.json"
JOB_SCHEMA = "fastmaisi-job/1"
LOCK_FILE = ".fastmaisi.lock"
CLAIM_LOCK_FILE = ".fastmaisi-claim.lock"
# request fields that change how a run goes, not what it writes (the weights are checked by their SHA-256 instead)
RUN_ONLY = {"output_dir", "num_samples", "overwrite", "device", "memory_budget_gb", "cuda_graphs", "weights", "force",
            "replay", "output_stem", "decode_devices"}
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?:partial|old)-[^/]*$")


def fingerprint(request, mask_sha256: str | None = None, stem: str | None = None) -> str:
    """SHA-256 (hex, 32 chars) of what decides a request's files: its fields but RUN_ONLY, the mask's content
    instead of its path, the output name (per sample)."""
    d = {k: v for k, v in dataclasses.asdict(request).items() if k not in RUN_ONLY}
    d["variant"] = request.variant_name
    if d.get("mask"):
        masks = d["mask"] if isinstance(d["mask"], list) else [d["mask"]]
        d["mask"] = mask_sha256 or [str(Path(m).resolve()) for m in masks]
    for key in ("mask_db", "network_config"):
        if d.get(key):
            d[key] = str(Path(d[key]).resolve())
    if stem is not None:
        d["stem"] = stem
    text = json.dumps(_jsonable(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def record_state(out: Path, stem: str, sample_fp: str) -> tuple[str, dict | None]:
    """("complete" | "conflict" | "incomplete" | "absent", the record or None) for output `stem` in `out`."""
    rec_path = out / f"{stem}_record.json"
    if rec_path.is_file():
        try:
            record = json.loads(rec_path.read_text())
            outputs = record["outputs"]
            whole = all(_whole(out / o["file"], o.get("bytes")) for o in outputs.values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return "incomplete", None
        if not whole:
            return "incomplete", None
        same = (record.get("fingerprint") or {}).get("sample") == sample_fp
        return ("complete" if same else "conflict"), record
    if _files_of(out, stem):
        return "incomplete", None
    return "absent", None


def _whole(path: Path, size: int | None) -> bool:
    return path.is_dir() or (path.is_file() and (size is None or path.stat().st_size == size))


def _files_of(out: Path, stem: str) -> list[Path]:
    names = {p for fmt in ("nifti", "dicom") for p in output_paths(out, stem, fmt).values()}
    return [p for p in names if p.exists() or p.is_symlink()]


def _temporaries(out: Path) -> dict[str, list[Path]]:
    """Hidden temporaries left by interrupted writes (`.NAME.partial-*`, `.NAME.old-*`), by final file name."""
    found: dict[str, list[Path]] = {}
    for entry in os.scandir(out):
        m = _TEMPORARY.match(entry.name)
        if m:
            found.setdefault(m["final"], []).append(Path(entry.path))
    return found


def _remove(path: Path) -> None:
    from fastmaisi.io.atomic import _remove as remove

    remove(path)


@dataclasses.dataclass
class Sorted:
    """The samples of this shard: those to make, and the records of those kept (complete from an earlier run)."""

    todo: list
    kept: list[dict]
    removed: int = 0  # leftover files removed


class RunFolder:
    """An output folder claimed for one job by this process (see the module docstring); a context manager."""

    def __init__(self, out_dir: str | os.PathLike, job_fp: str, job: dict, shard, overwrite: bool = False):
        self.out, self.job_fp, self.job, self.shard, self.overwrite = Path(out_dir), job_fp, job, shard, overwrite
        self._locks: list = []
        self.fresh = False  # the job file was made by this run (no earlier run of this job here)

    def __enter__(self) -> RunFolder:
        try:
            self._claim()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in reversed(self._locks):
            f.close()
        self._locks.clear()

    def _claim(self) -> None:
        out = self.out
        claim = file_lock(out / CLAIM_LOCK_FILE, exclusive=True, blocking=True)  # claims take turns (short)
        try:
            self._claim_job(out)
        finally:
            claim.close()

    def _claim_job(self, out: Path) -> None:
        """Under the claim lock: check or write job.json, and hold the run lock shared."""
        job_path = out / JOB_FILE
        owner = self._read_job(job_path)
        if owner is None:
            foreign = self._foreign_records()
            if foreign and not self.overwrite:
                raise ValueError(f"{str(out)!r} holds results of another request ({_names(foreign)}); pass "
                                 "--overwrite to replace them, or choose another folder")
        elif owner != self.job_fp and not self.overwrite:
            raise ValueError(f"{str(out)!r} holds the results of a different request (its {JOB_FILE}); rerun "
                             "that request to finish it, pass --overwrite to replace its results, or choose "
                             "another folder")
        run_lock = file_lock(out / LOCK_FILE, exclusive=owner != self.job_fp, blocking=False)
        if run_lock is None:  # taking the folder over (or starting it) while another request's run writes there
            raise ValueError(f"another fastmaisi generate is writing into {str(out)!r}; wait for it to finish or "
                             "choose another folder")
        self._locks.append(run_lock)
        if owner != self.job_fp:
            os.replace(self._write_tmp(job_path), job_path)
            self.fresh = True
            relock(run_lock, exclusive=False, blocking=True)
        name = f".fastmaisi-shard-{self.shard.index}-of-{self.shard.count}.lock"
        shard_lock = file_lock(out / name, exclusive=True, blocking=False)
        if shard_lock is None:
            raise ValueError(f"another fastmaisi generate is already making shard {self.shard} of this request in "
                             f"{str(out)!r}; wait for it to finish (a rerun then resumes)")
        self._locks.append(shard_lock)

    def _read_job(self, path: Path) -> str | None:
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())["fingerprint"]
        except (ValueError, KeyError, TypeError):
            return "unreadable"

    def _job_bytes(self) -> bytes:
        body = {"schema": JOB_SCHEMA, "fingerprint": self.job_fp, **self.job}
        return (json.dumps(_jsonable(body), indent=1) + "\n").encode()

    def _write_tmp(self, path: Path) -> Path:
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.write_bytes(self._job_bytes())
        return tmp

    def _foreign_records(self) -> list[Path]:
        """Records in the folder not made by this job (no job file yet: an older run, or another tool's files)."""
        foreign = []
        for rec in sorted(self.out.glob("*_record.json")):
            try:
                fp = (json.loads(rec.read_text()).get("fingerprint") or {}).get("job")
            except (ValueError, AttributeError):
                fp = None
            if fp != self.job_fp:
                foreign.append(rec)
        return foreign

    def sort(self, samples: Iterable, sample_fp) -> Sorted:
        """Split this shard's samples into kept (complete) and to make; remove the leftovers of the ones to make.
        `sample_fp(sample)` is its fingerprint; samples have `.stem`. Raises ValueError for samples made by another
        request (unless overwrite)."""
        temporaries = _temporaries(self.out)
        todo, kept, conflicts, removed = [], [], [], 0
        for sample in samples:
            state, record = record_state(self.out, sample.stem, sample_fp(sample))
            if state == "complete":
                kept.append(record)
                continue
            if state == "conflict" or (state == "incomplete" and self.fresh):
                conflicts.append(sample)  # not ours to delete without asking
            todo.append(sample)
        if conflicts and not self.overwrite:
            raise ValueError(f"{len(conflicts)} output(s) in {str(self.out)!r} were made by a different request "
                             f"({_names([s.stem for s in conflicts])}); pass --overwrite to replace them, or choose "
                             "another folder")
        for sample in todo:  # leftovers of an interrupted run of this job (or, with overwrite, what it replaces)
            finals = {p.name for fmt in ("nifti", "dicom") for p in output_paths(self.out, sample.stem, fmt).values()}
            leftovers = _files_of(self.out, sample.stem) + [t for name in finals for t in temporaries.get(name, [])]
            for path in leftovers:
                _remove(path)
            removed += len(leftovers)
        return Sorted(todo=todo, kept=kept, removed=removed)


def _names(items: list) -> str:
    names = [Path(str(p)).name for p in items]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
