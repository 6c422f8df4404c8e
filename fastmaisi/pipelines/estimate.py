"""What `--dry-run` says about the sampling stages, without weights or a GPU: one denoiser call is run on the meta
device (shapes only), counting its FLOPs and the bytes of the activations it holds at its peak; time is FLOPs over a
measured rate. The decode has its own planner (`fastmaisi.decode.plan_decode`)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from fastmaisi.decode import format_seconds

# FLOP/s of a denoiser step on an H200 (fp16, channels-last), by latent voxels: rflow-ct's ControlNet + UNet at 128^3,
# 31.5 TFLOP counted here in 84.1 ms = 375 TFLOP/s (bench/step_time.py, with the Welford GroupNorm statistics);
# the mask UNet at 64^3, 1.83 TFLOP in 7.23 ms = 253 TFLOP/s (docs/performance.md, measured before our
# attention kernel). Elsewhere: the power law through those two.
CUDA_RATE, CUDA_RATE_VOXELS, CUDA_RATE_EXPONENT = 375e12, 128**3, 0.1893
# fp32 on a CPU: the demo's ControlNet + UNet on 2 cores of a development machine (4.0 GFLOP in 0.10 s at latent
# 16^3, 31.9 GFLOP in 0.74 s at 32^3).
CPU_RATE = 4e10
_GiB = 1 << 30


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors ops create and that are still referenced; the most at any time (`peak`)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None:  # views and in-place results add no memory
                key = t.untyped_storage()._cdata
                if key not in self.sizes:
                    self.sizes[key] = t.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)


class _FusedAttention(TorchFunctionMode):
    """Attention as CUDA runs it (flash / cuDNN: no score matrix in memory), with its FLOPs counted here: on the meta
    device PyTorch would decompose it into the math path, whose N x N scores do not exist on a GPU."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.flops += 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]  # QK^T and PV
            return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        return func(*args, **(kwargs or {}))


@dataclass
class CallCost:
    flops: float  # one call
    activation_bytes: int  # the most its activations (and the inputs made inside the call) hold at once


def call_cost(fn) -> CallCost:
    """FLOPs and activation peak of `fn()`, which runs networks built on the meta device."""
    live, attention, counter = _LiveBytes(), _FusedAttention(), FlopCounterMode(display=False)
    with torch.no_grad(), counter, live, attention:
        fn()
    return CallCost(counter.get_total_flops() + attention.flops, live.peak)


def weight_bytes(*nets, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for net in nets if net is not None for p in net.parameters()) * size


def sampling_costs(variant, workflow: str, opts: dict, device: torch.device) -> dict[str, tuple[CallCost, int]]:
    """Per sampling stage ("image", and "mask" for the paired workflow): one denoiser call's cost and the bytes of the
    networks it runs, counted on the meta device."""
    from fastmaisi.nets import build
    from fastmaisi.pipelines.sampling import image_denoiser, mask_denoiser

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    defs = variant.definitions()
    meta = torch.device("meta")
    with meta:
        unet = build(defs["diffusion_unet"]).to(dtype).eval()
        cnet = build(defs["controlnet"]).to(dtype).eval() if workflow != "image" and "controlnet" in defs else None
    latent = [s // 4 for s in opts["size"]]
    channels = defs["diffusion_unet"].get("in_channels", 4)

    def image_call():
        kw = dict(spacing=torch.ones(1, 3, device=meta, dtype=dtype), guidance_scale=opts["guidance_scale"])
        if variant.body_region:  # as `image.sample_image_latent` and `from_mask` call it
            kw["top_region"] = kw["bottom_region"] = torch.ones(1, 4, device=meta, dtype=dtype)
        else:
            kw["class_labels"] = torch.ones(1, device=meta, dtype=torch.long)
        if cnet is not None:
            kw["condition"] = torch.empty(1, 8, *opts["size"], device=meta, dtype=dtype)
            kw["uncond_condition"] = kw["condition"] if opts["guidance_scale"] > 0 else None
        den = image_denoiser(unet, cnet, **kw)
        kw.clear()  # the condition is embedded once and dropped, as `image_denoiser` does
        den(torch.empty(1, channels, *latent, device=meta, dtype=dtype), torch.ones(1, device=meta))

    costs = {"image": (call_cost(image_call), weight_bytes(unet, cnet, dtype=dtype))}
    if workflow == "paired":
        with meta:
            mask_unet = build(defs["mask_diffusion"]).to(dtype).eval()
        shape = variant.mask_latent_shape
        context = torch.ones(1, 1, defs["mask_diffusion"].get("cross_attention_dim", 10), device=meta, dtype=dtype)
        mask_den, what = mask_denoiser(mask_unet, context), "mask UNet"
        if opts.get("mask_generator") == "v2":  # NVIDIA's rflow-mask: guided, batch [cond, uncond]
            from fastmaisi.pipelines.paired_v2 import v2_denoiser

            spacing = torch.ones(1, 3, device=meta, dtype=dtype)
            mask_den = v2_denoiser(mask_unet, context, spacing, opts["mask_guidance_scale"])
            what = "v2 mask UNet (rflow-mask" + (", batch 2 for guidance)" if opts["mask_guidance_scale"] > 0
                                                 else ")")
        costs["mask"] = (call_cost(lambda: mask_den(torch.empty(1, *shape, device=meta, dtype=dtype),
                                                    torch.ones(1, device=meta))),
                         weight_bytes(mask_unet, dtype=dtype), what)
    return costs


def sampling_plan(variant, workflow: str, opts: dict, device: torch.device, costs: dict | None = None) -> str:
    """A line per sampling stage: steps, FLOPs and expected seconds per call, weights and activation memory."""
    costs = costs or sampling_costs(variant, workflow, opts, device)
    where = "an H200" if device.type == "cuda" else "2 CPU cores"
    latent = [s // 4 for s in opts["size"]]
    lines = []
    cost, weights = costs["image"]
    nets = "ControlNet + UNet" if workflow != "image" and "controlnet" in variant.definitions() else "UNet"
    cfg = ", batch 2 for guidance" if opts["guidance_scale"] > 0 else ""
    lines.append(_stage_line(f"Sampling: {opts['steps']} steps of the {nets} at latent {'x'.join(map(str, latent))}"
                             f"{cfg}", opts["steps"], cost, weights, _rate(device, latent), where))
    if "mask" in costs:
        shape = variant.mask_latent_shape
        mask_cost, mask_weights, what = costs["mask"]
        lines.insert(0, _stage_line(f"Mask: {opts['mask_steps']} steps of the {what} at latent "
                                    f"{'x'.join(map(str, shape[1:]))}", opts["mask_steps"], mask_cost,
                                    mask_weights, _rate(device, shape[1:]), where))
    if device.type == "cuda":
        lines.append("(On CUDA the allocator and cuDNN add about 20 % to the memory: the rflow-ct loop at 512^3 peaked at "
                     "8.8 GiB on an H200, where this counts 7.5.)")
    return "\n".join(lines)


def _rate(device: torch.device, latent) -> float:
    """FLOP/s of a denoiser step at this latent size on `device` (see CUDA_RATE)."""
    if device.type != "cuda":
        return CPU_RATE
    return CUDA_RATE * min(1.0, math.prod(latent) / CUDA_RATE_VOXELS) ** CUDA_RATE_EXPONENT


def _stage_line(what: str, steps: int, cost: CallCost, weights: int, rate: float, where: str) -> str:
    flops = f"{cost.flops / 1e12:.2f} TFLOP" if cost.flops >= 1e11 else f"{cost.flops / 1e9:.2f} GFLOP"
    return (f"{what}: {flops} per step, about {_seconds(steps * cost.flops / rate)} on {where}; weights "
            f"{_size(weights)}, activations about {_size(cost.activation_bytes)} at a step's peak.")


def _seconds(s: float) -> str:
    return format_seconds(s) if s >= 0.95 else f"{s:.2f} s"


def _size(n: int) -> str:
    return f"{n / _GiB:.2f} GiB" if n >= _GiB / 10 else f"{n / (1 << 20):.1f} MiB"
