"""The ControlNet's conditioning embedding at 512^3 (the 8 bit-channels of a label map -> 64 x 128^3): its time and
kernels, and what cuDNN does with its first conv (8 -> 8 channels, k3, 512^3) in other layouts, autotuned, or with
channels padded to 16. Diagnostic, random weights.

Run (device tool):  python3 bench/bench_embedding.py   -> $OUT/bench_embedding.jsonl
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_nets import CNET_DEF, fp16_channels_last, label_map  # noqa: E402
from cuda_timing import event_ms  # noqa: E402

from records import jsonl_log  # noqa: E402

from fastmaisi.pipelines.from_mask import bit_channels  # noqa: E402

def timed(fn, reps=5):
    return round(event_ms(fn, reps), 3)


@torch.no_grad()
def main():
    emit = jsonl_log("bench_embedding")
    torch.manual_seed(0)
    cl = torch.channels_last_3d
    cnet = fp16_channels_last(CNET_DEF)
    label = label_map((512, 512, 512))
    emit({"what": "bit_channels (host uint8 -> device fp16 channels-last)",
          "ms": timed(lambda: bit_channels(label, "cuda", torch.float16))})
    cond = bit_channels(label, "cuda", torch.float16)
    emit({"what": "condition layout channels-last", "value": cond.is_contiguous(memory_format=cl)})
    emit({"what": "embed_condition", "ms": timed(lambda: cnet.embed_condition(cond))})
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        cnet.embed_condition(cond)
        torch.cuda.synchronize()
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:10]:
        emit({"embed_kernel": e.key[:110], "ms": round(e.device_time_total / 1e3, 3), "count": e.count})
    conv = cnet.controlnet_cond_embedding.conv_in.conv
    w, bias = conv.weight, conv.bias
    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        for name, x, wt in [("channels-last", cond, w), ("NCDHW", cond.contiguous(), w.contiguous()),
                            ("channels-last, 16 in / 16 out", F.pad(cond, (0, 0, 0, 0, 0, 0, 0, 8)).contiguous(
                                memory_format=cl), F.pad(w, (0, 0, 0, 0, 0, 0, 0, 8, 0, 8)).contiguous(
                                memory_format=cl)),
                            ("channels-last, 8 in / 16 out", cond, F.pad(w, (0, 0, 0, 0, 0, 0, 0, 0, 0, 8)).contiguous(
                                memory_format=cl))]:
            emit({"what": "conv_in 8->8 k3 at 512^3", "layout": name, "cudnn_benchmark": autotune,
                  "ms": timed(lambda: F.conv3d(x, wt, None, padding=1))})
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
