"""`fastmaisi bench` on a tiny configuration: the JSON has every stage for both implementations, all positive."""

import json
import math

import pytest

from fastmaisi.bench import bench_main

pytest.importorskip("monai")


def test_tiny_bench_structure(tmp_path):
    assert bench_main(["--tiny", "--reference", "--device", "cpu", "--repeats", "1", "-o", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "bench.json").read_text())
    assert "random" in out["weights"] and out["device"] == "cpu"
    assert {r["impl"] for r in out["rows"]} == {"ours", "reference"}
    for r in out["rows"]:
        for key in ("dm_step_s", "rflow30_s", "ddpm1000_s", "decode_s"):
            assert r[key] > 0 and math.isfinite(r[key]), key
    ours = [r for r in out["rows"] if r["impl"] == "ours"]
    assert all(r["dm_speedup"] > 0 and r["decode_speedup"] > 0 for r in ours)
    assert {m["impl"] for m in out["mask_stage"]} == {"ours", "reference"}
    assert all(m["step_s"] > 0 for m in out["mask_stage"])
    assert {r["impl"] for r in out["training"]} == {"ours-full", "ours-selective", "ours-outer", "ours-none",
                                                    "reference"}
    assert all(r["step_s"] > 0 for r in out["training"])
    assert {r["impl"] for r in out["vae_training"]} == {"ours", "reference"}
    assert all(r["step_s"] > 0 and r["patch"] == [16, 16, 16] for r in out["vae_training"])
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| 32x32x32 |") == 2
    assert table.count("| 16x16x16 |") == 2
