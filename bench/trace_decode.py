"""Per-op device peaks of the tiled 512^3 decode against the planner's estimates (diagnostic; device tool)."""

import sys

import torch

import fastmaisi.decode as D
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
from fastmaisi.variants import image_autoencoder_def

dev = torch.device("cuda")
kw = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
vae = AutoencoderKlMaisi(**kw).to(dev).half().eval()
z = torch.randn(1, 4, 128, 128, 128, device=dev, dtype=torch.float16)
base = torch.cuda.memory_allocated()
for gib in map(int, sys.argv[1:] or [12, 20]):
    b = gib << 30
    D.decode_latent(vae, z, b)  # warm: host memory, kernels
    plan = D.plan_decode(z.shape, dev, b, torch.float16, vae)
    ops, slots = D._compile(vae.decoder.blocks, 4, vae.post_quant_conv)
    D._shapes(ops, slots, z.shape[2:])
    pl = D._Planner(ops, slots, 1, 1, 2, "cuda")
    _, peaks, _ = pl.tile(plan._place, b)
    D.TRACE = []
    D.decode_latent(vae, z, b)
    print(f"budget {gib} GiB: plan peak {plan.peak_bytes / 2**30:.2f}")
    for (k, kind, where, rows, peak), est in zip(D.TRACE, peaks):
        gpu_extra = sum(plan._gpu_rows[s] * pl.row_bytes(s) for s in D._live(ops, D._lifetimes(ops, slots, plan._place), k)
                        if plan._place[s] == D.HOST)
        print(f"  op{k:2d} {kind:4s} {where:9s} rows {rows:3d} measured {(peak - base) / 2**30:6.2f} "
              f"estimated {(est + gpu_extra) / 2**30:6.2f} GiB")
    D.TRACE = None
