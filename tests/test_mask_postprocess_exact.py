"""The fast mask post-process gives the same voxels as its previous implementation (tests/mask_postprocess_oracle.py:
scipy binary morphology, one labelling per organ, one thread) on noisy label maps, for every tumour request."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fastmaisi.pipelines import mask_postprocess as mp
from mask_postprocess_oracle import postprocess_mask_reference

NOISE_IDS = np.array([1, 3, 4, 5, 10, 12, 13, 19, 23, 24, 25, 26, 27, 28, 29, 33, 37, 62, 128, 132, 200])
SIZES = {  # requested tumour -> organ-size vector
    None: [0.1] * 5 + [-1] * 5,
    23: [0.1] * 5 + [0.01, -1, -1, -1, -1],
    24: [0.1] * 5 + [-1, 0.01, -1, -1, -1],
    26: [0.1] * 5 + [-1, -1, 0.01, -1, -1],
    27: [0.1] * 5 + [-1, -1, -1, 0.01, -1],
    128: [0.1] * 5 + [-1, -1, -1, -1, 0.01],
}


def _noisy_map(seed: int, shape=(40, 44, 36)) -> np.ndarray:
    """Body with organ blocks, a vertebra column and bowel, then salt noise and small islands of random labels."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[3:-3, 3:-3, 2:-2] = 200
    for organ in (1, 3, 4, 12, 13, 19, 28, 29, 62, 37):
        lo = rng.integers(4, np.array(shape) - 14)
        hi = lo + rng.integers(4, 11, 3)
        label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = organ
    for tumour in (23, 24, 26, 27, 128):
        c = rng.integers(6, np.array(shape) - 6)
        label[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 2] = tumour
    for _ in range(40):  # islands of 1-8 voxels
        c = rng.integers(0, np.array(shape) - 2)
        e = rng.integers(1, 3, 3)
        label[c[0]:c[0] + e[0], c[1]:c[1] + e[1], c[2]:c[2] + e[2]] = rng.choice(NOISE_IDS)
    noise = rng.random(shape) < rng.choice([0.002, 0.01, 0.03])
    label[noise] = rng.choice(NOISE_IDS, noise.sum())
    return label


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", list(SIZES))
def test_fast_post_process_equals_the_previous_one(seed, target):
    label = _noisy_map(seed)
    before = label.copy()
    out = mp.postprocess_mask(label, SIZES[target])
    assert np.array_equal(label, before)  # the input is not written to
    assert out.dtype == label.dtype
    assert np.array_equal(out, postprocess_mask_reference(label, SIZES[target]))


def test_one_thread_and_several_agree(monkeypatch):
    assert 1 <= mp._workers(512 ** 3) <= mp._workers(64 ** 3) <= 16
    label = _noisy_map(7)
    monkeypatch.setattr(mp, "_workers", lambda *a: 4)
    several = mp.postprocess_mask(label, SIZES[23])
    monkeypatch.setattr(mp, "_workers", lambda *a: 1)
    assert np.array_equal(mp.postprocess_mask(label, SIZES[23]), several)


@pytest.mark.parametrize("shape", [(9, 7, 8), (1, 6, 5), (2, 2, 9), (12,), (5, 6)])
def test_shift_morphology_equals_scipys_cube_morphology(shape):
    rng = np.random.default_rng(len(shape))
    cube = np.ones((3,) * len(shape), bool)
    for density in (0.2, 0.6, 0.95, 1.0):
        mask = rng.random(shape) < density
        assert np.array_equal(mp._dilate_once(mask), ndimage.binary_dilation(mask, cube))
        assert np.array_equal(mp._erode_once(mask), ndimage.binary_erosion(mask, cube))
        assert np.array_equal(mp._close(mask), ndimage.binary_closing(mask, cube))
        assert mp._dilate_once(mask) is not mask


def test_sparse_organ_with_far_islands_and_ties():
    """Islands far apart (empty planes between them: the labelling leaves those planes out) and equal-size pieces
    (the two-largest rule's tie order must be the previous one's)."""
    label = np.zeros((60, 50, 40), np.uint8)
    label[2:58, 2:48, 2:38] = 200
    label[10:20, 10:20, 10:20] = 1
    for c in ((3, 3, 3), (40, 45, 35), (55, 4, 20), (30, 30, 3), (50, 40, 30)):
        label[c[0]:c[0] + 2, c[1]:c[1] + 2, c[2]:c[2] + 2] = 1  # equal islands
    for c in ((5, 5, 30), (45, 10, 5), (25, 44, 25)):  # an organ made of equal pieces only
        label[c] = 5
    label[30:34, 30:34, 30:34] = 4
    label[52:56, 40:44, 5:9] = 4  # a second equal piece of 4, far away
    for target, sizes in SIZES.items():
        assert np.array_equal(mp.postprocess_mask(label, sizes), postprocess_mask_reference(label, sizes))
    assert mp._occupied_planes(label == 1) is not None


def test_bench_smoke(tmp_path):
    """bench/bench_mask_postprocess.py at 64^3: rows for every map and request, all identical to the oracle."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_mask_postprocess.py"
    spec = importlib.util.spec_from_file_location("bench_mask_postprocess", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pp.json"
    assert bench.main([str(out), "--size", "64", "--repeats", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["all_identical"] and len(result["rows"]) == 6
    assert all(r["ours_s"] > 0 and r["reference_s"] > 0 and 0 < r["changed_fraction"] < 0.5 for r in result["rows"])
    assert bench.main([str(out), "--size", "100"]) == 2


# ---------------------------------------------------------------------------------- the same rules on a torch tensor
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("target", list(SIZES))
def test_tensor_post_process_equals_the_numpy_one(seed, target):
    """The device path (`mask_postprocess_torch`, run here on CPU tensors) gives the numpy path's voxels."""
    import torch

    from fastmaisi.pipelines.mask_postprocess_torch import postprocess_any

    label = _noisy_map(seed + 10)
    tensor = torch.from_numpy(label.copy())
    out = postprocess_any(tensor, SIZES[target])
    assert isinstance(out, torch.Tensor) and out.dtype == tensor.dtype
    assert torch.equal(tensor, torch.from_numpy(label))  # the input is not written to
    assert np.array_equal(out.numpy(), mp.postprocess_mask(label, SIZES[target]))


def test_tensor_post_process_ties_and_far_islands():
    import torch

    from fastmaisi.pipelines.mask_postprocess_torch import postprocess_mask_tensor

    label = np.zeros((30, 26, 22), np.uint8)
    label[2:28, 2:24, 2:20] = 200
    label[8:14, 8:14, 8:14] = 1
    for c in ((3, 3, 3), (25, 20, 17), (20, 4, 12), (15, 18, 3)):
        label[c[0]:c[0] + 2, c[1]:c[1] + 2, c[2]:c[2] + 2] = 1  # equal islands: the tie order decides
    for c in ((5, 5, 15), (22, 10, 5), (12, 20, 14)):
        label[c] = 5  # an organ made of equal single voxels
    full = np.full((12, 12, 12), 4, np.uint8)  # two pieces of 4, each outnumbering the rest (a wall of 1)
    full[6] = 1
    for case in (label, full):
        for sizes in SIZES.values():
            expected = mp.postprocess_mask(case, sizes)
            assert np.array_equal(postprocess_mask_tensor(torch.from_numpy(case), sizes).numpy(), expected)


@pytest.mark.parametrize("shape", [(13, 11, 9), (1, 30, 4), (6, 1, 1), (40, 5)])
def test_label_pieces_number_pieces_as_scipy_does(shape):
    import torch

    from fastmaisi.pipelines.label_pieces import label_pieces, largest_rule, piece_table

    rng = np.random.default_rng(sum(shape))
    for density in (0.3, 0.7):
        key = np.where(rng.random(shape) < density, rng.integers(0, 3, shape), -1).astype(np.int32)
        root = label_pieces(torch.from_numpy(key))
        names, counts, keys = piece_table(root, torch.from_numpy(key))
        root = root.numpy()
        assert (root[key < 0] == -1).all()
        assert (np.diff(keys) >= 0).all()  # grouped by key (largest_rule then needs no sort)
        for value in range(3):
            pieces, n = ndimage.label(key == value, np.ones((3,) * len(shape), bool))
            mine = keys == value
            assert mine.sum() == n
            # named by the first voxel in raster order, so sorted names = scipy's numbering
            first = [int(np.flatnonzero(pieces.reshape(-1) == i)[0]) for i in range(1, n + 1)]
            assert names[mine].tolist() == first
            assert counts[mine].tolist() == np.bincount(pieces.reshape(-1))[1:].tolist()
            assert np.array_equal(np.searchsorted(names[mine], root[key == value]) + 1, pieces[key == value])
            losing, kept, background = largest_rule(names, counts, keys, [value], key.size)
            table = np.bincount(pieces.reshape(-1))  # the reference's rule on scipy's pieces
            entries = np.nonzero(table)[0]
            keep = entries[np.argsort(table[entries])[::-1][:2]]
            assert losing == ([value] if len(entries) > 2 else [])
            if losing:
                assert sorted(kept) == sorted(first[k - 1] for k in keep if k > 0)
                assert background == ([value] if 0 not in keep else [])


def test_largest_rule_replays_numpys_argsort_on_ties():
    """Tables with many equal counts (numpy's argsort is unstable past 16 entries): the kept pieces are the plain
    rule's, whether the linear-time path or the replayed argsort decides."""
    from fastmaisi.pipelines.label_pieces import largest_rule

    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        keys = rng.integers(0, 4, n)
        counts = rng.integers(1, 4 if trial % 2 else 50, n).astype(np.int64)
        names = np.sort(rng.choice(10_000, n, replace=False))
        volume = int(counts.sum()) + int(rng.integers(0, 8))
        losing, kept, background = largest_rule(names, counts, keys, [0, 1, 2, 3], volume)
        for value in range(4):
            mine = np.flatnonzero(keys == value)
            table = np.concatenate([[volume - counts[mine].sum()], counts[mine]]).astype(np.int64)
            entries = np.nonzero(table)[0]
            keep = entries[np.argsort(table[entries])[::-1][:2]]
            assert (value in losing) == (len(mine) > 0 and len(entries) > 2)
            if value in losing:
                assert set(names[mine[k - 1]] for k in keep if k > 0) <= set(kept)
                assert not set(names[mine]) - set(names[mine[k - 1]] for k in keep if k > 0) & set(kept)
                assert (value in background) == (0 not in keep)
