"""Python's garbage collector during training: full collections timed (GcPauses); start-up's objects
frozen before the first step and the warm-up's after it, so full collections skip them
(train.gc_freeze). On the CPU with the flux-shapes model, compiled, the warm-up's full collections
(the one before freezing included): 0.81 -> 0.28-0.36 s with a warm compile cache, 1.46 -> 0.98 s
cold; on one H200 they took 1.1 s warm and 2.9 s cold before."""

from __future__ import annotations

import contextlib
import gc
import time


class GcPauses:
    """Times Python's full (generation 2) garbage collections while installed: with dynamo's and
    inductor's millions of objects alive, one can stall a step, and in DDP every rank with it.
    `steady()` marks the end of the warm-up; the summary reports what came after it apart."""

    def __init__(self):
        self.pauses: list[float] = []
        self._t0, self._steady_from = None, None

    def _callback(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.pauses.append(time.perf_counter() - self._t0)
            self._t0 = None

    def steady(self) -> None:
        if self._steady_from is None:
            self._steady_from = len(self.pauses)

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    @staticmethod
    def _stats(pauses: list[float]) -> dict:
        return {"count": len(pauses), "total_s": round(sum(pauses), 3), "max_s": round(max(pauses, default=0.0), 3)}

    def summary(self) -> dict:
        out = self._stats(self.pauses)
        if self._steady_from is not None:
            out["after_warmup"] = self._stats(self.pauses[self._steady_from:])
        return out


WARMUP_STEPS = 3  # compile + CUDA-graph warm-up, graph recording, DDP's bucket rebuild: all done by then


@contextlib.contextmanager
def frozen_gc_after_warmup(enabled: bool, first_step: int):
    """Freezes start-up's objects at once, then yields `after_step(step)`: at the end of the warm-up
    it collects Python's garbage once and freezes the survivors (gc.freeze), the way servers freeze
    after start-up. A full collection then scans only objects made since, not the millions compile
    left alive, so it no longer stalls a step. Unfrozen on exit: a process that trains again must
    be able to free this run."""
    state = {"frozen": False}
    if enabled:
        # what start-up built (the libraries' modules, the model) lives to the end: frozen now, the
        # warm-up's full collections scan only what compiling makes, not those too. Collected first:
        # start-up's cyclic garbage (it may hold tensors) must not be kept for the whole run
        gc.collect()
        gc.freeze()

    def after_step(step: int) -> bool:
        """True once the warm-up is over."""
        warm = step >= first_step + WARMUP_STEPS
        if enabled and warm and not state["frozen"]:
            gc.collect()
            gc.freeze()
            state["frozen"] = True
        return warm

    try:
        yield after_step
    finally:
        if enabled:
            gc.unfreeze()
