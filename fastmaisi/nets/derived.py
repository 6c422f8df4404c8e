"""Tensors derived from a conv's weight (the upsample convs' transposed-conv weight, thin_conv's packed weight):
recomputed at every call, except inside `reuse_derived_weights(*nets)`, where each is computed once and reused.

Why explicit: no cheap key notices every way a weight changes (`.data` updates such as EMA bypass version counters,
in-place numpy writes bypass them too, and tensors made under `torch.inference_mode()` have none), so an implicit
cache can go stale. Inside the block the caller promises that the networks' weights do not change; the cache lives
in this module, not on the networks (pickling, `torch.save` and `copy.deepcopy` never see it), and is dropped on
exit. The pipelines enter the block around each sampling loop and each decode.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

_STORES: dict[int, dict] = {}  # id(module) -> {key: tensor}, only for modules inside an active block


@contextmanager
def reuse_derived_weights(*nets: torch.nn.Module | None):
    """Within the block, each conv of `nets` computes its weight-derived tensors once. Do not change the networks'
    weights inside it (or call it again after doing so). Nested blocks over the same networks share one cache."""
    held, added = [], []
    for net in nets:
        if net is None:
            continue
        for module in net.modules():
            if id(module) not in _STORES:
                _STORES[id(module)] = {}
                added.append(id(module))
                held.append(module)  # keeps the id from being reused by another object while the block is open
    try:
        yield
    finally:
        for key in added:
            _STORES.pop(key, None)
        del held


def derived_weight(module: torch.nn.Module, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()`, reused for the same (module, key) inside a `reuse_derived_weights` block over the module."""
    store = _STORES.get(id(module))
    if store is None:
        return make()
    w = module.weight
    full_key = (key, w.dtype, w.device, w.data_ptr())
    value = store.get(full_key)
    if value is None:
        value = store[full_key] = make()
    return value
