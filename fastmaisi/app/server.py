"""`fastmaisi app`: a local web page and JSON API over `generate` (plan, queue, progress, view, download).

    GET  /                         the page (static files of this package; NiiVue vendored, nothing fetched online)
    GET  /api/config               variant, workflows, organ-size slots, defaults, the fields this pipeline accepts
    POST /api/plan                 the dry-run plan of a request (validated as the CLI validates it)
    POST /api/jobs                 queue a request -> {"id"}; JSON body, or multipart: `params` (JSON) + `mask` file
    GET  /api/jobs                 all jobs of this server (the queue survives a page reload)
    GET  /api/jobs/{id}            status, stage, progress, plan, record, label volumes, files
    GET  /api/jobs/{id}/files/{n}  one output file of the job (never a path outside its folder)
    GET  /api/jobs/{id}/dicom      the image as a DICOM series (+ SEG) in a zip, written on first request
    GET  /api/jobs/{id}/view/{kind} what the viewer loads (kind: image | label): the file itself up to 256^3 voxels,
                                   else a reduced display copy (fastmaisi.app.views), written on first request

Bad requests answer 4xx with {"error": one line, "field": the request field or null}.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastmaisi.app.jobs import JOB_ID, Job, JobQueue, new_job_id, plan_of
from fastmaisi.app.requests import RequestError, accepted_fields, build_request, field_of

STATIC = Path(__file__).parent / "static"
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
MASK_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".nrrd", ".mha", ".mhd")
MAX_MASK_BYTES = 1 << 30


class ApiError(Exception):
    """An answer other than 200: status code, message and the field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def create_app(output_dir: str | Path, weights: str | None = None, variant: str | None = None,
               device: str = "auto") -> FastAPI:
    """The application; jobs write to `output_dir/<job id>/`. Networks stay loaded between jobs."""
    from fastmaisi.pipelines.models import keep_networks_loaded
    from fastmaisi.variants import get_variant

    keep_networks_loaded()
    output_dir = Path(output_dir).resolve()
    server = {"weights": weights, "variant": variant, "device": device}
    variant_obj = get_variant(variant or ("rflow-ct" if weights else "demo"))
    app = FastAPI(title="fastmaisi", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.queue = JobQueue()
    app.state.output_dir = output_dir

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        return JSONResponse({"error": f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
                             "field": loc[0] if loc else None}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):  # the trace goes to the server's log, one line to the client
        first = str(exc).splitlines()[0] if str(exc) else ""
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {first}", "field": None},
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail), "field": None}, status_code=exc.status_code)

    @app.get("/api/config")
    def config():
        return _config(variant_obj, weights, device)

    @app.post("/api/plan")
    async def plan(request: Request):
        params, upload = await _read_body(request)
        with tempfile.TemporaryDirectory(prefix="fastmaisi-plan-") as folder:  # the upload, while it is checked
            req, plan_ = await run_in_threadpool(_checked_plan, params, upload, Path(folder), server)
        return {"workflow": req.workflow, **plan_}

    @app.post("/api/jobs")
    async def submit(request: Request):
        params, upload = await _read_body(request)
        job_id = new_job_id()
        folder = output_dir / job_id
        try:
            req, plan_ = await run_in_threadpool(_checked_plan, params, upload, folder, server)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # nothing half-made stays behind
            raise
        job = app.state.queue.submit(Job(id=job_id, request=req, folder=folder, plan=plan_))
        return {"id": job.id, "status": job.status, "position": app.state.queue.position(job)}

    @app.get("/api/jobs")
    def jobs():
        q = app.state.queue
        return {"jobs": [{"id": j.id, "status": j.status, "stage": j.stage, "workflow": j.request.workflow,
                          "created": j.created} for j in q.list()]}

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        job = _job(app, job_id)
        out = {**job.summary(), "position": app.state.queue.position(job) if job.status == "queued" else None}
        if job.status == "done" and str(out.get("outputs", {}).get("image", "")).endswith((".nii", ".nii.gz")):
            from fastmaisi.app.views import copy_name, view_info

            view = view_info(job.folder / out["outputs"]["image"])
            view["names"] = {k: copy_name(out["outputs"][k]) if view["reduced"] else out["outputs"][k]
                             for k in ("image", "label") if k in out["outputs"]}  # NiiVue reads the format from it
            out["view"] = view
        return out

    @app.get("/api/jobs/{job_id}/files/{name}")
    def job_file(job_id: str, name: str):
        job = _job(app, job_id)
        return FileResponse(_file_in(job.folder, name), filename=name)

    @app.get("/api/jobs/{job_id}/dicom")
    def job_dicom(job_id: str):
        from fastmaisi.app.exports import dicom_zip

        job = _job(app, job_id)
        if job.status != "done":
            raise ApiError(409, f"job {job_id} is {job.status}: DICOM comes once it is done", "id")
        try:
            path = dicom_zip(job.folder, job.results[0], variant_obj.modality)
        except (ImportError, ValueError) as exc:
            raise ApiError(501 if isinstance(exc, ImportError) else 422, str(exc).splitlines()[0], None) from None
        return FileResponse(path, filename=path.name, media_type="application/zip")

    @app.get("/api/jobs/{job_id}/view/{kind}")
    def job_view(job_id: str, kind: str):
        from fastmaisi.app.views import display_copy

        job = _job(app, job_id)
        if kind not in ("image", "label"):
            raise ApiError(404, f"no view {kind!r}: image or label", "kind")
        if job.status != "done":
            raise ApiError(409, f"job {job_id} is {job.status}: its view comes once it is done", "id")
        outputs = {k: Path(v).name for k, v in job.results[0]["paths"].items()}
        if kind not in outputs or not outputs[kind].endswith((".nii", ".nii.gz")):
            raise ApiError(404, f"job {job_id} has no {kind} NIfTI", "kind")
        source = _file_in(job.folder, outputs[kind])
        path = display_copy(job.folder, source, kind, image_path=_file_in(job.folder, outputs["image"]))
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def _config(variant, weights, device) -> dict:
    from fastmaisi.labels import ANATOMY_SIZE_SLOTS, MODALITIES

    workflows = ["image"]
    if variant.has_controlnet:
        workflows.append("from-mask")
        if "mask_autoencoder" in variant.files:
            workflows.append("paired")
    demo = variant.name == "demo" and not weights
    return {
        "variant": variant.name, "modality": variant.modality, "demo": demo, "device": device,
        "notice": ("Built-in demo networks: 64\u00b3 toys trained on procedural phantoms, not real CT. Start "
                   "`fastmaisi app --weights DIR` to run NVIDIA's MAISI models.") if demo else None,
        "workflows": workflows, "default_workflow": "paired" if "paired" in workflows else workflows[0],
        "organ_slots": list(ANATOMY_SIZE_SLOTS), "organ_defaults": dict(variant.default_organ_sizes or {}),
        "defaults": {"size": list(variant.size), "spacing": list(variant.spacing), "steps": variant.steps,
                     "mask_steps": variant.mask_steps, "guidance_scale": variant.guidance_scale,
                     "modality": variant.modality_code, "seed": 0},
        "modalities": [{"name": n, "code": c} for n, c in MODALITIES.items()
                       if (c <= 7) == (variant.modality == "ct") and c > 0],
        "body_region": variant.body_region, "fields": accepted_fields(),
    }


async def _read_body(request: Request) -> tuple[dict, object | None]:
    """(JSON fields, uploaded mask or None) from a JSON body or a multipart form with `params` and `mask`."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        unknown = sorted(set(form) - {"params", "mask"})
        if unknown:
            raise ApiError(422, f"{unknown[0]}: not a form field; send `params` (JSON) and optionally `mask`",
                           unknown[0])
        try:
            params = json.loads(form.get("params") or "{}")
        except json.JSONDecodeError as exc:
            raise ApiError(422, f"params: not JSON ({exc.msg})", "params") from None
        upload = form.get("mask")
        if upload is not None and isinstance(upload, str):
            raise ApiError(422, "mask: expected a file upload", "mask")
        return params, (upload if upload is not None and upload.filename else None)
    body = await request.body()
    try:
        params = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, "the request body is not JSON", None) from None
    return params, None


def _checked_request(params, upload, folder: Path, server: dict):
    """Save the upload into `folder`, check it is a label map, build the GenerateRequest and `resolve` it."""
    mask_path = _save_mask(upload, folder) if upload is not None else None
    try:
        req = build_request(params, output_dir=str(folder), mask=mask_path, server=server)
        from fastmaisi.pipelines.generate import resolve

        resolve(req)
    except RequestError as exc:
        raise ApiError(422, str(exc), exc.field) from None
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        raise ApiError(422, message, field_of(message)) from None
    return req


def _save_mask(upload, folder: Path) -> str:
    from fastmaisi.io import read_label_map
    from fastmaisi.labels import validate_label_map

    name = (upload.filename or "").lower()
    suffix = next((s for s in MASK_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise ApiError(422, f"mask: {upload.filename!r} is not a label map file ({', '.join(MASK_SUFFIXES)})", "mask")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"input_mask{suffix}"
    with open(path, "wb") as f:
        shutil.copyfileobj(upload.file, f, length=1 << 20)
    if path.stat().st_size > MAX_MASK_BYTES:
        raise ApiError(413, "mask: file larger than 1 GiB", "mask")
    try:
        label, _, _ = read_label_map(path)
        validate_label_map(label)
    except Exception as exc:  # noqa: BLE001 - any reader failure means: not a label map we can use
        raise ApiError(422, f"mask: {upload.filename!r} is not a label map fastmaisi reads "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", "mask") from None
    return str(path)


def _checked_plan(params, upload, folder: Path, server: dict):
    """(GenerateRequest, plan): every check the CLI makes, then its dry run (both off the event loop)."""
    req = _checked_request(params, upload, folder, server)
    return req, _plan(req)


def _plan(req) -> dict:
    try:
        return plan_of(req)
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        raise ApiError(422, message, field_of(message)) from None


def _job(app, job_id: str) -> Job:
    job = app.state.queue.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, f"unknown job id {job_id!r}", "id")
    return job


def _file_in(folder: Path, name: str) -> Path:
    """`folder/name` if `name` is a plain file name of a file directly in `folder`; ApiError otherwise."""
    if not FILE_NAME.match(name) or ".." in name:
        raise ApiError(400, f"file name {name!r}: a plain file name of the job's folder is expected", "name")
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or not path.is_file():
        raise ApiError(404, f"no file {name!r} in this job", "name")
    return path


def serve(host: str, port: int, output_dir: str, weights: str | None, variant: str | None, device: str,
          quiet: bool = False) -> None:
    import uvicorn

    app = create_app(output_dir, weights=weights, variant=variant, device=device)
    print(f"fastmaisi app: http://{host}:{port}/  (outputs in {Path(output_dir).resolve()}; Ctrl-C stops)",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")
