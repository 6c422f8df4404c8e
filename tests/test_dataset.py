"""Synthetic datasets with `generate` on CPU, the built-in demo networks: resume after kill -9, more samples, shards
(--shard, torchrun with 2 gloo processes) equal to one run, manifests (refused whole on a bad row), a different
request refused, locks, Ctrl-C, byte-reproducible files and index.csv."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastmaisi.pipelines.generate_cli import generate_main

FAST = ["--steps", "2", "--mask-steps", "2", "--max-retries", "0", "-q"]  # demo networks, seconds a sample
IMAGE = ["--workflow", "image", "--steps", "2", "-q", "--seed", "7"]  # image only: no quality check, exit 0
OK = (0, 3)  # 3: written, but the 2-step demo samples may fail the HU quality check (the exit status says so)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def records(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*_record.json"))


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def errors(capsys) -> list[str]:
    """The error lines of stderr (the demo's "no --weights" note aside)."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("no --weights")]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def test_kill_9_then_rerun_finishes_and_more_samples_adds_only_the_missing(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-o", str(out), "--num-samples", "3", *IMAGE]
    proc = subprocess.Popen([sys.executable, "-m", "fastmaisi", "generate", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "sample_000007_record.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # killed once the first sample is complete: sample 1 is on its way
    proc.wait()
    assert first.exists() and len(records(out)) < 3
    kept = {p.name: digest(p) for p in out.glob("sample_000007_*")}
    # what a kill during a write leaves: a hidden temporary and a file of a set without its record
    (out / ".sample_000009_image.nii.gz.partial-999-abcd1234").write_bytes(b"half")
    (out / "sample_000009_preview.png").write_bytes(b"half")
    assert generate_main(args) == 0
    assert records(out) == [f"sample_00000{i}_record.json" for i in (7, 8, 9)]
    assert {p.name: digest(p) for p in out.glob("sample_000007_*")} == kept  # the complete sample is untouched
    assert temporaries(out) == []
    for i in (7, 8, 9):  # every set whole: nibabel reads it, the preview is a PNG
        assert nib.load(out / f"sample_00000{i}_image.nii.gz").get_fdata().std() > 0
        assert (out / f"sample_00000{i}_preview.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] >= 1 and summary["made"] == 3 - summary["kept"]
    assert generate_main(["-o", str(out), "--num-samples", "4", *IMAGE]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {**summary, "made": 1, "kept": 3} and len(records(out)) == 4
    assert {p.name: digest(p) for p in out.glob("sample_000007_*")} == kept
    index = (out / "index.csv").read_text().splitlines()
    assert len(index) == 5 and index[1].startswith("sample_000007,sample_000007_image.nii.gz")


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """One process, three image-only demo samples: what every sharded run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert generate_main(["-o", str(out), "--num-samples", "3", *IMAGE]) == 0
    return out


def same_volumes(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in b.glob("*.nii.gz"))
    for name in names:
        assert digest(a / name) == digest(b / name), name  # same seed, same voxels, same gzip bytes


def test_shards_together_equal_one_run(unsharded, tmp_path):
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "--num-samples", "3", "--shard", "1/2", *IMAGE]) == 0
    assert records(out) == ["sample_000008_record.json"]
    assert generate_main(["-o", str(out), "--num-samples", "3", "--shard", "0/2", *IMAGE]) == 0
    same_volumes(unsharded, out)
    shards = {json.loads((out / r).read_text())["sample"]["shard"] for r in records(out)}
    assert shards == {"0/2", "1/2"}
    assert len((out / "index.csv").read_text().splitlines()) == 4  # the last shard to finish lists all


def test_slurm_array_task_picks_the_shard(unsharded, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # --array=1-3: the third task
    assert generate_main(["-o", str(out), "--num-samples", "3", *IMAGE]) == 0
    assert records(out) == ["sample_000009_record.json"]
    assert digest(out / "sample_000009_image.nii.gz") == digest(unsharded / "sample_000009_image.nii.gz")


def test_torchrun_two_processes_equal_one(unsharded, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "-m", "fastmaisi", "generate", "-o", str(out), "--num-samples", "3", "--device", "cpu", *IMAGE]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    same_volumes(unsharded, out)
    ranks = {r: json.loads((out / r).read_text())["rank"] for r in records(out)}
    assert ranks == {"sample_000007_record.json": 0, "sample_000008_record.json": 1, "sample_000009_record.json": 0}
    assert done.stdout.count("wrote ") == 3


def test_different_request_refused_then_overwrite(unsharded, tmp_path, capsys):
    out = tmp_path / "out"
    import shutil

    shutil.copytree(unsharded, out)
    before = {p.name: digest(p) for p in out.iterdir() if p.is_file()}
    assert generate_main(["-o", str(out), "--num-samples", "3", *IMAGE]) == 0  # the same request: nothing to do
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["made"] == 0
    for other in (["--seed", "8"], ["--guidance-scale", "2"]):
        assert generate_main(["-o", str(out), "--num-samples", "1", *IMAGE, *other]) == 2
        err = errors(capsys)
        assert len(err) == 1 and "--overwrite" in err[0]
        assert {p.name: digest(p) for p in out.iterdir() if p.is_file() and p.name != "index.csv"} == \
            {k: v for k, v in before.items() if k != "index.csv"}
    assert generate_main(["-o", str(out), "--num-samples", "1", *IMAGE, "--guidance-scale", "2", "--overwrite"]) == 0
    rec = json.loads((out / "sample_000007_record.json").read_text())
    assert rec["resolved"]["guidance_scale"] == 2.0 and digest(out / "sample_000007_image.nii.gz") != before[
        "sample_000007_image.nii.gz"]


def test_concurrent_runs_are_refused_by_the_locks(unsharded, tmp_path, capsys):
    import shutil

    from fastmaisi.io.locks import file_lock

    out = tmp_path / "out"
    shutil.copytree(unsharded, out)
    held = file_lock(out / ".fastmaisi-shard-0-of-1.lock", exclusive=True, blocking=False)  # a run in progress
    run = file_lock(out / ".fastmaisi.lock", exclusive=False, blocking=True)
    try:
        assert generate_main(["-o", str(out), "--num-samples", "4", *IMAGE]) == 2
        assert "already making shard 0/1" in capsys.readouterr().err
        assert generate_main(["-o", str(out), *IMAGE, "--seed", "1", "--overwrite"]) == 2  # no take-over mid-run
        assert "another fastmaisi generate is writing" in capsys.readouterr().err
    finally:
        held.close()
        run.close()
    assert records(out) == records(unsharded)


def test_ctrl_c_exits_130_keeps_complete_samples(tmp_path, monkeypatch, capsys):
    from fastmaisi.pipelines import generate as gen

    real, calls = gen.one_volume, []

    def interrupted_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "one_volume", interrupted_second)
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "--num-samples", "3", *IMAGE]) == 130
    err = errors(capsys)
    assert len(err) == 1 and "interrupted" in err[0] and "again" in err[0]
    assert records(out) == ["sample_000007_record.json"] and temporaries(out) == []
    monkeypatch.setattr(gen, "one_volume", real)
    assert generate_main(["-o", str(out), "--num-samples", "3", *IMAGE]) == 0
    assert len(records(out)) == 3


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_with_bad_rows_is_refused_whole(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.csv", "seed,size,organ_size,steps\n"
                              "1,64 64 64,liver=0.5,2\n"
                              "2,60 64 64,,2\n"
                              "3,64x64x64,livr=0.5,2\n"
                              "4,,,two\n")
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "--manifest", str(manifest), "-q"]) == 2
    err = errors(capsys)
    assert len(err) == 1 and "3 bad row(s)" in err[0]
    assert "line 3: --size 60" in err[0] and "line 4: organ sizes" in err[0] and "line 5: steps 'two'" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("text,needle", [
    ('{"seed": 1, "variant": "rflow-ct"}\n', "line 1: column 'variant' is set per run"),
    ('{"seed": 1}\n{"seed": 1}\n', "lines 1, 2: the same output name sample_000001"),
    ('{"seed": 1, "colour": 3}\nnot json\n', "line 1: unknown column 'colour'; line 2: not JSON"),
    ('{"seed": 1.5}\n', "line 1: seed 1.5: expected an integer"),
    ('{"mask": "missing.nii.gz"}\n', "mask"),
])
def test_manifest_jsonl_errors_name_their_lines(tmp_path, capsys, text, needle):
    manifest = write_manifest(tmp_path / "m.jsonl", text)
    assert generate_main(["-o", str(tmp_path / "out"), "--manifest", str(manifest), "-q"]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_manifest_rows_make_their_samples_and_resume(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.jsonl",
                              '{"seed": 3, "workflow": "image", "guidance": 1.5}\n'
                              '{"seed": 4, "name": "liver_big", "organ_sizes": {"liver": 0.7}, "spacing": [4, 4, 4]}\n')
    out = tmp_path / "out"
    args = ["-o", str(out), "--manifest", str(manifest), *FAST]
    assert generate_main(args) in OK
    a = json.loads((out / "sample_000003_record.json").read_text())
    b = json.loads((out / "liver_big_record.json").read_text())
    assert a["workflow"] == "image" and a["resolved"]["guidance_scale"] == 1.5 and a["sample"]["manifest_line"] == 1
    assert b["workflow"] == "paired" and b["resolved"]["anatomy"][1] == 0.7 and b["resolved"]["spacing"] == [4, 4, 4]
    assert b["seed"] == 4 and b["request"]["num_samples"] == 1 and b["sample"]["manifest_line"] == 2
    capsys.readouterr()
    manifest.write_text(manifest.read_text() + '{"seed": 5, "workflow": "image"}\n')  # one more row: one more sample
    assert generate_main(args) in OK
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["made"] == 1
    manifest.write_text(manifest.read_text().replace('"guidance": 1.5', '"guidance": 2'))  # a changed row
    assert generate_main(args) == 2
    assert "sample_000003" in capsys.readouterr().err


def test_same_inputs_give_the_same_bytes_and_no_name_in_the_gzip_header(unsharded, tmp_path, monkeypatch):
    import gzip

    from fastmaisi.io import nifti

    data = (unsharded / "sample_000007_image.nii.gz").read_bytes()
    assert data[3] & 0x08 == 0 and data[4:8] == b"\0\0\0\0"  # no FNAME field, mtime 0
    monkeypatch.setattr(nifti, "_gzip_class", lambda: gzip.GzipFile)  # without python-isal: zlib, same rules
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), *IMAGE]) == 0
    again = (out / "sample_000007_image.nii.gz").read_bytes()
    assert again[3] & 0x08 == 0 and again[4:8] == b"\0\0\0\0"
    a = np.asarray(nib.load(unsharded / "sample_000007_image.nii.gz").dataobj)
    assert np.array_equal(a, np.asarray(nib.load(out / "sample_000007_image.nii.gz").dataobj))
    assert json.loads((out / "sample_000007_record.json").read_text())["deflate"] == "zlib"


def test_index_command(unsharded, tmp_path, capsys):
    from fastmaisi.cli import main

    (unsharded / "index.csv").unlink()
    assert main(["index", str(unsharded), "--verify"]) == 0
    assert "3 complete samples" in capsys.readouterr().out
    rows = (unsharded / "index.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("name,image,label") and ",not run," in rows[1]
    assert main(["index", str(tmp_path / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_isal_deflate_writes_gzip_nibabel_reads_with_the_same_header_rules(tmp_path, monkeypatch):
    pytest.importorskip("isal")
    from fastmaisi.io import nifti, write_nifti

    volume = (np.arange(32 * 32 * 16) % 2001 - 1000).astype(np.int16).reshape(32, 32, 16)
    assert nifti.deflate_name() == "isal"
    a = write_nifti(tmp_path / "a.nii.gz", volume, (1, 1, 1))
    b = write_nifti(tmp_path / "b.nii.gz", volume, (1, 1, 1))
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[3] & 0x08 == 0
    assert np.array_equal(np.asarray(nib.load(a).dataobj), volume)
    import zlib

    one = zlib.decompressobj(31)  # one gzip member (readers that stop after the first member see the whole volume)
    one.decompress(a.read_bytes())
    assert one.eof and one.unused_data == b""
    big = np.random.default_rng(0).integers(-1000, 1000, (128, 128, 96)).astype(np.int16)  # 3 MiB: several blocks
    made = []
    for threads in (1, 3):  # the same bytes whatever the number of cores
        monkeypatch.setattr(nifti, "_deflate_threads", lambda: threads)
        made.append(write_nifti(tmp_path / f"big{threads}.nii.gz", big, (1, 1, 1)).read_bytes())
    assert made[0] == made[1]
    assert np.array_equal(np.asarray(nib.load(tmp_path / "big3.nii.gz").dataobj), big)


def test_shard_sources_compose():
    from fastmaisi.pipelines.shards import Shard, current_shard, parse_shard

    assert parse_shard("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(Exception):
            parse_shard(bad)
    assert current_shard(None, {}) == Shard(0, 1)
    assert current_shard(None, {"RANK": "3", "WORLD_SIZE": "4"}) == Shard(3, 4)
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10"}
    assert current_shard(None, slurm) == Shard(2, 3)
    assert current_shard(None, {**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == Shard(5, 6)  # array of torchrun jobs
    assert current_shard(Shard(1, 2), {**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == Shard(3, 4)  # --shard wins
    with pytest.raises(ValueError, match="contiguous"):
        current_shard(None, {**slurm, "SLURM_ARRAY_TASK_ID": "20"})
    assert sorted(i for s in range(3) for i in range(10) if Shard(s, 3).takes(i)) == list(range(10))


def test_manifest_csv_cells_become_typed_request_fields(tmp_path):
    from fastmaisi.pipelines.generate import GenerateRequest
    from fastmaisi.pipelines.manifest import read_manifest

    (tmp_path / "m.csv").write_text("# comment\nseed,size,spacing,organ_size,guidance,workflow,mask,name,strict_mask\n"
                                    '5,256x256x128,"[1.5, 1.5, 2]",liver=0.5;spleen_tumor=-1,2.5,paired,,a1,yes\n'
                                    '6,,,"{""liver"": 0.2}",,,masks/m.nii.gz,,\n')
    a, b = read_manifest(tmp_path / "m.csv", GenerateRequest)
    assert a.line == 3 and b.line == 4 and a.name == "a1" and b.name is None and not a.error
    assert a.values == {"seed": 5, "size": (256, 256, 128), "spacing": (1.5, 1.5, 2.0),
                        "organ_sizes": {"liver": 0.5, "spleen tumor": -1.0}, "guidance_scale": 2.5,
                        "workflow_name": "paired", "strict_mask": True}
    assert b.values == {"seed": 6, "organ_sizes": {"liver": 0.2}, "mask": str(tmp_path / "masks" / "m.nii.gz")}


def test_writer_hands_its_error_to_the_caller_and_stays_bounded():
    import threading

    from fastmaisi.pipelines.writer import BackgroundWriter

    gate, seen = threading.Event(), []

    def finish(item):
        gate.wait()
        if item == "bad":
            raise OSError(28, "no space left on device")
        seen.append(item)

    writer = BackgroundWriter(finish, max_pending=1)
    writer.submit("a")  # taken by the worker, which waits at the gate
    time.sleep(0.2)
    writer.submit("bad")  # waits in the queue (max_pending 1)
    blocked = threading.Thread(target=writer.submit, args=("c",), daemon=True)
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # a third volume is not accepted while one waits: memory stays flat
    gate.set()
    blocked.join(5)
    with pytest.raises(OSError, match="no space"):
        writer.wait_idle()
    writer.close(raise_error=False)
    assert seen == ["a"]  # nothing written after the failure


def test_quality_check_histogram_medians_and_device_hu_conversion_match_numpy():
    """The two host-side speed-ups of a sample's CPU work give numpy's exact values (medians; int16 intensities)."""
    import torch

    from fastmaisi.io import hu_from_unit
    from fastmaisi.io.volumes import _hu_from_tensor
    from fastmaisi.labels import _group_medians

    rng = np.random.default_rng(0)
    for trial in range(20):
        shape = (int(rng.integers(1, 30)),) * 3
        group = rng.integers(0, 8, size=shape).astype(np.uint8)
        group[group == trial % 8] = 0  # some groups empty
        image = rng.integers(-1000, 1001, size=shape).astype(np.int16)
        expected = [float(np.median(image[group == k])) if (group == k).any() else None for k in range(1, 8)]
        assert _group_medians(image, group, 7) == expected
        assert _group_medians(image.astype(np.float32), group, 7) == expected  # the general path
    unit = rng.random((32, 32, 32), dtype=np.float32) * 1.2 - 0.1
    unit.flat[:500] = (np.arange(500) + 0.5) / 2000  # exact .5 HU: both round half to even
    for modality in ("ct", "mr"):
        assert np.array_equal(_hu_from_tensor(torch.from_numpy(unit), modality), hu_from_unit(unit, modality))


def test_ranks_taking_over_a_folder_with_overwrite_all_start(tmp_path):
    """torchrun ... --overwrite into another request's folder: the first rank takes it over, the others join."""
    from fastmaisi.pipelines.run_folder import JOB_FILE, RunFolder
    from fastmaisi.pipelines.shards import Shard

    out = tmp_path / "out"
    out.mkdir()
    with RunFolder(out, "old", {}, Shard(0, 1)):
        pass
    rank0 = RunFolder(out, "new", {}, Shard(0, 2), overwrite=True).__enter__()
    rank1 = RunFolder(out, "new", {}, Shard(1, 2), overwrite=True).__enter__()  # joins while rank 0 runs
    assert json.loads((out / JOB_FILE).read_text())["fingerprint"] == "new" and rank0.fresh and not rank1.fresh
    with pytest.raises(ValueError, match="another fastmaisi generate is writing"):
        RunFolder(out, "third", {}, Shard(0, 1), overwrite=True).__enter__()  # no take-over while they run
    rank0.close()
    rank1.close()


def test_manifest_of_masks_reads_the_next_mask_ahead(tmp_path):
    from fastmaisi.phantom import make_phantom

    for seed in (1, 2):
        _, label = make_phantom((64, 64, 64), (4.5, 4.5, 4.0), seed=seed)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.diag([4.5, 4.5, 4.0, 1.0])), tmp_path / f"m{seed}.nii.gz")
    manifest = write_manifest(tmp_path / "m.csv", "seed,mask\n1,m1.nii.gz\n2,m2.nii.gz\n")
    out = tmp_path / "out"
    assert generate_main(["-o", str(out), "--manifest", str(manifest), *FAST]) in OK
    for seed, mask in ((1, "m1"), (2, "m2")):
        record = json.loads((out / f"sample_00000{seed}_record.json").read_text())
        assert record["workflow"] == "from-mask" and record["mask"]["sha256"] == digest(tmp_path / f"{mask}.nii.gz")
        label = np.asarray(nib.load(out / f"sample_00000{seed}_label.nii.gz").dataobj)
        assert (label == 200).any()


def test_a_sample_with_a_damaged_file_is_made_again(unsharded, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(unsharded, out)
    image = out / "sample_000008_image.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])  # truncated (a copy cut short): its recorded size differs
    assert generate_main(["-o", str(out), "--num-samples", "3", *IMAGE]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["made"] == 1
    assert image.read_bytes() == whole
