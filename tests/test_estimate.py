"""--dry-run's sampling estimate: FLOPs and activation bytes of one denoiser call, counted on the meta device."""

import torch
import torch.nn.functional as F

from fastmaisi.nets import build
from fastmaisi.pipelines.estimate import _LiveBytes, call_cost, sampling_plan
from fastmaisi.pipelines.sampling import image_denoiser
from fastmaisi.variants import get_variant


def test_conv_and_attention_flops_and_live_bytes_are_counted_as_cuda_runs_them():
    """A conv, then attention over its voxels: FLOPs by the textbook formulas; the peak holds the conv output and
    q/k/v-sized tensors, never the N x N scores that the meta device's math path would make."""
    meta = torch.device("meta")
    w = torch.empty(8, 4, 3, 3, 3, device=meta)
    n = 16 ** 3

    def run():
        y = F.conv3d(torch.empty(1, 4, 16, 16, 16, device=meta), w, padding=1)  # (1, 8, 16^3)
        t = y.flatten(2).transpose(1, 2).unflatten(-1, (2, 4)).transpose(1, 2)  # (1, 2 heads, n, 4)
        return F.scaled_dot_product_attention(t, t, t)

    cost = call_cost(run)
    assert cost.flops == 2 * 4 * 8 * 27 * n + 4 * 2 * n * n * 4
    scores = 2 * n * n * 4
    assert 8 * n * 4 <= cost.activation_bytes < scores / 100  # fp32: input, conv output, attention output


def _demo_denoiser_call(device, guidance=0.0):
    defs = get_variant("demo").definitions()
    torch.manual_seed(0)
    with torch.device(device):
        unet, cnet = build(defs["diffusion_unet"]).eval(), build(defs["controlnet"]).eval()

    def call():
        kw = dict(spacing=torch.ones(1, 3, device=device), class_labels=torch.ones(1, device=device, dtype=torch.long),
                  condition=torch.zeros(1, 8, 64, 64, 64, device=device), guidance_scale=guidance)
        den = image_denoiser(unet, cnet, **kw)
        kw.clear()
        return den(torch.zeros(1, 4, 16, 16, 16, device=device), torch.ones(1, device=device))

    return call


def test_meta_run_holds_the_same_activations_as_a_real_cpu_run():
    """The meta device follows the CPU code path: the same tensors are alive at the peak (attention on CPU keeps no
    score matrix either)."""
    meta = call_cost(_demo_denoiser_call("meta"))
    live, call = _LiveBytes(), _demo_denoiser_call("cpu")  # the networks are built outside the count
    with torch.no_grad(), live:
        call()
    assert meta.activation_bytes == live.peak > 1 << 20


def test_guidance_doubles_the_work_of_a_step():
    one, two = call_cost(_demo_denoiser_call("meta")), call_cost(_demo_denoiser_call("meta", guidance=2.0))
    assert 1.95 < two.flops / one.flops < 2.05  # the batch is doubled; the condition is embedded once per call
    assert two.activation_bytes > 1.5 * one.activation_bytes


def test_sampling_plan_names_each_stage_and_scales_with_steps():
    variant = get_variant("demo")
    opts = dict(size=(64, 64, 64), steps=30, guidance_scale=0.0, mask_steps=100)
    text = sampling_plan(variant, "paired", opts, torch.device("cpu"))
    mask, sampling = text.splitlines()
    assert mask.startswith("Mask: 100 steps of the mask UNet at latent 16x16x16")
    assert sampling.startswith("Sampling: 30 steps of the ControlNet + UNet at latent 16x16x16")
    image_only = sampling_plan(variant, "image", {**opts, "steps": 300}, torch.device("cpu"))
    assert image_only.startswith("Sampling: 300 steps of the UNet") and "Mask" not in image_only


def test_cuda_rate_passes_through_the_two_measured_steps():
    """375 TFLOP/s at latent 128^3 (ControlNet + UNet), 253 at 64^3 (the mask UNet): the H200 steps the rate is fitted
    to; smaller latents run slower, larger ones no faster; CPU plans use the CPU rate."""
    from fastmaisi.pipelines import estimate

    cuda = torch.device("cuda")
    assert estimate._rate(cuda, (128, 128, 128)) == estimate.CUDA_RATE
    assert abs(estimate._rate(cuda, (64, 64, 64)) / 253e12 - 1) < 0.01
    assert estimate._rate(cuda, (32, 32, 32)) < estimate._rate(cuda, (64, 64, 64))
    assert estimate._rate(cuda, (256, 256, 128)) == estimate.CUDA_RATE
    assert estimate._rate(torch.device("cpu"), (128, 128, 128)) == estimate.CPU_RATE
