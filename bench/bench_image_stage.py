"""GPU benchmark: the rflow-ct 512^3 image stage alone in a fresh process, as `generate` holds it on the device: our
ControlNet + UNet (fp16, channels-last, random weights) and the image VAE, nothing else (no MONAI networks, no other
benchmark's leftovers). The stage is `bench_nets.image_stage`: 30-step loop (eager at 128^3, as `sample` runs it),
then the exact decode under a budget; loop and decode times and peaks apart. Writes
$OUT/bench_image_stage_{labels,bits}.json.

Run (device tool):  python3 bench/bench_image_stage.py [--budget 12] [--repeats 3] [--condition labels|bits] [--keep-cache]
"""

import argparse
import json
import os

import torch

from bench_nets import CNET_DEF, UNET_DEF, fp16_channels_last, image_stage, inputs, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=12, help="decode budget, GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--condition", choices=["labels", "bits"], default="labels",
                    help="embed the uint8 label map directly (what from_mask does) or build the bit-channels first")
    ap.add_argument("--keep-cache", action="store_true",
                    help="no torch.cuda.empty_cache() between calls (as `generate` runs samples one after another)")
    args = ap.parse_args()
    torch.manual_seed(0)
    unet, cnet = fp16_channels_last(UNET_DEF), fp16_channels_last(CNET_DEF)  # as `pipelines.models` loads them
    image_stage(unet, cnet, inputs([128, 128, 128]), args.budget, args.repeats, args.condition,
                not args.keep_cache)
    with open(os.path.join(os.environ.get("OUT", "."), f"bench_image_stage_{args.condition}{'_keep_cache' if args.keep_cache else ''}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
