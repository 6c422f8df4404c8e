"""Per-op device peaks and times of the tiled 512^3 (or 512x512x768) decode against the planner's estimates, how
allocated memory moves across an op's slabs, and cuDNN's workspace for the decoder's slab shapes (diagnostic).

Run:  python3 bench/trace_decode.py [GiB ...] [--depth 128|192] [--fraction F]
"""

import argparse

import torch
import torch.nn.functional as F

import fastmaisi.decode as D
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
from fastmaisi.variants import image_autoencoder_def

dev = torch.device("cuda")


def workspace():
    """Peak allocated during one conv minus its input, output and weights: cuDNN's workspace."""
    for cin, cout, rows, hw in [(64, 64, 11, 512), (64, 64, 52, 512), (128, 64, 15, 512), (64, 8, 59, 512),
                                (128, 128, 26, 512), (256, 128, 31, 256)]:
        x = torch.randn(1, cin, rows, hw, hw, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last_3d)
        w = torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last_3d)
        F.conv3d(x, w, padding=(0, 1, 1))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = F.conv3d(x, w, padding=(0, 1, 1))
        torch.cuda.synchronize()
        ws = torch.cuda.max_memory_allocated() - base - y.numel() * 2
        print(f"workspace conv {cin}->{cout} rows {rows} at {hw}^2: {ws / 2**30:.2f} GiB "
              f"(input slab {x.numel() * 2 / 2**30:.2f} GiB)", flush=True)
        del x, w, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("budgets", nargs="*", type=int, default=[12, 20])
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--fraction", type=float, default=None)
    args = ap.parse_args()
    if args.fraction is not None:
        D.plan._PLAN_FRACTION = args.fraction
    workspace()
    kw = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
    vae = AutoencoderKlMaisi(**kw).to(dev).half().eval()
    z = torch.randn(1, 4, 128, 128, args.depth, device=dev, dtype=torch.float16)
    base = torch.cuda.memory_allocated()
    for gib in args.budgets:
        b = gib << 30
        D.decode_latent(vae, z, b)  # warm: host memory, kernels
        plan = D.plan_decode(z.shape, dev, b, torch.float16, vae)
        ops, slots = D._compile(vae.decoder.blocks, 4, vae.post_quant_conv)
        D._shapes(ops, slots, z.shape[2:])
        pl = D._Planner(ops, slots, 1, 1, 2, "cuda")
        peaks = plan._peaks
        D.execute.TRACE = []
        D.decode_latent(vae, z, b)
        print(f"budget {gib} GiB (fraction {D.plan._PLAN_FRACTION}), depth {args.depth * 4}: plan peak "
              f"{plan.peak_bytes / 2**30:.2f}", flush=True)
        slabs = {}
        for e in D.execute.TRACE:
            if e[0] == "slab":
                slabs.setdefault(e[1], []).append(e[3])
        last = D._lifetimes(ops, slots, plan._place)
        for e in D.execute.TRACE:
            if e[0] == "slab":
                continue
            k, kind, where, rows, peak, secs = e
            est = conv = 0.0
            if k in pl.passes(plan._place):
                est, acc, n = pl.pass_cost(k, plan._place, plan._rows, plan._gpu_rows)
                conv = n * acc["conv"]
            extra = sum(plan._gpu_rows[s] * pl.row_bytes(s) for s in D._live(ops, last, k) if plan._place[s] == D.HOST)
            al = slabs.get(k, [0])
            print(f"  op{k:2d} {kind:4s} {where:9s} rows {rows:3d} measured {(peak - base) / 2**30:6.2f} estimated "
                  f"{(peaks[k] + extra) / 2**30:6.2f} GiB; allocated after slabs first/max/last "
                  f"{(al[0] - base) / 2**30:.2f}/{(max(al) - base) / 2**30:.2f}/{(al[-1] - base) / 2**30:.2f}; "
                  f"{secs:.3f} s (estimated {est:.3f}, of which convs {conv:.3f})")
        D.execute.TRACE = None


if __name__ == "__main__":
    main()
