"""What the app's viewer loads (`GET /api/jobs/{id}/view/{kind}`, fastmaisi.app.views): a volume over 256^3 voxels
comes as a reduced display copy (block-averaged image, nearest-sampled label ids, an affine that overlays where the
full volume lies), written once into the job folder; a small volume comes unchanged; nothing outside the job folder."""

from __future__ import annotations

import gzip
import itertools
import types

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fastmaisi.app import views  # noqa: E402
from fastmaisi.app.jobs import Job, new_job_id  # noqa: E402
from fastmaisi.app.server import create_app  # noqa: E402
from fastmaisi.pipelines import models as model_io  # noqa: E402

LARGE = (300, 280, 220)  # 18.5 M voxels > 256^3; spacing 0.8 x 0.8 x 1.5 mm -> factors (2, 2, 1)
AFFINE = np.array([[-0.8, 0, 0, 120.0], [0, -0.8, 0, 95.5], [0, 0, 1.5, -310.25], [0, 0, 0, 1]])


@pytest.mark.parametrize("shape, spacing, factors", [
    ((64, 64, 64), (1, 1, 1), (1, 1, 1)),
    ((512, 512, 64), (0.8, 0.8, 2.5), (1, 1, 1)),  # exactly 256^3: as it is
    ((512, 512, 512), (1, 1, 1), (2, 2, 2)),
    ((512, 512, 128), (0.7, 0.7, 2.5), (2, 2, 1)),  # the coarse axis keeps its slices
    ((300, 280, 220), (0.8, 0.8, 1.5), (2, 2, 1)),  # square voxels stay square
    ((1024, 64, 1024), (1, 1, 1), (2, 2, 2)),
])
def test_reduction_factors_give_at_most_256_cubed(shape, spacing, factors):
    assert views.reduction_factors(shape, spacing) == factors
    assert np.prod([-(-n // f) for n, f in zip(shape, factors)]) <= views.MAX_VOXELS


def test_block_mean_nearest_sample_and_affine_match_a_voxel_by_voxel_oracle():
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 2000, size=(7, 8, 5)).astype(np.int16)
    f = (2, 3, 2)  # partial blocks on axes 0, 1 and 2
    mean, near = views.block_mean(data, f), views.nearest_sample(data, f)
    aff = views.view_affine(AFFINE, f)
    assert mean.shape == near.shape == (4, 3, 3) and mean.dtype == np.int16
    for i, j, k in itertools.product(*map(range, mean.shape)):
        block = data[i * f[0]:(i + 1) * f[0], j * f[1]:(j + 1) * f[1], k * f[2]:(k + 1) * f[2]]
        assert mean[i, j, k] == np.rint(block.astype(np.float64).mean())
        src = [min(c * s + (s - 1) // 2, n - 1) for c, s, n in zip((i, j, k), f, data.shape)]
        assert near[i, j, k] == data[tuple(src)]
        if block.shape == f:  # a full block: the view voxel lies at the centre of its source voxels
            centre = np.mean([AFFINE @ [a, b, c, 1] for a, b, c in itertools.product(
                *(range(x * s, (x + 1) * s) for x, s in zip((i, j, k), f)))], axis=0)
            np.testing.assert_allclose(aff @ [i, j, k, 1], centre, atol=1e-9)


def _save(path, data, affine=AFFINE):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    out = tmp_path_factory.mktemp("app_view")
    with TestClient(create_app(out)) as c:
        c.output_dir = out
        yield c
    model_io.keep_networks_loaded(False)


def _job(client, image, label=None, status="done") -> tuple[str, object]:
    """A job of `client`'s server whose folder holds `image` (and `label`) NIfTI files, as generate leaves them."""
    job_id = new_job_id()
    folder = client.output_dir / job_id
    folder.mkdir()
    paths = {"image": _save(folder / "sample_image.nii.gz", image)}
    if label is not None:
        paths["label"] = _save(folder / "sample_label.nii.gz", label)
    job = Job(id=job_id, request=types.SimpleNamespace(workflow="paired"), folder=folder, plan={}, status=status,
              results=[{"paths": {k: str(v) for k, v in paths.items()}, "record": {}}] if status == "done" else [])
    client.app.state.queue.jobs[job_id] = job
    return job_id, folder


@pytest.fixture(scope="module")
def large(client):
    z = np.linspace(-1, 1, LARGE[2], dtype=np.float32)
    image = (np.arange(LARGE[0])[:, None, None] * 3 + np.arange(LARGE[1])[None, :, None] - 400
             + (100 * z)[None, None, :]).astype(np.int16)
    label = np.zeros(LARGE, np.uint8)
    label[40:200, 30:150, 20:120] = 1
    label[101:103, 60:70, 50:60] = 200  # two voxels thick on the reduced axis: ids must survive as they are
    label[250:, 200:, 150:] = 132
    job_id, folder = _job(client, image, label)
    return job_id, folder, image, label


def _nifti(response):
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(response.content)


def test_large_volume_gets_a_display_copy_that_overlays(client, large):
    job_id, folder, image, label = large
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["view"] == {"shape": [150, 140, 220], "source_shape": list(LARGE), "factors": [2, 2, 1],
                           "reduced": True,
                           "names": {"image": "sample_image_view.nii", "label": "sample_label_view.nii"}}
    view_image = _nifti(client.get(f"/api/jobs/{job_id}/view/image"))
    view_label = _nifti(client.get(f"/api/jobs/{job_id}/view/label"))
    assert view_image.shape == view_label.shape == (150, 140, 220) and np.prod(view_image.shape) <= 256 ** 3
    assert view_image.get_data_dtype() == np.int16 and view_label.get_data_dtype() == np.uint8
    for v in (view_image, view_label):  # a voxel's world position: the centre of the source voxels it stands for
        np.testing.assert_allclose(v.affine, views.view_affine(AFFINE, (2, 2, 1)))
        np.testing.assert_allclose(v.header.get_qform(), v.affine)
        i, j, k = 17, 100, 101
        block = [AFFINE @ [2 * i + a, 2 * j + b, k, 1] for a in (0, 1) for b in (0, 1)]
        np.testing.assert_allclose(v.affine @ [i, j, k, 1], np.mean(block, axis=0))
    small = np.asarray(view_image.dataobj)
    means = image.astype(np.float64).reshape(150, 2, 140, 2, 220).mean(axis=(1, 3))
    np.testing.assert_array_equal(small, np.rint(means).astype(np.int16))
    lab = np.asarray(view_label.dataobj)
    np.testing.assert_array_equal(lab, label[0::2, 0::2])
    assert set(np.unique(lab)) == {0, 1, 132, 200}
    # written once, uncompressed, in the job folder's .view/, not among the downloads
    copies = sorted(p.name for p in (folder / ".view").iterdir())
    assert copies == ["sample_image_view.nii", "sample_label_view.nii"]
    assert (folder / ".view" / copies[0]).read_bytes()[:4] != b"\x1f\x8b\x08\x00"
    assert {f["name"] for f in job["files"]} == {"sample_image.nii.gz", "sample_label.nii.gz"}
    mtime = (folder / ".view" / copies[0]).stat().st_mtime_ns
    client.get(f"/api/jobs/{job_id}/view/image")
    assert (folder / ".view" / copies[0]).stat().st_mtime_ns == mtime
    # the downloads stay full resolution
    r = client.get(f"/api/jobs/{job_id}/files/sample_image.nii.gz")
    assert r.status_code == 200 and nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).shape == LARGE


def test_small_volume_is_served_unchanged(client):
    rng = np.random.default_rng(1)
    image = rng.integers(-1000, 1000, size=(64, 64, 64)).astype(np.int16)
    job_id, folder = _job(client, image, (image > 0).astype(np.uint8))
    view = client.get(f"/api/jobs/{job_id}").json()["view"]
    assert view["reduced"] is False and view["names"] == {"image": "sample_image.nii.gz",
                                                          "label": "sample_label.nii.gz"}
    for kind in ("image", "label"):
        r = client.get(f"/api/jobs/{job_id}/view/{kind}")
        assert r.status_code == 200 and r.content == (folder / f"sample_{kind}.nii.gz").read_bytes()
    assert not (folder / ".view").exists()


def test_view_refuses_other_kinds_unknown_jobs_and_unfinished_jobs(client):
    image = np.zeros((64, 64, 64), np.int16)
    job_id, folder = _job(client, image)  # image only: no label
    assert client.get(f"/api/jobs/{job_id}/view/label").status_code == 404
    for kind in ("record", "%2E%2E", "..%2F..%2Fetc", "image%2F..%2F..%2Fx"):
        r = client.get(f"/api/jobs/{job_id}/view/{kind}")
        assert r.status_code in (404, 400), (kind, r.status_code)
    assert client.get("/api/jobs/20260101-000000-abcdef/view/image").status_code == 404
    queued, _ = _job(client, image, status="queued")
    assert client.get(f"/api/jobs/{queued}/view/image").status_code == 409
    assert "view" not in client.get(f"/api/jobs/{queued}").json()


def test_display_copy_stays_in_the_job_folder(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    source = _save(folder / "x_image.nii", np.zeros((320, 320, 180), np.int16))
    copy = views.display_copy(folder, source, "image")
    assert copy.parent == folder / ".view" and copy.name == "x_image_view.nii"
    assert nib.load(str(copy)).shape == (160, 160, 180) and sorted(tmp_path.iterdir()) == [folder]
    with pytest.raises(ValueError):
        views.display_copy(folder, source, "../x")
