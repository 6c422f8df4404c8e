"""The ControlNet embedding's first conv straight from the uint8 label map (`fastmaisi.nets.label_conv`) against the
bit-channel path (binarize to fp16, cuDNN's 8->8 conv, bias + SiLU pass), at 512^3 on the GPU: conv_in alone for
random ids (every tap a different table row: the gathers' worst case) and for a blocky map (regions of 32^3 voxels,
like a real mask), a few launch shapes; then the whole conditioning embedding both ways with MAISI's ControlNet.

Run (device tool):  python3 bench/label_embedding.py     -> $OUT/label_embedding.jsonl
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nets import CNET_DEF, fp16_channels_last  # noqa: E402
from cuda_timing import event_ms  # noqa: E402
from records import jsonl_log  # noqa: E402

from fastmaisi.labels import binarize_labels  # noqa: E402
from fastmaisi.nets.label_conv import label_conv  # noqa: E402


def bit_path(label, conv):
    """What the pipeline did before: the fp16 bit-channels, then conv_in with its bias and SiLU."""
    return F.silu(conv(binarize_labels(label, dtype=torch.float16, channels_last=True)))


@torch.no_grad()
def main():
    emit = jsonl_log("label_embedding")
    torch.manual_seed(0)
    size = (512, 512, 512)
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).cuda().half().to(memory_format=torch.channels_last_3d)
    maps = {"random ids": torch.randint(0, 256, (1, 1, *size), dtype=torch.uint8, device="cuda"),
            "blocky (32^3 regions)": torch.randint(0, 256, (1, 1, 16, 16, 16), dtype=torch.uint8, device="cuda")
            .repeat_interleave(32, 2).repeat_interleave(32, 3).repeat_interleave(32, 4).contiguous()}
    for name, label in maps.items():
        crop = label[:, :, :64]
        truth = F.silu(F.conv3d(binarize_labels(crop, dtype=torch.float64), conv.weight.double(), conv.bias.double(),
                                padding=1))
        emit({"map": name, "ours_max_err_vs_fp64": float((label_conv(crop, conv).double() - truth).abs().max()),
              "bits_max_err_vs_fp64": float((bit_path(crop, conv).double() - truth).abs().max())})
        emit({"map": name, "what": "bit-channels + cuDNN conv + SiLU", "ms": round(event_ms(lambda: bit_path(label, conv), 5), 2)})
        for block_v, warps in [(256, 4), (128, 4), (512, 4), (512, 8), (1024, 8)]:
            ms = event_ms(lambda: label_conv(label, conv, block_v=block_v, num_warps=warps), 5)
            emit({"map": name, "what": "label_conv", "block_v": block_v, "num_warps": warps, "ms": round(ms, 2)})
    cnet = fp16_channels_last(CNET_DEF)
    for p in cnet.controlnet_cond_embedding.parameters():  # (its conv_out starts at zero, like MONAI's)
        p.add_(torch.randn_like(p) * 0.02)
    for name, label in maps.items():
        old = lambda: cnet.embed_condition(binarize_labels(label, dtype=torch.float16, channels_last=True))  # noqa: E731
        a, b = old(), cnet.embed_labels(label)
        emit({"map": name, "whole embedding": "bits + embed_condition", "ms": round(event_ms(old, 5), 2)})
        emit({"map": name, "whole embedding": "embed_labels", "ms": round(event_ms(lambda: cnet.embed_labels(label), 5), 2),
              "max_rel_diff": float((a.float() - b.float()).abs().max() / a.float().abs().max())})


if __name__ == "__main__":
    main()
