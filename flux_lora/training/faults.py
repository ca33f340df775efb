"""Fault injection for the resilience tests (and for rehearsing a cluster's failure handling).

    FLUX_LORA_FAULT="kill@5"        every rank SIGKILLs itself after step 5
    FLUX_LORA_FAULT="kill@5:1"      only rank 1
    FLUX_LORA_FAULT="raise@3:1"     rank 1 raises RuntimeError during step 3
    FLUX_LORA_FAULT="nan@2-4"       the loss is NaN on steps 2..4 (all ranks)
    FLUX_LORA_FAULT="enospc@4"      writing the checkpoint of step 4 fails with "No space left"
Several faults are separated by commas. Faults fire only in a first attempt (torchrun's
TORCHELASTIC_RESTART_COUNT is 0), so a restarted worker runs clean. Unset: no effect at all.
"""

from __future__ import annotations

import errno
import os
import signal


def _active(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("FLUX_LORA_FAULT", "")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    for item in spec.split(","):
        name, _, where = item.strip().partition("@")
        if name != kind or not where:
            continue
        steps, _, ranks = where.partition(":")
        lo, _, hi = steps.partition("-")
        if int(lo) <= step <= int(hi or lo) and (not ranks or int(ranks) == rank):
            return True
    return False


def after_step(step: int, rank: int) -> None:
    if _active("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def during_step(step: int, rank: int) -> None:
    if _active("raise", step, rank):
        raise RuntimeError(f"injected failure at step {step}")


def loss_is_nan(step: int, rank: int) -> bool:
    return _active("nan", step, rank)


def before_checkpoint_write(step: int) -> None:
    if _active("enospc", step, 0):
        raise OSError(errno.ENOSPC, "No space left on device")
