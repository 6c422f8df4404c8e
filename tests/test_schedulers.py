"""Schedulers: bit-for-bit parity with MONAI 1.6.1's schedulers, properties, build(), and the AB2 sampler."""

import json
from pathlib import Path

import pytest
import torch

from fastmaisi import schedulers as ours
from fastmaisi.schedulers import build, sample_rflow_ab2, scheduler_class
from fastmaisi.variants import DDPM_SCHEDULER_DEF, RFLOW_SCHEDULER_DEF

monai = pytest.importorskip("monai.networks.schedulers")

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"
MAISI_DDPM = {k: v for k, v in DDPM_SCHEDULER_DEF.items() if k != "_target_"}
MAISI_RFLOW = {k: v for k, v in RFLOW_SCHEDULER_DEF.items() if k != "_target_"}
SCHEDULES = [("linear_beta", {}), ("scaled_linear_beta", {"beta_start": 0.0015, "beta_end": 0.0195}),
             ("sigmoid_beta", {"beta_start": 1e-4, "beta_end": 0.02, "sig_range": 4.0}), ("cosine", {"s": 0.01})]
PRED = ["epsilon", "sample", "v_prediction"]
DTYPES = [torch.float32, torch.float16]


def pair(name, **kw):
    """(ours, MONAI's) instance of the same class with the same arguments."""
    return getattr(ours, name)(**kw), getattr(monai, name)(**kw)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b), (a - b).abs().max()


# ---------------------------------------------------------------- timesteps and tables
@pytest.mark.parametrize("schedule,args", SCHEDULES)
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_tables_match(name, schedule, args):
    a, b = pair(name, schedule=schedule, **args)
    for attr in ("betas", "alphas", "alphas_cumprod"):
        assert_same(getattr(a, attr), getattr(b, attr))
    assert_same(a.timesteps, b.timesteps)


@pytest.mark.parametrize("n", [1, 7, 10, 30, 50, 999, 1000])
def test_discrete_timesteps_match(n):
    for name, kw in [("DDPMScheduler", {}), ("DDIMScheduler", {}), ("DDIMScheduler", {"steps_offset": 1}),
                     ("DDIMScheduler", {"steps_offset": 5, "num_train_timesteps": 500})]:
        if n > kw.get("num_train_timesteps", 1000):
            continue
        a, b = pair(name, **kw)
        a.set_timesteps(n), b.set_timesteps(n)
        assert_same(a.timesteps, b.timesteps)
        assert a.num_inference_steps == b.num_inference_steps == n


RFLOW_CONFIGS = [MAISI_RFLOW, {}, dict(use_timestep_transform=True), dict(MAISI_RFLOW, steps_offset=3),
                 dict(MAISI_RFLOW, base_img_size_numel=16 * 16, spatial_dim=2), dict(num_train_timesteps=2000)]


@pytest.mark.parametrize("kw", RFLOW_CONFIGS)
@pytest.mark.parametrize("n", [1, 10, 30, 50, 1000])
def test_rflow_timesteps_match(kw, n):
    """fp16-quantised, resolution-shifted grids equal MONAI's for MAISI's numel argument (a 0-d int64 tensor)."""
    shapes = [(16, 16), (48, 64)] if kw.get("spatial_dim") == 2 else \
        [(8, 8, 8), (32, 32, 32), (64, 64, 32), (64, 64, 64), (128, 128, 32), (128, 128, 128), (37, 53, 100)]
    for shape in shapes:
        a, b = pair("RFlowScheduler", **kw)
        numel = torch.prod(torch.tensor(shape))
        b.set_timesteps(n, input_img_size_numel=numel)
        for given in (numel, int(numel)):  # a Python int gives the same (fp32) grid as the reference pipeline
            a.set_timesteps(n, input_img_size_numel=given)
            assert_same(a.timesteps, b.timesteps)


def test_rflow_maisi_grid_values():
    """The 128^3-latent, 30-step grid of the reference: 1000, 991.5, 982.5, ..., 307.8, 222.2, 121.2 (fp16)."""
    s = build(RFLOW_SCHEDULER_DEF)
    s.set_timesteps(30, input_img_size_numel=128**3)
    assert s.timesteps.dtype == torch.float16 and len(s.timesteps) == 30
    torch.testing.assert_close(s.timesteps[[0, 1, 2, -3, -2, -1]].float(),
                               torch.tensor([1000.0, 991.5, 982.5, 307.8, 222.2, 121.2]), atol=0.1, rtol=0)


def test_transform_scale_is_ignored_like_monai():
    """MONAI stores transform_scale but never applies it: the effective shift scale is 1.0."""
    a = ours.RFlowScheduler(**MAISI_RFLOW, transform_scale=3.0)
    b = ours.RFlowScheduler(**MAISI_RFLOW)
    m = monai.RFlowScheduler(**MAISI_RFLOW, transform_scale=3.0)
    for s in (a, b, m):
        s.set_timesteps(30, input_img_size_numel=torch.tensor(64**3))
    assert_same(a.timesteps, b.timesteps)
    assert_same(a.timesteps, m.timesteps)


@pytest.mark.parametrize("n", [1, 3, 30, 1000])
def test_timesteps_descending(n):
    for s in (ours.DDPMScheduler(), ours.DDIMScheduler(steps_offset=1), ours.RFlowScheduler(**MAISI_RFLOW),
              ours.RFlowScheduler()):
        s.set_timesteps(n, input_img_size_numel=64**3)
        t = s.timesteps.double()
        assert len(t) == n and (t[1:] <= t[:-1]).all() and (t >= 0).all() and t[0] <= 1000
        if n <= 30:  # strictly descending where fp16 / int rounding cannot merge neighbours
            assert (t[1:] < t[:-1]).all()


# ---------------------------------------------------------------- add_noise / velocity / training timesteps
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "RFlowScheduler"])
def test_add_noise_matches(name, dtype):
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4, 6, 5, 4), (3, 2, 8, 8)]:
        x0, noise = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
        if name == "RFlowScheduler":
            t = torch.tensor([0.0, 371.25, 999.9])
            kw = MAISI_RFLOW
        else:
            t = torch.tensor([0, 417, 999])
            kw = dict(MAISI_DDPM) if name == "DDPMScheduler" else {}
        a, b = pair(name, **kw)  # fresh MONAI object: its add_noise recasts its own alphas_cumprod
        assert_same(a.add_noise(x0, noise, t), b.add_noise(x0, noise, t))
        if name != "RFlowScheduler":
            assert_same(a.get_velocity(x0, noise, t), pair(name, **kw)[1].get_velocity(x0, noise, t))


def test_rflow_add_noise_endpoints():
    s = ours.RFlowScheduler(**MAISI_RFLOW)
    x0, noise = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 8)
    assert torch.equal(s.add_noise(x0, noise, torch.zeros(2)), x0)  # t = 0: identity
    assert torch.equal(s.add_noise(x0, noise, torch.full((2,), 1000.0)), noise)  # t = T: pure noise
    assert torch.allclose(s.add_noise(x0, noise, torch.full((2,), 1e-3)), x0, atol=1e-5)


@pytest.mark.parametrize("kw", [MAISI_RFLOW, {}, dict(sample_method="logit-normal", loc=0.3, scale=1.4),
                                dict(sample_method="logit-normal", use_discrete_timesteps=False,
                                     use_timestep_transform=True)])
@pytest.mark.parametrize("shape", [(64, 4, 16, 16, 8), (5, 4, 32, 32)])
def test_rflow_sample_timesteps_match(kw, shape):
    """Same seed, same training timesteps as MONAI (uniform / logit-normal, discrete, with the shift from x's size)."""
    a, b = pair("RFlowScheduler", **kw)
    x = torch.zeros(shape)
    torch.manual_seed(7)
    tb = b.sample_timesteps(x)
    torch.manual_seed(7)
    ta = a.sample_timesteps(x)
    assert_same(ta, tb)
    assert (ta >= 0).all() and (ta <= 1000).all() and ta.shape == (shape[0],)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.sample_timesteps(x, generator=g1), a.sample_timesteps(x, generator=g2))


def test_discrete_sample_timesteps():
    s = ours.DDPMScheduler(**MAISI_DDPM)
    x = torch.zeros(4096, 1)
    t = s.sample_timesteps(x)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and t.unique().numel() > 900
    torch.manual_seed(1)
    t1 = s.sample_timesteps(x)
    torch.manual_seed(1)
    assert torch.equal(t1, torch.randint(0, 1000, (4096,)))  # MAISI's training draw


# ---------------------------------------------------------------- step
def _inputs(dtype, channels=4, out_channels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 6, 5, 4, generator=g).to(dtype)
    out = torch.randn(2, out_channels or channels, 6, 5, 4, generator=g).to(dtype)
    return x, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("variance_type,clip", [("fixed_small", False), ("fixed_small", True), ("fixed_large", False),
                                                ("learned", False), ("learned_range", True)])
def test_ddpm_step_matches(dtype, prediction_type, variance_type, clip):
    kw = dict(MAISI_DDPM, prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip)
    a, b = pair("DDPMScheduler", **kw)
    learned = variance_type.startswith("learned")
    x, out = _inputs(dtype, out_channels=8 if learned else 4)
    if variance_type == "learned":  # the model's variance itself
        out[:, 4:] = out[:, 4:].abs() * 1e-3
    elif variance_type == "learned_range":  # interpolation weight in [-1, 1]
        out[:, 4:] = out[:, 4:].tanh()
    for t in [999, 500, 1, 0, torch.tensor(731)]:
        ra = a.step(out, t, x, generator=torch.Generator().manual_seed(5))
        rb = b.step(out, t, x, generator=torch.Generator().manual_seed(5))
        assert_same(ra[0], rb[0])
        assert_same(ra[1], rb[1])
        assert ra.prev_sample is ra[0] and ra.pred_original_sample is ra[1]


def test_ddpm_mask_loop_matches():
    """A 1000-step fp16 mask-DM style loop with a seeded generator: every step equal to MONAI's."""
    a, b = pair("DDPMScheduler", **MAISI_DDPM)
    a.set_timesteps(1000), b.set_timesteps(1000)
    xa = xb = torch.randn(1, 4, 4, 4, 4).half()
    ga, gb = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for t in a.timesteps:
        eps = (0.5 * xa + 0.1).clone()
        xa, _ = a.step(eps, t, xa, generator=ga)
        xb, _ = b.step(eps, t, xb, generator=gb)
        assert_same(xa, xb)


def test_ddpm_variance_clamp():
    """fixed_small clamps the posterior variance at 1e-20 (reachable with tiny betas), as MONAI."""
    a, b = pair("DDPMScheduler", num_train_timesteps=2, beta_start=1e-7, beta_end=1e-25)
    assert (1 - a.alphas_cumprod[0]) / (1 - a.alphas_cumprod[1]) * a.betas[1] < 1e-20
    assert a._variance(1, None).item() == b._get_variance(1).item() == torch.tensor(1e-20).item()
    x, out = _inputs(torch.float32)
    ra, rb = (s.step(out, 1, x, generator=torch.Generator().manual_seed(0))[0] for s in (a, b))
    assert_same(ra, rb)


def test_ddpm_generator_controls_noise():
    s = ours.DDPMScheduler(**MAISI_DDPM)
    x, out = _inputs(torch.float32)
    r1 = s.step(out, 500, x, generator=torch.Generator().manual_seed(1))[0]
    r2 = s.step(out, 500, x, generator=torch.Generator().manual_seed(1))[0]
    r3 = s.step(out, 500, x, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert torch.equal(s.step(out, 0, x, generator=torch.Generator().manual_seed(1))[0],
                       s.step(out, 0, x, generator=torch.Generator().manual_seed(2))[0])  # no noise at t = 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("n,kw", [(10, {}), (50, dict(set_alpha_to_one=False, steps_offset=1)),
                                  (7, dict(clip_sample=False, schedule="scaled_linear_beta"))])
def test_ddim_step_matches(dtype, prediction_type, eta, n, kw):
    a, b = pair("DDIMScheduler", prediction_type=prediction_type, **kw)
    a.set_timesteps(n), b.set_timesteps(n)
    x, out = _inputs(dtype)
    for t in a.timesteps:
        ra = a.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(3))
        rb = b.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(3))
        assert_same(ra[0], rb[0])
        assert_same(ra[1], rb[1])


def test_ddim_eta_zero_is_deterministic():
    s = ours.DDIMScheduler(**MAISI_DDPM)
    s.set_timesteps(20)
    x, out = _inputs(torch.float32)
    r = [s.step(out, 500, x, eta=0.0, generator=torch.Generator().manual_seed(i))[0] for i in (1, 2)]
    assert torch.equal(r[0], r[1])
    n = [s.step(out, 500, x, eta=1.0, generator=torch.Generator().manual_seed(i))[0] for i in (1, 1, 2)]
    assert torch.equal(n[0], n[1]) and not torch.equal(n[0], n[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [MAISI_RFLOW, {}])
def test_rflow_step_matches(dtype, kw):
    """MAISI's loop: step(v, t, x, next_t) with next_t = 0 after the last timestep; also next_t=None."""
    a, b = pair("RFlowScheduler", **kw)
    numel = torch.tensor(8 * 8 * 8)
    a.set_timesteps(30, input_img_size_numel=numel), b.set_timesteps(30, input_img_size_numel=numel)
    next_ts = torch.cat((a.timesteps[1:], torch.tensor([0], dtype=a.timesteps.dtype)))
    xa = xb = torch.randn(1, 4, 8, 8, 8).to(dtype)
    for t, next_t in zip(a.timesteps, next_ts):
        v = (torch.sin(xa) - 0.3).to(dtype)
        ra, rb = a.step(v, t, xa, next_t), b.step(v, t, xb, next_t)
        assert_same(ra[0], rb[0])
        assert_same(ra[1], rb[1])
        assert_same(a.step(v, t, xa)[0], b.step(v, t, xb)[0])  # next_timestep=None: Δτ = 1/n
        xa, xb = ra[0], rb[0]


def test_uniform_step_call():
    """Every scheduler takes the same keyword call, so a sampling loop needs no isinstance checks."""
    x, out = _inputs(torch.float32)
    for s in (ours.DDPMScheduler(), ours.DDIMScheduler(), ours.RFlowScheduler(**MAISI_RFLOW)):
        s.set_timesteps(10, device="cpu", input_img_size_numel=6 * 5 * 4)
        t, next_t = s.timesteps[0], s.timesteps[1]
        prev, x0 = s.step(out, t, x, next_timestep=next_t, generator=torch.Generator().manual_seed(0))
        assert prev.shape == x0.shape == x.shape


def test_rflow_pred_original_sample_is_exact_for_true_velocity():
    """x_t = (1-τ)x0 + τε with v = x0 - ε: x̂0 = x_t + τv recovers x0, and an Euler step lands on the path."""
    s = ours.RFlowScheduler(**MAISI_RFLOW)
    s.set_timesteps(10, input_img_size_numel=4**3)
    x0, eps = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    t, next_t = s.timesteps[3], s.timesteps[4]
    xt = s.add_noise(x0, eps, t.double().reshape(1))
    prev, pred_x0 = s.step(x0 - eps, t.double(), xt, next_t)
    torch.testing.assert_close(pred_x0, x0)
    # the step lands at int(next_t) (MONAI truncates the next timestep)
    torch.testing.assert_close(prev, s.add_noise(x0, eps, torch.tensor([float(int(next_t))])))


# ---------------------------------------------------------------- build and bad arguments
def _official_scheduler_entries():
    if not CONFIGS.exists():
        return []
    out = []
    for name in ("config_network_rflow.json", "config_network_ddpm.json"):
        cfg = json.loads((CONFIGS / name).read_text())
        out += [(f"{name}:{key}", entry) for key, entry in cfg.items()
                if isinstance(entry, dict) and "schedulers" in str(entry.get("_target_", ""))]
    return out


def _check_built(definition):
    built = build(definition)
    cls_name = definition["_target_"].rsplit(".", 1)[-1]
    ref = getattr(monai, cls_name)(**{k: v for k, v in definition.items() if k != "_target_"})
    assert type(built).__name__ == cls_name
    for n in (1, 30, 1000):
        built.set_timesteps(n, input_img_size_numel=torch.tensor(64**3))
        ref.set_timesteps(n, **({"input_img_size_numel": torch.tensor(64**3)} if cls_name == "RFlowScheduler" else {}))
        assert_same(built.timesteps, ref.timesteps)
    for attr in vars(ref):
        if attr in vars(built) and isinstance(getattr(ref, attr), (bool, int, float, str)):
            assert getattr(built, attr) == getattr(ref, attr), attr


def test_build_official_config_entries():
    entries = _official_scheduler_entries()
    if not entries:
        pytest.skip("shared/reference/configs not beside the checkout")
    assert len(entries) == 4  # noise_scheduler + mask_generation_noise_scheduler in both files
    for _, entry in entries:
        _check_built(entry)


@pytest.mark.parametrize("definition", [RFLOW_SCHEDULER_DEF, DDPM_SCHEDULER_DEF])
def test_build_variant_definitions(definition):
    _check_built(definition)


@pytest.mark.parametrize("target,cls", [
    ("monai.networks.schedulers.RFlowScheduler", "RFlowScheduler"),
    ("monai.networks.schedulers.rectified_flow.RFlowScheduler", "RFlowScheduler"),
    ("DDPMScheduler", "DDPMScheduler"), ("monai.networks.schedulers.ddpm.DDPMScheduler", "DDPMScheduler"),
    ("monai.networks.schedulers.DDIMScheduler", "DDIMScheduler"), ("fastmaisi.schedulers.ddim.DDIMScheduler", "DDIMScheduler"),
])
def test_target_spellings(target, cls):
    assert scheduler_class(target).__name__ == cls


@pytest.mark.parametrize("definition,match", [
    ({"_target_": "monai.networks.schedulers.PNDMScheduler"}, "unknown scheduler _target_ .*PNDMScheduler.*supported"),
    ({"_target_": "monai.networks.schedulers.ddim.DDPMScheduler"}, "unknown scheduler _target_"),
    ({"num_train_timesteps": 1000}, "_target_"),
    (dict(RFLOW_SCHEDULER_DEF, beta_start=0.1), r"unsupported argument\(s\) \['beta_start'\] for RFlowScheduler.*"
                                                r"use_timestep_transform"),
    (dict(DDPM_SCHEDULER_DEF, sample_method="uniform"), r"\['sample_method'\].*'beta_start', 'beta_end'"),
    (dict(DDPM_SCHEDULER_DEF, schedule="cosine"), r"\['beta_end', 'beta_start'\].*schedule='cosine'"),
    (dict(DDPM_SCHEDULER_DEF, num_train_timesteps="@num_train_timesteps"), "unresolved config references"),
    (dict(DDPM_SCHEDULER_DEF, schedule="quadratic"), "unknown schedule 'quadratic'; supported"),
])
def test_build_errors(definition, match):
    with pytest.raises(ValueError, match=match):
        build(definition)


@pytest.mark.parametrize("make,match", [
    (lambda: ours.DDPMScheduler(prediction_type="x0"), "prediction_type must be one of"),
    (lambda: ours.DDIMScheduler(prediction_type="noise"), "prediction_type must be one of"),
    (lambda: ours.DDPMScheduler(variance_type="small"), "variance_type must be one of"),
    (lambda: ours.RFlowScheduler(sample_method="normal"), "sample_method must be one of"),
    (lambda: ours.DDIMScheduler(steps_offset=1000), "steps_offset must be in"),
    (lambda: ours.DDPMScheduler().set_timesteps(0), "num_inference_steps must be in"),
    (lambda: ours.DDIMScheduler().set_timesteps(1001), "num_inference_steps must be in"),
    (lambda: ours.RFlowScheduler().set_timesteps(1001), "num_inference_steps must be in"),
    (lambda: ours.RFlowScheduler(use_timestep_transform=True).set_timesteps(30), "input_img_size_numel"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rflow_step_needs_timesteps_without_next():
    x, out = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ours.RFlowScheduler().step(out, 500.0, x)
    assert ours.RFlowScheduler().step(out, 500.0, x, 400)[0].shape == x.shape


# ---------------------------------------------------------------- the faster sampler
def gaussian_flow(mu: float, s: float, T: float = 1000.0):
    """Exact RF velocity for data N(mu, s²) and noise N(0, 1): v(x, τ) = E[x0 - ε | x_τ = x].

    The ODE maps x at τ = 1 to x_0 = mu + s·x exactly (x_τ = (1-τ)mu + σ_τ x, σ_τ² = (1-τ)²s² + τ²). σ_τ is not
    linear in τ, so the trajectories are curved: Euler's error is O(h), AB2's O(h²).
    """
    def velocity(x, t):
        tau = (t.double() / T).reshape(-1, *[1] * (x.ndim - 1))
        var = (1 - tau) ** 2 * s * s + tau**2
        return (mu + ((1 - tau) * s * s - tau) / var * (x - (1 - tau) * mu)).to(x.dtype)
    return velocity


def euler_reference(model, x, scheduler):
    """MAISI's loop with our RFlowScheduler (= MONAI's): Euler, next_t = 0 after the last step."""
    ts = scheduler.timesteps
    for t, next_t in zip(ts, torch.cat((ts[1:], torch.zeros(1, dtype=ts.dtype)))):
        x, _ = scheduler.step(model(x, torch.full((x.shape[0],), float(t))), t, x, next_t)
    return x


def _errors(s, numel, n, mu=0.7):
    model = gaussian_flow(mu, s)
    x1 = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + s * x1
    sched = ours.RFlowScheduler(**MAISI_RFLOW)
    sched.set_timesteps(n, input_img_size_numel=numel)
    calls = []
    counted = lambda x, t: calls.append(1) or model(x, t)  # noqa: E731
    ab2 = sample_rflow_ab2(counted, x1, sched.timesteps, disable=True)
    assert len(calls) == n  # same number of model evaluations as Euler
    euler = euler_reference(model, x1, sched)
    return (euler - exact).abs().mean().item(), (ab2 - exact).abs().mean().item()


@pytest.mark.parametrize("s", [0.05, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("numel", [32**3, 64**3, 128**3])
def test_ab2_beats_euler_at_equal_model_calls(s, numel):
    for n in (10, 20, 30):
        err_euler, err_ab2 = _errors(s, numel, n)
        # near-point data (s = 0.05) bends only close to t = 0, inside the last step: a smaller gain there
        assert err_ab2 < (1.0 if s < 0.1 else 0.5) * err_euler, (n, err_euler, err_ab2)


@pytest.mark.parametrize("s", [0.5, 1.0])
@pytest.mark.parametrize("numel", [32**3, 64**3, 128**3])
def test_ab2_10_steps_beat_euler_30_steps(s, numel):
    """On unit-scale data (MAISI latents are scaled to unit std), 10 AB2 steps are more accurate than MAISI's 30."""
    assert _errors(s, numel, 10)[1] < _errors(s, numel, 30)[0]


def test_ab2_sampler_callback_and_repeated_timesteps():
    seen = []
    x = torch.randn(2, 3)
    out = sample_rflow_ab2(lambda x, t: -x, x, [1000.0, 500.0, 500.0, 100.0], callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and torch.isfinite(out).all()
