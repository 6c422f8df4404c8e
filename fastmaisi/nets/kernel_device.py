"""Where our Triton kernels run: on CUDA tensors, and on CPU tensors when Triton's interpreter is on
(`TRITON_INTERPRET=1`: numpy speed, for testing the kernels' arithmetic without a GPU, as CI does). Triton fixes
the mode when it is imported, so the variable must be set before (tests/test_triton_interpreted.py starts a
process for that); unsetting it later only sends CPU tensors back to the plain torch paths."""

import os
from collections.abc import Callable
from typing import Any

import torch


def interpreting() -> bool:
    """Whether Triton kernels built now run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_run_on(x: torch.Tensor) -> bool:
    """Whether the fast paths may launch our Triton kernels on x: CUDA, or CPU under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


def lazy_kernels(build: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    """A getter that runs `build(triton, triton.language)` on first use and returns its result from then on; None
    (remembered) where triton is not installed, so callers fall back to PyTorch."""
    cache: dict = {}

    def get():
        if "kernels" not in cache:
            try:
                import triton
                import triton.language as tl
            except ImportError:
                cache["kernels"] = None
            else:
                cache["kernels"] = build(triton, tl)
        return cache["kernels"]

    return get
