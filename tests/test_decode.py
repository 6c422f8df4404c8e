"""fastmaisi.decode: the tiled decode/encode equals the whole-volume network; sliding window equals MONAI's inferer."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from fastmaisi.decode import (
    decode_latent,
    decode_latent_sliding_window,
    encode_image,
    plan_decode,
    plan_encode,
)
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi

TINY = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=(8, 16, 16),
            num_res_blocks=(1, 2, 2), norm_num_groups=4, attention_levels=(False, False, False))
TINY_MASK = dict(TINY, in_channels=3, out_channels=5, use_convtranspose=True)


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # GroupNorm affine far from (1, 0) so the test sees wrong statistics
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return net.eval()


@pytest.fixture(scope="module")
def vae():
    return _randomised(AutoencoderKlMaisi(**TINY))


@pytest.fixture(scope="module")
def mask_vae():
    return _randomised(AutoencoderKlMaisi(**TINY_MASK), seed=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


def _budget_for_slabs(plan_fn, shape, min_slabs: int = 8) -> int:
    """The largest budget (from a geometric ladder) whose plan has at least `min_slabs` slabs."""
    budget = 1 << 30
    while budget > 1 << 16:
        try:
            plan = plan_fn(shape, "cpu", budget)
        except ValueError:
            break
        if plan.tiled and plan.num_slabs >= min_slabs:
            return budget
        budget = int(budget * 0.7)
    raise AssertionError(f"no budget gives {min_slabs} slabs for {shape}")


@pytest.mark.parametrize("shape", [(2, 4, 5, 7, 9), (2, 4, 24, 16, 40)])
@pytest.mark.parametrize("net", ["vae", "mask_vae"])
def test_tiled_decode_equals_whole_volume(shape, net, request):
    vae = request.getfixturevalue(net)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z)
    budget = _budget_for_slabs(lambda s, d, b: plan_decode(s, d, b, torch.float32, vae), shape)
    y, plan = decode_latent(vae, z, budget, return_plan=True)
    assert plan.tiled and plan.num_slabs >= 8 and plan.batch_chunk == 1
    assert _rel(y, ref) < 1e-5
    assert "slabs" in plan.describe() and "GroupNorm" in str(plan)


def test_progress_bar_counts_every_slab(vae):
    """decode_latent(progress=True): one bar over the slabs of every pass and sample, finished at the end."""
    from fastmaisi import decode as D

    bars = []

    class Bar(D.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.shown = not self.disable  # close() disables the bar
            bars.append(self)

    z = torch.randn(2, 4, 6, 5, 7, generator=torch.Generator().manual_seed(4))
    budget = _budget_for_slabs(lambda s, d, b: plan_decode(s, d, b, torch.float32, vae), z.shape)
    with mock.patch.object(D.execute, "tqdm", Bar):  # the executor draws the bar
        _, plan = decode_latent(vae, z, budget, return_plan=True, progress=True)
        decode_latent(vae, z, budget)
    ops, slots = D._compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)
    D._shapes(ops, slots, z.shape[2:])
    per_sample = sum(-(-slots[op.dst].spatial[0] // plan._rows[k]) for k, op in enumerate(ops))  # CPU: all stored
    shown = [b for b in bars if b.shown]
    assert len(shown) == 1 and shown[0].desc.startswith("decode")
    assert shown[0].total == shown[0].n == 2 * per_sample >= 2 * 8


@pytest.mark.parametrize("shape", [(2, 1, 20, 28, 36), (2, 1, 44, 16, 12)])
def test_tiled_encode_equals_whole_volume(vae, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mu_ref, sigma_ref = vae.encode(x)
    budget = _budget_for_slabs(lambda s, d, b: plan_encode(s, d, b, torch.float32, vae), shape)
    (mu, sigma), plan = encode_image(vae, x, budget, return_plan=True)
    assert plan.tiled and plan.num_slabs >= 8
    assert _rel(mu, mu_ref) < 1e-5 and _rel(sigma, sigma_ref) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("net", ["vae", "mask_vae"])
@pytest.mark.parametrize("pattern", ["mixed", "all_recomputed"])
def test_off_device_placements_are_exact(net, pattern, device, request):
    """The CUDA planner's off-device placements, forced (on CPU too, so that CI runs the same executor code):
    activations recomputed from their inputs when read (chains of them, each row computed once per pass), host
    stores whose first rows stay on the device, a residual shortcut folded into its recomputed producer's conv, and
    on CUDA the side-stream host copies (fetched ahead, written behind) with the output in host memory."""
    from fastmaisi import decode as D

    vae = request.getfixturevalue(net)
    z = torch.randn(2, 4, 7, 5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.decode(z)
    if device == "cuda":
        vae, z = copy.deepcopy(vae).cuda(), z.cuda()
        torch.backends.cudnn.allow_tf32 = False
    ops, slots = D._compile(vae.decoder.blocks, vae.latent_channels, vae.post_quant_conv)
    D._shapes(ops, slots, z.shape[2:])
    n = len(slots)
    if pattern == "all_recomputed":
        place = [D.GPU] + [D.RECOMPUTE] * (n - 2) + [D.GPU]
    else:
        place = [D.GPU] + [(D.HOST, D.RECOMPUTE, D.GPU)[s % 3] for s in range(1, n - 1)] + [D.HOST]
        fused = [op for op in ops if D._fusable(ops, op)]
        assert fused
        for op in fused:  # the shortcut's input recomputed, the block's hidden state stored: the fused conv runs
            place[op.res], place[op.src] = D.RECOMPUTE, D.HOST
    gpu_rows = [slots[s].spatial[0] if place[s] == D.GPU else slots[s].spatial[0] // 2 if place[s] == D.HOST else 0
                for s in range(n)]
    rows = [max(1, slots[op.dst].spatial[0] // 5) for op in ops]  # 5+ slabs per op, 6+ at full resolution
    plan = D.plan_decode(z.shape, device, None, torch.float32, vae)
    plan.batch_chunk, plan._place, plan._rows, plan._gpu_rows = 1, place, rows, gpu_rows
    computed: list = []  # per pass: the rows each op computed (recomputed activations: at most once per pass)
    slab, run_op = D._Run.slab, D._Run.op

    def count_slab(self, k, a, b, op=None, key=None):
        computed[-1].append((k if key is None else key, a, b))
        return slab(self, k, a, b, op, key)

    def count_op(self, k, final):
        computed.append([])
        return run_op(self, k, final)

    try:
        with torch.no_grad(), mock.patch.object(D._Run, "slab", count_slab), mock.patch.object(D._Run, "op", count_op):
            y = D._execute(ops, slots, plan, z, torch.device(device), torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert y.device.type == ("cpu" if place[-1] == D.HOST else device)
    assert _rel(y.cpu(), ref) < 1e-5
    # chains of recomputed activations ran (all_recomputed: the last pass recomputes every op before it)
    assert max(len({k for k, _, _ in p}) for p in computed) >= (len(ops) if pattern == "all_recomputed" else 2)
    for p in computed:  # the next slab reuses the rows its predecessor computed (the halo) instead of redoing them
        for key in {k for k, _, _ in p}:
            spans = sorted((a, b) for k, a, b in p if k == key)
            assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:])), (key, spans)


def test_untiled_by_default_on_cpu(vae):
    z = torch.randn(1, 4, 6, 6, 6)
    y, plan = decode_latent(vae, z, return_plan=True)
    assert not plan.tiled and plan.num_slabs == 1
    with torch.no_grad():
        torch.testing.assert_close(y, vae.decode(z), rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _unlimited_host_memory(monkeypatch):
    """CUDA plans made here do not depend on this machine's free RAM (one test sets a limit itself)."""
    from fastmaisi import decode as D

    monkeypatch.setattr(D.plan, "_host_available", lambda: None)


def test_planner_keeps_page_locked_memory_within_what_the_host_has(monkeypatch):
    from fastmaisi import decode as D

    shape, budget = (1, 4, 128, 128, 128), 12 << 30
    free = plan_decode(shape, "cuda", budget, torch.float16)
    assert free.host_bytes > 6 << 30  # with no limit the plan streams through the host
    monkeypatch.setattr(D.plan, "_host_available", lambda: 4 << 30)
    held = plan_decode(shape, "cuda", budget, torch.float16)
    assert held.tiled and 0 < held.host_bytes <= 4 << 30 and held.peak_bytes <= budget
    assert held.est_seconds - held.setup_seconds > free.est_seconds - free.setup_seconds  # recomputes instead
    made = []
    make = D._make_plan
    monkeypatch.setattr(D.plan, "_make_plan", lambda *a: made.append(a[-1]) or make(*a))
    monkeypatch.setattr(D.plan, "_host_available", lambda: (4 << 30) + (512 << 20))
    assert plan_decode(shape, "cuda", budget, torch.float16).host_bytes == held.host_bytes and made == []  # reused
    monkeypatch.setattr(D.plan, "_host_available", lambda: 3 << 30)
    assert plan_decode(shape, "cuda", budget, torch.float16).host_bytes <= 3 << 30 and made == [3 << 30]
    monkeypatch.setattr(D.plan, "_host_available", lambda: 0)
    with pytest.raises(ValueError, match="page-locked host memory, and 0.0 GiB is available"):
        plan_decode(shape, "cuda", 4 << 30, torch.float16)


def test_a_plan_the_host_limit_did_not_bind_is_kept_when_the_host_frees_memory(monkeypatch):
    # After a first decode has page-locked its buffers the limit grows by their size: the search took 0.3-0.9 s
    # again on the second call at 512^3 (its decode 0.25-0.3 s slower) and gave the same plan.
    from fastmaisi import decode as D

    shape, budget = (1, 4, 96, 96, 96), 8 << 30
    monkeypatch.setattr(D.plan, "_host_available", lambda: 200 << 30)
    first = plan_decode(shape, "cuda", budget, torch.float16)
    assert first.host_bytes > 0 and not D._PLANS[next(k for k in D._PLANS if k[2] == shape)]._host_bound
    made = []
    make = D._make_plan
    monkeypatch.setattr(D.plan, "_make_plan", lambda *a: made.append(a[-1]) or make(*a))
    monkeypatch.setattr(D.plan, "_host_available", lambda: 260 << 30)
    assert plan_decode(shape, "cuda", budget, torch.float16).host_bytes == first.host_bytes and made == []
    monkeypatch.setattr(D.plan, "_host_available", lambda: first.host_bytes // 2)  # now it would bind: search again
    assert plan_decode(shape, "cuda", budget, torch.float16).host_bytes <= first.host_bytes // 2
    assert made == [first.host_bytes // 2]


def test_planner_for_the_maisi_autoencoder():
    plan = plan_decode((1, 4, 128, 128, 128), "cuda", 20 << 30, torch.float16)  # vae=None: MAISI's image AE
    assert plan.output_shape == (1, 1, 512, 512, 512) and plan.tiled
    assert plan.peak_bytes <= 20 << 30 and plan.num_slabs > 1 and plan.est_seconds > 0
    text = plan.describe()
    assert "512x512x512" in text and "GiB" in text and "expected time" in text
    small = plan_decode((1, 4, 32, 32, 32), "cuda", 40 << 30, torch.float16)
    assert not small.tiled and "whole volume" in str(small)


@pytest.mark.parametrize("task, shape, budget_gib", [("encode", (1, 1, 512, 512, 256), 8),
                                                     ("decode", (1, 4, 128, 128, 128), 24),
                                                     ("decode", (1, 4, 128, 128, 128), 100)])
def test_cuda_plans_keep_slabs_under_2_31_elements(task, shape, budget_gib):
    """cuDNN's fast 3-D kernels index with 32 bits; a larger slab falls to a slow path (and past the estimate)."""
    from fastmaisi import decode as D

    plan = (plan_encode if task == "encode" else plan_decode)(shape, "cuda", budget_gib << 30, torch.float16)
    vae = D._vae_for_plan(None)
    blocks, head = (vae.encoder.blocks, None) if task == "encode" else (vae.decoder.blocks, vae.post_quant_conv)
    ops, slots = D._compile(blocks, shape[1], head)
    D._shapes(ops, slots, shape[2:])
    assert plan.tiled
    passes = D._Planner(ops, slots, 1, 1, 2, "cuda").passes(plan._place)  # the others run inside their readers' slabs
    assert len(passes) >= len(ops) // 2
    for k in passes:
        op, r = ops[k], plan._rows[k]
        s, d = slots[op.src], slots[op.dst]
        assert r * d.channels * d.spatial[1] * d.spatial[2] < 2**31
        assert D._max_in_rows(op, slots, r) * s.channels * s.spatial[1] * s.spatial[2] < 2**31


def test_sliding_window_equals_monai(vae):
    inferers = pytest.importorskip("monai.inferers")
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi as MonaiAE

    ref_net = MonaiAE(**TINY, norm_float16=False, num_splits=1, save_mem=False).eval()
    ref_net.load_state_dict(vae.state_dict())
    cases = [((2, 4, 10, 12, 9), (6, 8, 9), 0.25, 1), ((1, 4, 8, 9, 7), (5, 6, 7), 0.4, 1),
             ((2, 4, 10, 6, 6), (12, 6, 4), 0.25, 2)]  # last: roi larger than the latent (MONAI pads, then crops)
    for shape, roi, overlap, sw_batch in cases:
        z = torch.randn(shape, generator=torch.Generator().manual_seed(4))
        inferer = inferers.SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch, overlap=overlap, mode="gaussian")
        with torch.no_grad():
            ref = inferer(z, ref_net.decode_stage_2_outputs)
        out = decode_latent_sliding_window(vae, z, roi, overlap=overlap, mode="gaussian", sw_batch_size=sw_batch)
        assert out.shape == ref.shape == (shape[0], 1, *(4 * n for n in shape[2:]))
        assert _rel(out, ref) < 1e-5


def test_bad_inputs(vae):
    z = torch.randn(1, 4, 5, 6, 7)
    bad = z.clone()
    bad[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        decode_latent(vae, bad)
    bad[0, 1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        decode_latent(vae, bad)
    with pytest.raises(ValueError, match="3 channels, expected 4"):
        decode_latent(vae, torch.randn(1, 3, 5, 6, 7))
    with pytest.raises(ValueError, match=r"too small to hold even one slab.*needs at least \d+ bytes"):
        decode_latent(vae, z, memory_budget_bytes=1000)
    with pytest.raises(ValueError, match="2 channels, expected 1"):
        encode_image(vae, torch.randn(1, 2, 8, 8, 8))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny volumes are dominated by per-op overhead; one thread avoids OpenMP barrier costs on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
