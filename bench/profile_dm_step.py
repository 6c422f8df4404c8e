"""Where one ControlNet + UNet step (rflow-ct, latent 128^3, fp16, random weights) spends its GPU time: the step's
median time, then CUDA time per op and input shape, per conv shape and per kernel, for NCDHW and channels-last
(diagnostic; no MONAI needed).

Run:  python3 bench/profile_dm_step.py [--channels-last-only]
"""
import sys, time, torch
sys.path.insert(0, "bench")
from bench_nets import UNET_DEF, CNET_DEF, inputs, step_fn
from fastmaisi.nets import build
from torch.profiler import ProfilerActivity, profile
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")
torch.manual_seed(0)
unet, cnet = build(UNET_DEF).to(dev).half().eval(), build(CNET_DEF).to(dev).half().eval()
inp = inputs([128, 128, 128])
formats = [torch.channels_last_3d] if "--channels-last-only" in sys.argv else [torch.contiguous_format, torch.channels_last_3d]
for fmt in formats:
    step = step_fn(unet.to(memory_format=fmt), cnet.to(memory_format=fmt), inp, fmt if fmt != torch.contiguous_format else None)
    with torch.no_grad():
        for _ in range(3): step()
        torch.cuda.synchronize()
        ts=[]
        for _ in range(5):
            t=time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter()-t)
        print(fmt, "step s", sorted(ts)[2], flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
            step(); torch.cuda.synchronize()
    ka = p.key_averages(group_by_input_shape=True)
    rows = sorted([e for e in ka if e.key.startswith("aten::") and e.key not in ("aten::_convolution", "aten::convolution", "aten::conv3d", "aten::cudnn_convolution")], key=lambda e: -e.device_time_total)
    print("== ops by cuda time", fmt)
    for e in rows[:30]:
        print(f"{e.device_time_total/1e3:8.2f} ms {e.count:4d}x {e.key:35s} {str(e.input_shapes)[:150]}")
    rows = sorted([e for e in ka if e.key == "aten::cudnn_convolution"], key=lambda e: -e.device_time_total)
    print("== convs")
    for e in rows[:40]:
        print(f"{e.device_time_total/1e3:8.2f} ms {e.count:4d}x {str(e.input_shapes)[:160]}")
    kr = sorted(p.key_averages(), key=lambda e: -e.device_time_total)
    print("== kernels")
    for e in kr[:25]:
        if e.device_type is not None and "cuda" in str(e.device_type).lower() or True:
            print(f"{e.device_time_total/1e3:8.2f} ms {e.count:4d}x {e.key[:110]}")
    busy = sum(e.self_device_time_total for e in p.key_averages()) / 1e3
    print(f"== GPU busy {busy:.2f} ms in the profiled step (kernels and copies, self time summed)", flush=True)
