"""Our Triton kernels tested on CPU: `interpreted_kernels.py` runs in a subprocess under Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is imported, so not in this process). Skipped where triton is not
installed (or older than 3.9); CI installs triton 3.9.0 for this."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmaisi.nets import blocks


def test_fast_paths_stay_off_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 8, 2, 2, 2)
    with torch.no_grad():
        assert not blocks.fast_group_norm(x, torch.nn.GroupNorm(4, 8)) and not blocks.fast_bias_add(x)


def test_kernels_in_the_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"triton {triton.__version__}: the interpreter needs 3.9+ with numpy 2 (CI installs 3.9.0)")
    cases = Path(__file__).with_name("interpreted_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)], env=env,
                         cwd=cases.parent, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]
