"""GPU primitives that the exact decode's planner models: cuDNN 3-D conv throughput for the MAISI decoder's and
encoder's layer shapes on slabs (fp16, channels_last_3d), and page-locked host<->device copy bandwidth, alone and
overlapped with convolutions on another stream. Prints one JSON line per measurement; writes $OUT/primitives.json.

Run (device tool):  python3 bench/bench_primitives.py
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

dev = torch.device("cuda")
CL = torch.channels_last_3d
results = []


def emit(d):
    print(json.dumps(d), flush=True)
    results.append(d)


def timeit(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def conv_rate(cin, cout, k, rows, hw, bench):
    torch.backends.cudnn.benchmark = bench
    x = torch.randn(1, cin, rows + k - 1, hw, hw, device=dev, dtype=torch.float16).to(memory_format=CL)
    w = torch.randn(cout, cin, k, k, k, device=dev, dtype=torch.float16).to(memory_format=CL) * 0.01
    s = timeit(lambda: F.conv3d(x, w, None, padding=(0, k // 2, k // 2)))
    flops = 2 * cin * cout * k**3 * rows * hw * hw
    emit({"what": "conv", "cin": cin, "cout": cout, "k": k, "rows": rows, "hw": hw, "cudnn_benchmark": bench,
          "ms": round(s * 1e3, 3), "TFLOPs": round(flops / s / 1e12, 1)})


def pinning(gib: int = 8):
    """Seconds to get `gib` GiB of page-locked host memory: register fresh pageable memory (what decode.py does),
    touch it first with all threads then register, or allocate pinned memory directly."""
    n = gib << 30
    t = time.perf_counter()
    a = torch.empty(n, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(a.data_ptr(), n, 0)
    register = time.perf_counter() - t
    t = time.perf_counter()
    b = torch.empty(n, dtype=torch.uint8)
    b.zero_()
    touched = time.perf_counter() - t
    torch.cuda.cudart().cudaHostRegister(b.data_ptr(), n, 0)
    touch_register = time.perf_counter() - t
    t = time.perf_counter()
    c = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned = time.perf_counter() - t
    emit({"what": "pinning", "GiB": gib, "register_s": round(register, 2), "touch_s": round(touched, 2),
          "touch_then_register_s": round(touch_register, 2), "pin_memory_alloc_s": round(pinned, 2),
          "threads": torch.get_num_threads()})
    for x in (a, b):
        torch.cuda.cudart().cudaHostUnregister(x.data_ptr())
    del a, b, c


def main():
    import sys

    if "--pinning" in sys.argv:
        pinning()
        return
    for bench in (False, True):
        for cin, cout, k, hw, rows_list in [(128, 128, 3, 512, (4, 8, 16, 32)), (128, 64, 3, 512, (8, 16, 32)),
                                            (64, 64, 3, 512, (8, 16, 32, 64)), (64, 1, 3, 512, (16, 64)),
                                            (128, 64, 1, 512, (16,)), (256, 256, 3, 256, (16, 32)),
                                            (256, 128, 3, 256, (16, 32)), (128, 128, 3, 256, (16, 64)),
                                            (256, 256, 3, 128, (32, 128))]:
            for rows in rows_list:
                conv_rate(cin, cout, k, rows, hw, bench)
    torch.backends.cudnn.benchmark = False
    # host <-> device copies, 1 GiB, page-locked by cudaHostRegister as decode.py does
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n, 0)
    host2 = torch.empty(n, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(host2.data_ptr(), n, 0)
    d1 = torch.empty(n, dtype=torch.uint8, device=dev)
    d2 = torch.empty(n, dtype=torch.uint8, device=dev)
    h2d = timeit(lambda: d1.copy_(host, non_blocking=True))
    d2h = timeit(lambda: host.copy_(d1, non_blocking=True))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def duplex_copies(work=lambda: None):
        """1 GiB host->device and 1 GiB device->host on two side streams, with `work` on the current stream."""
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            d1.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(d2, non_blocking=True)
        work()
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    duplex = timeit(duplex_copies)
    x = torch.randn(1, 64, 34, 512, 512, device=dev, dtype=torch.float16).to(memory_format=CL)
    w = torch.randn(64, 64, 3, 3, 3, device=dev, dtype=torch.float16).to(memory_format=CL)
    conv = lambda: [F.conv3d(x, w, padding=(0, 1, 1)) for _ in range(4)]  # noqa: E731
    conv_alone = timeit(conv)
    overlapped = lambda: duplex_copies(conv)  # noqa: E731

    emit({"what": "copy", "GiB": 1, "h2d_GBps": round(n / h2d / 1e9, 1), "d2h_GBps": round(n / d2h / 1e9, 1),
          "duplex_GBps_each": round(n / duplex / 1e9, 1), "conv4_alone_ms": round(conv_alone * 1e3, 1),
          "conv4_with_duplex_copies_ms": round(timeit(overlapped) * 1e3, 1),
          "duplex_alone_ms": round(duplex * 1e3, 1)})
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "primitives.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
