"""`nets.thin_conv` (k3 convs with few channels on one side, one Triton pass with bias / residual / SiLU) against
cuDNN on the H200: each conv of MAISI's that takes it, alone (cuDNN conv + our bias pass, as the networks ran them
before), a few launch shapes; then the ControlNet + UNet step at latent 128^3 with the kernel on and off in the same
process (alternating, median of 20 steps each, three rounds) and the conditioning embedding at 512^3.

Run (device tool):  python3 bench/thin_conv.py     -> $OUT/thin_conv.jsonl
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nets import CNET_DEF, UNET_DEF, fp16_channels_last, inputs, step_fn  # noqa: E402
from cuda_timing import event_ms  # noqa: E402
from records import jsonl_log  # noqa: E402

from fastmaisi.nets import thin_conv  # noqa: E402
from fastmaisi.nets.blocks import add_bias_  # noqa: E402

CL = torch.channels_last_3d


def step_ms(step, n=20):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


@torch.no_grad()
def main():
    emit = jsonl_log("thin_conv")
    torch.manual_seed(0)
    for cin, cout, stride, size in [(4, 64, 1, 128), (64, 4, 1, 128), (8, 8, 1, 512), (8, 32, 2, 512), (4, 64, 1, 64)]:
        conv = torch.nn.Conv3d(cin, cout, 3, stride=stride, padding=1).cuda().half().to(memory_format=CL)
        x = torch.randn(1, cin, size, size, size, device="cuda").half().contiguous(memory_format=CL)
        ref = add_bias_(F.conv3d(x, conv.weight, None, stride=stride, padding=1), conv.bias)
        ours = thin_conv.thin_conv(x, conv)
        rec = {"conv": f"{cin}->{cout} s{stride} at {size}^3",
               "max_abs_diff_vs_cudnn": float((ours.float() - ref.float()).abs().max()),
               "cudnn_plus_bias_pass_ms": round(event_ms(
                   lambda: add_bias_(F.conv3d(x, conv.weight, None, stride=stride, padding=1), conv.bias), 10), 3)}
        for block_m, warps in [(128, 4), (64, 4), (256, 4), (256, 8)]:
            rec[f"thin_{block_m}_{warps}w_ms"] = round(event_ms(
                lambda: thin_conv.thin_conv(x, conv, block_m=block_m, num_warps=warps), 10), 3)
        emit(rec)
        del x, ref, ours
    unet, cnet = fp16_channels_last(UNET_DEF), fp16_channels_last(CNET_DEF)
    for p in cnet.parameters():  # non-zero ControlNet outputs (its zero convs start at zero)
        p.add_(torch.randn_like(p) * 0.01)
    inp = inputs([128, 128, 128])
    step = step_fn(unet, cnet, inp, CL)
    outs = {}
    for on in (True, False):
        thin_conv.ENABLED = on
        cnet.clear_condition_cache()
        outs[on] = step().float()
    emit({"step_output_max_abs_diff_on_vs_off": float((outs[True] - outs[False]).abs().max()),
          "output_max_abs": float(outs[False].abs().max())})
    for _ in range(3):
        for on in (True, False):
            thin_conv.ENABLED = on
            cnet.clear_condition_cache()
            step()
            emit({"thin_conv": on, "dm_step_median_ms": round(step_ms(step), 2)})
    label = torch.randint(0, 256, (1, 1, 512, 512, 512), dtype=torch.uint8, device="cuda")
    for on in (True, False):
        thin_conv.ENABLED = on
        emit({"thin_conv": on, "embed_labels_512_ms": round(event_ms(lambda: cnet.embed_labels(label), 5), 2)})
    thin_conv.ENABLED = True


if __name__ == "__main__":
    main()
