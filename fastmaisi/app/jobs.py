"""The app's job queue: one worker thread runs `generate` for one job at a time, each job in its own folder.

Progress is read from the progress bars `generate` already draws (tqdm keeps the live ones in `tqdm._instances`):
the bar's description is the stage ("mask DM", "image DM", the decode's task) and its count the progress, so the
pipeline needs no second progress channel. One worker per app, and an app drives one device, so every live bar
belongs to the running job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _stdio
import json
import queue
import re
import secrets
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
_STDOUT_LOCK = threading.Lock()
_PLANS: dict[str, dict] = {}  # request (less its output folder) -> plan, for requests without a mask


def new_job_id() -> str:
    """Time-ordered, unguessable enough for a local tool: 20261207-153012-a1b2c3."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def plan_of(request) -> dict:
    """`generate --dry-run` for `request`: validates it exactly as the CLI does (ValueError on bad input) and returns
    the printed plan and any warnings (e.g. a field of view outside the training range). A request without a mask
    that was planned before (the page plans it, then submits it) is answered from memory: the dry run counts FLOPs
    on the meta device, seconds on a CPU."""
    from fastmaisi.pipelines.generate import generate

    key = None
    if not request.mask:
        fields = dataclasses.asdict(request)
        fields.pop("output_dir")
        key = json.dumps(fields, sort_keys=True, default=str)
        if key in _PLANS:
            return _PLANS[key]
    text = _stdio.StringIO()
    with _STDOUT_LOCK, warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(text):
        warnings.simplefilter("always")
        generate(request, progress=False, dry_run=True)
    lines = text.getvalue().strip().splitlines()
    if lines and lines[0].startswith("Plan (dry run"):
        lines = lines[1:]
    plan = {"text": "\n".join(lines), "warnings": [str(w.message) for w in caught]}
    if key is not None:
        if len(_PLANS) >= 256:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


@dataclass
class Job:
    """One generate request and what became of it."""

    id: str
    request: object  # GenerateRequest
    folder: Path
    plan: dict
    status: str = "queued"  # queued -> running -> done | failed
    stage: str = "queued"
    progress: float | None = None  # 0..1 within the stage, when the stage has a bar
    error: str | None = None
    results: list = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stages_seen: list = field(default_factory=list)
    last_bar: str | None = None

    def files(self) -> list[dict]:
        """Downloadable outputs: every plain file directly in the job folder (the uploaded mask included)."""
        if not self.folder.is_dir():
            return []
        return [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(self.folder.iterdir())
                if p.is_file() and not p.name.startswith(".")]

    def summary(self) -> dict:
        out = {"id": self.id, "status": self.status, "stage": self.stage, "progress": self.progress,
               "error": self.error, "plan": self.plan, "workflow": self.request.workflow,
               "created": self.created, "started": self.started, "finished": self.finished,
               "stages": list(self.stages_seen), "files": self.files()}
        if self.results:
            rec = self.results[0]["record"]
            out["record"] = rec
            out["outputs"] = {k: Path(v).name for k, v in self.results[0]["paths"].items()}
            labels = self.results[0]["paths"].get("labels")
            if labels and Path(labels).is_file():
                out["labels"] = json.loads(Path(labels).read_text())["labels"]
        return out


class JobQueue:
    """Jobs by id; a worker thread takes them in order. Lives as long as the server (not across restarts)."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self._todo: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run_forever, name="fastmaisi-app-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            self.jobs[job.id] = job
        self._todo.put(job.id)
        return job

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None and job.status == "running":
            _read_bars(job)
        return job

    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)

    def position(self, job: Job) -> int:
        """How many jobs run before this queued one (0: it is next)."""
        return sum(1 for j in self.jobs.values() if j.status in ("queued", "running") and j.created < job.created)

    def _run_forever(self):
        while True:
            job = self.jobs[self._todo.get()]
            self._run(job)

    def _run(self, job: Job):
        from fastmaisi.pipelines.generate import generate

        job.status, job.stage, job.started = "running", "loading networks", time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already reported in the plan
                job.results = generate(job.request, progress=True)
            job.status, job.stage, job.progress = "done", "done", 1.0
        except (ValueError, FileNotFoundError, PermissionError, OSError) as exc:
            job.status, job.stage, job.error = "failed", "failed", str(exc).splitlines()[0] if str(exc) else repr(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker; the server log gets the trace
            traceback.print_exc()
            job.status, job.stage, job.error = "failed", "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()


def _read_bars(job: Job) -> None:
    """Stage and progress of the running job from the live progress bars (the innermost one that has a total)."""
    from tqdm import tqdm

    bars = [b for b in list(getattr(tqdm, "_instances", ())) if not getattr(b, "disable", True) and b.total]
    if bars:
        bar = bars[-1]
        stage = str(bar.desc or "working").strip().rstrip(":")
        if stage not in job.stages_seen:
            job.stages_seen.append(stage)
        job.last_bar, job.stage, job.progress = stage, stage, min(1.0, bar.n / bar.total)
    elif job.last_bar:  # between bars: the next stage has not drawn one yet (decode, quality check, writing, ...)
        job.stage, job.progress = f"after {job.last_bar}", None
