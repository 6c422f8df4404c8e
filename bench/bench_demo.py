"""Wall-clock time of the built-in demo (`fastmaisi generate -o DIR`, CPU or GPU), each run in a fresh process, and of
the phantom generator; a number for the docs, kept out of the tests (a test must not fail because the machine is busy).

Run:  python3 bench/bench_demo.py OUT.json [--repeats 3]
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def time_demo(repeats: int) -> list:
    """Seconds of `python -m fastmaisi generate -o DIR -q`, imports and weight loading included, one per repeat."""
    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fastmaisi", "generate", "-o", out, "-q"], check=True,
                           capture_output=True)
            seconds.append(time.perf_counter() - t0)
    return seconds


def time_phantom(repeats: int) -> list:
    """Seconds of one `make_phantom` call (after a warm-up call), one per repeat."""
    from fastmaisi.phantom import make_phantom

    make_phantom(seed=0)
    seconds = []
    for seed in range(1, repeats + 1):
        t0 = time.perf_counter()
        make_phantom(seed=seed)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    demo, phantom = time_demo(args.repeats), time_phantom(args.repeats)
    import torch

    record = {"what": "demo generate and phantom wall-clock", "machine": platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "demo_generate_s": demo, "demo_generate_median_s": statistics.median(demo),
              "phantom_s": phantom, "phantom_median_s": statistics.median(phantom)}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
