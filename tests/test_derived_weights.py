"""Weight-derived tensors (upsample transposed-conv weights, thin_conv packs) never go stale and never crash: MONAI's
UNet is the oracle after `.data` (EMA) updates, under torch.inference_mode, and around pickling; inside
`reuse_derived_weights` they are computed once and dropped on exit."""

import copy
import io

import pytest
import torch

from fastmaisi.nets import derived
from fastmaisi.nets.derived import reuse_derived_weights
from fastmaisi.nets.unet import DiffusionModelUNetMaisi
from test_nets_unet import RFLOW, TOL, inputs, pair, rel

monai_maisi = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")
KEYS = ("timesteps", "class_labels", "spacing_tensor")


@pytest.fixture()
def nets():
    return pair(monai_maisi.DiffusionModelUNetMaisi, DiffusionModelUNetMaisi, RFLOW, seed=7)


def _run(net, inp):
    return net(inp["x"], **{k: inp[k] for k in KEYS})


def _ema(net, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.data.mul_(0.5).add_(torch.randn(p.shape, generator=g) * 0.05)  # the usual EMA update, through .data


def test_weights_updated_through_data_take_effect(nets):
    ref, ours = nets
    inp = inputs()
    with torch.no_grad():
        assert rel(_run(ours, inp), _run(ref, inp)) < TOL
        for net in (ref, ours):
            _ema(net, 3)
        assert rel(_run(ours, inp), _run(ref, inp)) < TOL
        with reuse_derived_weights(ours):  # a new block after the update: fresh derived weights
            assert rel(_run(ours, inp), _run(ref, inp)) < TOL
        for net in (ref, ours):
            _ema(net, 4)
        assert rel(_run(ours, inp), _run(ref, inp)) < TOL  # the block's cache is gone


def test_built_and_run_under_inference_mode(nets):
    ref, ours = nets
    inp = inputs()
    with torch.inference_mode():
        net = DiffusionModelUNetMaisi(**RFLOW).eval()
        net.load_state_dict(ref.state_dict())
        want = _run(ref, inp)
        assert rel(_run(net, inp), want) < TOL
        with reuse_derived_weights(net):
            assert rel(_run(net, inp), want) < TOL
            assert rel(_run(net, inp), want) < TOL


def test_block_reuses_then_forgets_and_leaves_nothing_on_the_network(nets, tmp_path):
    _, ours = nets
    inp = inputs()
    made = []
    real = derived.derived_weight

    def counting(module, key, make):
        return real(module, key, lambda: made.append(key) or make())

    with torch.no_grad():
        derived.derived_weight = counting
        try:
            with reuse_derived_weights(ours):
                a = _run(ours, inp)
                per_call = len(made)
                b = _run(ours, inp)
                assert per_call > 0 and len(made) == per_call  # second call: every derived weight reused
                torch.save(ours, tmp_path / "inside.pt")  # the cache is not on the module
                clone = copy.deepcopy(ours)
            assert not derived._STORES
            _run(ours, inp)
            assert len(made) == 2 * per_call  # outside the block: derived again
        finally:
            derived.derived_weight = real
    assert torch.equal(a, b)
    buf = io.BytesIO()
    torch.save(ours, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        assert torch.equal(_run(loaded, inp), a) and torch.equal(_run(clone, inp), a)
    assert not any(k.startswith("_upsample") or k.startswith("_thin") for m in ours.modules() for k in vars(m))


def test_thin_conv_pack_follows_data_updates_and_inference_mode():
    """thin_conv's packed weight (its CUDA kernel's operand): packed afresh outside a block, so `.data` updates and
    inference-mode weights (no version counter) are always seen; reused inside a block."""
    from fastmaisi.nets.thin_conv import _packed

    with torch.inference_mode():
        conv = torch.nn.Conv3d(4, 16, 3, padding=1)
        first = _packed(conv).clone()
        assert torch.equal(first[:, :12], conv.weight.permute(2, 3, 4, 1, 0).reshape(9, 12, 16))
    conv.weight.data.mul_(2.0)
    assert torch.equal(_packed(conv), 2 * first)
    with reuse_derived_weights(conv):
        assert _packed(conv) is _packed(conv)
