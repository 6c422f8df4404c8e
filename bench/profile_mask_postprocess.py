"""Where the GPU mask clean-up spends its time on a random-weight v2 decode (256^3, bench_mask_v2's networks and
condition): cProfile with CUDA_LAUNCH_BLOCKING=1 so kernel time lands on its caller, and the rounds each piece
labelling takes. Writes the decoded map to OUT.npz (for checking the host and tensor paths against each other).

    CUDA_LAUNCH_BLOCKING=1 python3 bench/profile_mask_postprocess.py OUT
"""
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_mask_v2 as b  # noqa: E402
from fastmaisi.pipelines import label_pieces as lp  # noqa: E402
from fastmaisi.pipelines import mask_postprocess_torch as mpt  # noqa: E402


def main():
    out = Path(sys.argv[1])
    device = torch.device("cuda")
    from fastmaisi.demo import DEMO_VARIANT
    from fastmaisi.pipelines import paired, paired_v2
    from fastmaisi.pipelines.models import Models

    _, _, unet, ae = b.networks(False)
    unet = unet.to(device=device, dtype=torch.float16).eval().to(memory_format=torch.channels_last_3d)
    ae = ae.to(device=device, dtype=torch.float16).eval()
    models = Models(variant=DEMO_VARIANT, autoencoder=ae, diffusion_unet=unet, scheduler_def={},
                    mask_autoencoder=ae, mask_diffusion=unet, mask_scale_factor=1.0056, dtype=torch.float16)
    z = paired_v2.sample_mask_latent_v2(models, b.CONDITION, seed=0, latent_shape=(4, 64, 64, 64), progress=False)
    label = paired.decode_mask(models, z, on_device=True)
    np.savez_compressed(str(out) + ".npz", label=label.cpu().numpy())
    rounds = []
    real = lp.same_label_neighbour_min

    def counting(*a, **k):
        rounds[-1] += 1
        return real(*a, **k)

    real_pieces = lp.label_pieces

    def pieces(key):
        rounds.append(0)
        t = time.perf_counter()
        r = real_pieces(key)
        torch.cuda.synchronize()
        print(f"label_pieces: {rounds[-1]} rounds, {time.perf_counter() - t:.3f} s, "
              f"{int((key >= 0).sum())} voxels", flush=True)
        return r

    lp.same_label_neighbour_min = counting
    mpt.label_pieces = pieces
    bone_lesion = [-1] * 9 + [0.3]  # (the v1 vector's places; bench_mask_v2's condition asks for a bone lesion)
    mpt.postprocess_any(label, bone_lesion)  # warm-up: kernel compilation
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    mpt.postprocess_any(label, bone_lesion)
    torch.cuda.synchronize()
    prof.disable()
    print("total", round(time.perf_counter() - t, 3))
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    vals, counts = torch.unique(label, return_counts=True)
    print("labels", dict(zip(vals.tolist(), counts.tolist())))


main()
