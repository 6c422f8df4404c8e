"""Exact, memory-bounded VAE decode/encode, its planner, and MONAI's sliding-window decode for reference runs.

`decode_latent(vae, z)` returns the same tensor as `vae.decode(z)` on the whole volume (whole-volume GroupNorm
statistics, no seams), while the device memory it uses stays under a budget. `encode_image` does the same for
`vae.encode`. `decode_latent_sliding_window` instead reproduces the reference MAISI pipeline (MONAI
`SlidingWindowInferer`, per-window GroupNorm statistics, Gaussian blending), for bit-level comparisons with it.

How the exact path works (the design, and why):
- The network is compiled into a short program of ops, one per conv: `y = conv(act(GN(x))) [+ shortcut(res)]`,
  where the conv is a stride-1 conv, trilinear x2 + conv, a transposed conv, or a pad-end stride-2 conv. A ResBlock
  is two ops.
- Every op computes its output slab by slab along D, the first spatial axis. A slab reads only the input rows it
  needs (one halo row each side for k3 convs; one extra input row each side for trilinear x2, whose clamped end rows
  then come out exactly as align_corners=False gives them; 2r+1 rows for the pad-end stride-2 conv; r/2+1 rows for
  the transposed conv), zero-pads only at the true ends of the volume, and convolves with no padding along D, so
  every cut is exact and no output row is computed twice.
- GroupNorm needs statistics over the whole volume. While an op produces an activation that a GroupNorm reads, it
  accumulates per-(sample, group) count/mean/M2 of each slab (fp32 two-pass within the slab, merged across slabs
  in fp64 with Chan et al.'s parallel formula): the statistics pass is fused into the producer. The consumer then
  normalises each slab with `x * (w * rstd) + (b - mean * w * rstd)`, the expression PyTorch's own GroupNorm kernel
  uses, in fp32. On CUDA the statistics, the normalisation (+SiLU) and the trilinear x2 (only the rows a slab's conv
  reads) are one Triton pass each (`nets.fused_ops`), and convs run without their bias, which goes in afterwards with
  one Triton pass (together with the residual when there is one; cuDNN adds a bias with a broadcast kernel at about
  a quarter of the memory bandwidth); on CPU they are plain torch.
- Each activation lives in one preallocated tensor (outputs are written slab by slab into it: no list of tiles, no
  `torch.cat`), placed by the planner: on the device; in page-locked host memory (pageable memory faulted in on all
  threads, then registered with CUDA, kept in a pool for reuse), with its first rows on the device when the budget
  has room; or nowhere: recomputed, slab by slab, from its producer's inputs whenever it is read. Recomputations
  chain (an activation recomputed from another recomputed one) and are memoised through the pass, so an activation
  read as input and as residual is computed once, and the next slab computes only the rows past the previous one's
  (the convs' halo rows are kept, not recomputed). A residual's 1x1 shortcut applied to a recomputed, linear
  producer (MAISI's upsample output) is folded into that producer's conv: one conv with fewer output channels
  instead of two. On CUDA tensors are channels_last_3d, cuDNN's fast layout, in which a one-sample slab of D rows is
  one contiguous block; host copies run on two side streams (`_Copier`): the next slab's host rows are fetched
  while the current one computes (only the rows past the current slab's: its halo rows are copied on the device, so
  each host row crosses PCIe once per pass), written rows go back while the next computes, and the host stays at
  most two slabs ahead of the device.
- The planner prices a placement with rates measured on an H200 (`bench/bench_primitives.py`: conv FLOP/s by
  channel count and slab size, ~48 GB/s each way for page-locked copies, elementwise bandwidth), each pass costing
  the slower of its convs and its copies, plus a fixed cost per op and slab. It starts from a few simple placements
  (everything on the device; the largest activations moved off one by one, recomputed or to the host) and, from
  each of the three best, changes one activation, or the cap on slab size (2-16 M voxels), at a time while the
  estimate falls; host slots then get
  device rows from the budget left over, and each pass's slabs widen into what is still free at its op. Plans whose
  host stores would page-lock more than the host can spare (4/5 of its available memory) are left out. Low-
  resolution levels thus stay whole on the device. When tiling is needed and B > 1, samples run one at a time
  (GroupNorm is per sample, so this is exact). Plans are remembered per network, shape and budget (the search takes
  0.3-0.9 s at 512^3). On CUDA it fills 95 % of the budget (`bench/trace_decode.py` compares each op's measured peak
  and time with its estimate; cuDNN took no workspace for these convs on an H200).

The budget counts the device memory for activations and per-slab temporaries; the network's weights (already
resident) are not counted. On CPU, activations live in RAM either way and the budget bounds the per-slab working
set; with no budget the CPU path runs `vae.decode` / `vae.encode` themselves.

Modules, each importing only those above it:
    program.py          the network as a program of ops, op shapes and input rows
    host_memory.py      the page-locked host buffer pool (`free_host_memory`)
    plan.py             the planner: `DecodePlan`, `plan_decode`, `plan_encode`, the plan cache
    execute.py          the executor: slab passes, host stores and copies, recomputation (`TRACE` for benchmarks)
    split.py            the decode split along D over several devices or a process group (`decode_latent_split`,
                        `plan_split`): bands of rows per part, halo rows exchanged, GroupNorm statistics merged
    exact.py            `decode_latent`, `encode_image`
    sliding_window.py   `decode_latent_sliding_window`, `importance_map`
"""

from fastmaisi.decode.exact import decode_latent, encode_image
from fastmaisi.decode.execute import (  # noqa: F401  (internals: tests and benchmarks)
    _Copier, _execute, _Run, _Store, tqdm)
from fastmaisi.decode.host_memory import free_host_memory
from fastmaisi.decode.plan import (  # noqa: F401
    GPU, HOST, RECOMPUTE, DecodePlan, _fusable, _lifetimes, _live, _make_plan, _max_in_rows, _Planner, _PLAN_FRACTION,
    _PLANS, _SLAB_CAPS, _vae_for_plan, format_seconds, plan_decode, plan_encode)
from fastmaisi.decode.program import _compile, _shapes  # noqa: F401
from fastmaisi.decode.sliding_window import decode_latent_sliding_window, importance_map
from fastmaisi.decode.split import SplitPlan, decode_latent_split, plan_split

__all__ = ["DecodePlan", "GPU", "HOST", "RECOMPUTE", "SplitPlan", "decode_latent", "decode_latent_sliding_window",
           "decode_latent_split", "encode_image", "format_seconds", "free_host_memory", "importance_map", "plan_decode",
           "plan_encode", "plan_split"]
