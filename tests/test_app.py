"""`fastmaisi app`'s JSON API (FastAPI's test client): a paired demo job runs to done and downloads; the plan; every
kind of bad request answers 4xx with the field named; networks stay loaded between jobs."""

from __future__ import annotations

import gzip
import io
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fastmaisi.app.server import create_app  # noqa: E402
from fastmaisi.pipelines import models as model_io  # noqa: E402

FAST = {"steps": 4, "mask_steps": 10, "max_retries": 0}  # demo networks, few steps: a job takes seconds on a CPU


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    with TestClient(create_app(out)) as c:
        c.output_dir = out
        yield c
    model_io.keep_networks_loaded(False)


def _wait(client, job_id, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture(scope="module")
def done_job(client):
    r = client.post("/api/jobs", json={"workflow": "paired", "organ_sizes": {"liver": 0.12}, "seed": 7, **FAST})
    assert r.status_code == 200, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job
    return job


def test_config_lists_the_variants_slots_and_says_demo(client):
    cfg = client.get("/api/config").json()
    assert cfg["demo"] and "not real CT" in cfg["notice"]
    assert "liver" in cfg["organ_slots"] and cfg["workflows"] == ["image", "from-mask", "paired"]
    assert cfg["defaults"]["size"] == [64, 64, 64]


def test_paired_demo_job_runs_and_its_image_downloads_as_int16_nifti(client, done_job):
    import nibabel as nib

    assert done_job["workflow"] == "paired" and done_job["record"]["request"]["organ_sizes"] == {"liver": 0.12}
    assert done_job["record"]["resolved"]["steps"] == 4 and done_job["plan"]["text"].startswith("Mask: 10 steps")
    assert any(row["name"] == "liver" and row["volume_ml"] > 0 for row in done_job["labels"])
    names = {f["name"] for f in done_job["files"]}
    assert {done_job["outputs"]["image"], done_job["outputs"]["label"], done_job["outputs"]["record"]} <= names
    r = client.get(f"/api/jobs/{done_job['id']}/files/{done_job['outputs']['image']}")
    assert r.status_code == 200
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert img.get_data_dtype() == np.int16 and img.shape == (64, 64, 64)
    assert client.get("/api/jobs").json()["jobs"][0]["id"] == done_job["id"]
    # the viewer loads the demo's 64^3 files as they are (display copies are for volumes over 256^3)
    assert done_job["view"]["reduced"] is False and done_job["view"]["names"]["image"] == done_job["outputs"]["image"]
    assert client.get(f"/api/jobs/{done_job['id']}/view/image").content == r.content


def test_dicom_zip_of_a_done_job(client, done_job):
    import zipfile

    pytest.importorskip("highdicom")
    r = client.get(f"/api/jobs/{done_job['id']}/dicom")
    assert r.status_code == 200, r.text
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert sum(n.endswith(".dcm") for n in names) == 64 + 1  # one file per slice, plus the SEG


def test_networks_stay_loaded_between_jobs(client, done_job, monkeypatch):
    import fastmaisi.weights

    assert {key[0] for key in model_io._LOADED} >= {"autoencoder", "diffusion_unet", "mask_diffusion"}
    reads = []
    monkeypatch.setattr(fastmaisi.weights, "load_into", lambda *a, **k: reads.append(a) or {})
    r = client.post("/api/jobs", json={"workflow": "image", "seed": 8, "steps": 2})
    assert _wait(client, r.json()["id"])["status"] == "done"
    assert reads == []  # the image workflow's networks came from the first job


def test_plan_validates_like_the_cli_and_writes_nothing(client):
    before = sorted(client.output_dir.iterdir())
    r = client.post("/api/plan", json={"workflow": "image", "size": [64, 64, 96], "seed": 1})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["workflow"] == "image" and "16x16x24" in plan["text"] and "Decode" in plan["text"]
    assert sorted(client.output_dir.iterdir()) == before


@pytest.mark.parametrize("params, field", [
    ({"organ_sizes": {"spleen": 0.1}}, "organ_sizes"),
    ({"size": [60, 64, 64]}, "size"),
    ({"seed": "abc"}, "seed"),
    ({"steps": 0}, "steps"),
    ({"workflow": "sideways"}, "workflow"),
    ({"colour": "blue"}, "colour"),
    ({"workflow": "from-mask"}, "mask"),
])
def test_bad_requests_get_422_naming_the_field(client, params, field):
    before = sorted(client.output_dir.iterdir())
    for path in ("/api/plan", "/api/jobs"):
        r = client.post(path, json=params)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["field"] == field and r.json()["error"]
    assert sorted(client.output_dir.iterdir()) == before  # no job folder left behind


def test_a_file_that_is_not_a_label_map_is_refused(client):
    for name, data in (("mask.nii.gz", gzip.compress(b"not a nifti")), ("notes.txt", b"hello")):
        r = client.post("/api/jobs", data={"params": '{"workflow": "from-mask"}'},
                        files={"mask": (name, io.BytesIO(data), "application/octet-stream")})
        assert r.status_code == 422 and r.json()["field"] == "mask", r.text


def test_mask_upload_runs_the_from_mask_workflow_plan(client, done_job):
    label = client.get(f"/api/jobs/{done_job['id']}/files/{done_job['outputs']['label']}").content
    r = client.post("/api/plan", data={"params": '{"workflow": "from-mask"}'},
                    files={"mask": ("generated_label.nii.gz", io.BytesIO(label), "application/gzip")})
    assert r.status_code == 200, r.text
    assert r.json()["workflow"] == "from-mask" and "ControlNet + UNet" in r.json()["text"]


def test_unknown_job_and_paths_out_of_the_job_folder(client, done_job):
    assert client.get("/api/jobs/20260101-000000-abcdef").status_code == 404
    assert client.get("/api/jobs/../../etc").status_code == 404
    base = f"/api/jobs/{done_job['id']}/files"
    for name in ("%2E%2E", "..sample_000007_record.json", ".hidden", "a..b"):
        r = client.get(f"{base}/{name}")
        assert r.status_code == 400 and r.json()["field"] == "name", (name, r.text)
    assert client.get(f"{base}/..%2F..%2Fapp").status_code in (400, 404)
    assert client.get(f"{base}/nothing.nii.gz").status_code == 404


def test_cli_refuses_bad_options_in_one_line(capsys):
    from fastmaisi.app.cli import app_main

    import torch

    bad = [["--port", "0"], ["--weights", "/nonexistent/weights"], ["--device", "tpu"], ["--variant", "nope"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for argv in bad:
        assert app_main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(bad) and all(line.startswith("fastmaisi app") for line in err), err
