"""Mean GPU time of a call, by CUDA events, for the kernel-level benchmarks (one warm-up call first)."""

import torch


def event_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of `fn`, averaged over `reps` back-to-back calls after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
