"""Where the rflow-ct 512^3 image stage's loop time goes besides its 30 steps (diagnostic, random weights): building
the condition from a host uint8 label map, the ControlNet's conditioning embedding (with its kernels), the first
denoiser call plus CUDA-graph capture, a replayed step, an eager step, and the 30-step loop with and without graphs
(recorded here whatever `sampling.GRAPH_MAX_VOXELS` says, to compare).

Run (device tool):  python3 bench/profile_image_stage.py   -> $OUT/profile_image_stage.jsonl
"""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_nets import CNET_DEF, UNET_DEF, fp16_channels_last, inputs, label_map  # noqa: E402

from records import jsonl_log  # noqa: E402

from fastmaisi.nets.graphs import CudaGraphed  # noqa: E402
from fastmaisi.pipelines.from_mask import bit_channels  # noqa: E402
from fastmaisi.pipelines import sampling  # noqa: E402
from fastmaisi.pipelines.sampling import image_denoiser, sample  # noqa: E402
from fastmaisi.schedulers import build as build_scheduler  # noqa: E402
from fastmaisi.variants import RFLOW_SCHEDULER_DEF  # noqa: E402

def timed(fn, reps=1):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        r = fn()
    torch.cuda.synchronize()
    return r, (time.perf_counter() - t0) / reps


@torch.no_grad()
def main():
    emit = jsonl_log("profile_image_stage")
    torch.manual_seed(0)
    unet, cnet = fp16_channels_last(UNET_DEF), fp16_channels_last(CNET_DEF)
    inp = inputs([128, 128, 128])
    label = label_map((512, 512, 512))
    for rep in range(2):
        cond, t_cond = timed(lambda: bit_channels(label, "cuda", torch.float16))
        emb, t_emb = timed(lambda: cnet.embed_condition(cond))
        denoise = image_denoiser(unet, cnet, spacing=inp["spacing"], class_labels=inp["cls"], condition=cond)
        x, t = inp["x"], torch.full((1,), 500.0, device="cuda")
        _, t_eager = timed(lambda: denoise(x, t), 3)
        g = CudaGraphed(denoise)
        _, t_first = timed(lambda: g(x, t))
        _, t_replay = timed(lambda: g(x, t), 5)
        emit({"rep": rep, "bit_channels_s": round(t_cond, 4), "embed_condition_s": round(t_emb, 4),
              "eager_step_s": round(t_eager, 4), "first_call_plus_capture_s": round(t_first, 4),
              "replay_step_s": round(t_replay, 4)})
        for graphs in (True, False):
            sampling.GRAPH_MAX_VOXELS = x[0, 0].numel() if graphs else 0  # record graphs at this size, or never
            z, t_loop = timed(lambda: sample(denoise, build_scheduler(RFLOW_SCHEDULER_DEF), x, 30, disable=True,
                                             cuda_graph=graphs))
            emit({"rep": rep, "loop_30_steps_s": round(t_loop, 4), "cuda_graph": graphs})
        del g, denoise, cond, emb
        torch.cuda.empty_cache()
    cond = bit_channels(label, "cuda", torch.float16)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        cnet.embed_condition(cond)
        torch.cuda.synchronize()
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        emit({"embed_kernel": e.key[:120], "ms": round(e.device_time_total / 1e3, 3), "count": e.count})


if __name__ == "__main__":
    main()
