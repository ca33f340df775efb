"""train.deterministic: the GPU kernels that make two runs (or a run and its resume) round apart,
swapped for deterministic ones, so the same run gives the same bits every time.

On the CPU a run is bit-identical already (the test suite checks it). On a GPU three things are
not (scripts/determinism_probe.py, bench/README.md):
- the attention backward: cuDNN's and flash's accumulate dQ with atomics, in whatever order the
  thread blocks finish. torch has no deterministic path for cuDNN's; flash has one, taken under
  torch.use_deterministic_algorithms (strict, not warn_only), which also keeps the
  memory-efficient kernel's backward unsplit;
- inductor times some of its kernels' configurations when a process first runs them and keeps
  the fastest; for a reduction the configuration is the summation order, so two processes may
  round differently. Its deterministic mode chooses by shape alone;
- cuBLAS picks its workspace per stream unless CUBLAS_WORKSPACE_CONFIG fixes it.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what torch asks for under deterministic algorithms (CUDA ≥ 10.2)
_applied = False  # whether apply(True) set torch's global switches (so apply(False) puts them back)


def apply(on: bool) -> None:
    """Make this process's kernels deterministic (`on`), or undo what an earlier apply(True) did.
    Call before the first matmul and the first compile: cuBLAS reads its workspace setting when it
    starts, inductor its mode when it compiles."""
    global _applied
    if not on and not _applied:
        return
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # strict: under warn_only torch keeps flash's and the memory-efficient kernel's split backward
    # (measured: 59 of 68 LoRA gradients still differed). No op of a training step lacks a
    # deterministic kernel; one that did would stop the run at its first call, naming itself.
    torch.use_deterministic_algorithms(on)
    # the NaN fill of every new tensor that comes with it guards against reading memory before
    # writing it, which no kernel here does; it would cost a kernel per allocation
    torch.utils.deterministic.fill_uninitialized_memory = not on
    torch.backends.cudnn.deterministic = on
    import torch._inductor.config as inductor

    if hasattr(inductor, "deterministic"):  # torch ≥ 2.10
        inductor.deterministic = on
    _applied = on
