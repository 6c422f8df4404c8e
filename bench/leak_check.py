"""Diagnostic: device memory still allocated after each phase of repeated image stages (2-step loop at a 128^3
latent, then the 12 GiB exact decode), to find state that survives a call. Prints one line per phase and call.

Run (device tool):  python3 bench/leak_check.py
"""
import sys
import time

import torch

sys.path.insert(0, "bench")
from bench_nets import CNET_DEF, UNET_DEF, dev, fp16_channels_last, fp16_image_vae, inputs, label_map  # noqa: E402

from fastmaisi.decode import decode_latent  # noqa: E402
from fastmaisi.pipelines.from_mask import bit_channels  # noqa: E402
from fastmaisi.pipelines.sampling import image_denoiser, sample  # noqa: E402
from fastmaisi.schedulers import build as build_scheduler  # noqa: E402
from fastmaisi.variants import RFLOW_SCHEDULER_DEF  # noqa: E402

torch.manual_seed(0)
unet, cnet = fp16_channels_last(UNET_DEF), fp16_channels_last(CNET_DEF)
vae = fp16_image_vae()
inp = inputs([128, 128, 128])
label = label_map([512, 512, 512])
mib = lambda: round(torch.cuda.memory_allocated() / 2**20, 1)  # noqa: E731
print("start", mib(), flush=True)
for call in range(4):
    torch.backends.cudnn.benchmark = call >= 2
    cond = bit_channels(label, dev, torch.float16)
    denoise = image_denoiser(unet, cnet, spacing=inp["spacing"], class_labels=inp["cls"], condition=cond)
    del cond
    z = sample(denoise, build_scheduler(RFLOW_SCHEDULER_DEF), inp["x"], 2, disable=True, cuda_graph=True)
    del denoise
    torch.cuda.synchronize()
    print(call, "after loop", mib(), flush=True)
    t = time.perf_counter()
    y = decode_latent(vae, z, 12 << 30)
    torch.cuda.synchronize()
    t = time.perf_counter() - t
    del z, y
    print(call, "after decode", mib(), f"decode {t:.3f} s", flush=True)
    torch.cuda.empty_cache()
