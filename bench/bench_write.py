"""What the writer thread does per sample, on the CPU: the HU quality check and `io.write_outputs` (NIfTI image and
label map, label table, preview, record) of a CT-like volume, with the deflate this machine has (python-isal's when
installed, else zlib) and with zlib forced, in one run.

The volume: a phantom torso made at up to 128^3, resampled to --size^3 (linear; labels nearest) with the phantom's
noise level added at full resolution, so it compresses about as a generated CT does.

    python3 bench/bench_write.py --size 512 --out OUT.json
"""
import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmaisi import io  # noqa: E402
from fastmaisi.cores import usable_cores  # noqa: E402
from fastmaisi.io import nifti  # noqa: E402


def volume(size: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    from fastmaisi.phantom import make_phantom

    small = min(size, 128)
    image, label = make_phantom((small,) * 3, (288.0 / small,) * 3, seed=0)
    if size != small:
        image = ndimage.zoom(image, size / small, order=1)
        label = ndimage.zoom(label, size / small, order=0)
        tissue = image > -999.0
        image[tissue] += np.random.default_rng(1).standard_normal(int(tissue.sum()), dtype=np.float32) * 20.0
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(round(time.perf_counter() - t, 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from fastmaisi.labels import quality_check

    image, label = volume(args.size)
    layouts = {  # how generate hands the volumes to the writer now, and how it did before
        "fortran_uint8": (np.asfortranarray(image), np.asfortranarray(label)),
        "c_int16": (image, label.astype(np.int16)),
    }
    record = {"variant": "rflow-ct", "request": {}, "seed": 0}
    result = {"size": args.size, "cores": usable_cores(),
              "raw_MiB": round((image.nbytes + label.nbytes) / 2**20, 1)}
    deflates = [("default", nifti._gzip_class)]
    if nifti.deflate_name() != "zlib":
        deflates.append(("zlib", lambda: gzip.GzipFile))
    for layout, (im, lab) in layouts.items():
        result[f"quality_check_{layout}_s"] = timed(lambda: quality_check(im, lab), args.repeats)
        for name, cls in deflates:
            nifti._gzip_class, real = cls, nifti._gzip_class
            try:
                with tempfile.TemporaryDirectory() as d:
                    write = lambda: io.write_outputs(d, "s", im, lab, (1.0, 1.0, 1.0), record,  # noqa: E731
                                                     modality="ct", overwrite=True)
                    times = timed(write, args.repeats)
                    size = sum(p.stat().st_size for p in Path(d).iterdir())
                key = f"write_outputs_{layout}_{name}"
                result[key] = {"deflate": nifti.deflate_name(), "s": times, "MiB_written": round(size / 2**20, 1)}
            finally:
                nifti._gzip_class = real
            print(json.dumps({key: result[key], "quality_check_s": result[f"quality_check_{layout}_s"]}), flush=True)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
