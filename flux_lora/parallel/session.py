"""The process group: the one place that creates and destroys it, barriers, and shared decisions.

Without torchrun (no RANK/WORLD_SIZE in the environment) everything runs as world size 1 and no
process group is created; every helper here then degrades to a no-op, so stage code never asks
"am I distributed?".
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # ranks on this host

    @property
    def one_host(self) -> bool:
        return self.local_world_size >= self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment; world size 1 without it."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and os.environ.get("FLUX_LORA_CPU") != "1":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


_INFO: DistInfo | None = None


def info() -> DistInfo:
    return _INFO if _INFO is not None else env_dist_info()


@contextlib.contextmanager
def process_group(timeout_s: int = 600) -> Iterator[DistInfo]:
    """Init the process group (NCCL on CUDA, gloo on CPU) and always tear it down."""
    global _INFO
    di = env_dist_info()
    _end_with_the_launcher()
    if di.device.type == "cuda":
        torch.cuda.set_device(di.device)
    created = False
    if di.distributed and not dist.is_initialized():
        backend = "nccl" if di.device.type == "cuda" else "gloo"
        kwargs = {"device_id": di.device} if backend == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        # A restarted worker (torchrun --max-restarts) must not read the addresses its dead
        # predecessors left in the store: key this attempt's process group by the restart count.
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"flux_lora/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=di.rank, world_size=di.world_size, timeout=timeout, **kwargs)
        created = True
    _INFO = di
    failed = False
    try:
        yield di
    except BaseException:
        # peers may be mid-collective (or DDP still alive): a polite teardown can block forever;
        # the CLI exits the process at once instead, which closes the group's sockets
        failed = True
        raise
    finally:
        _INFO = None
        if created and dist.is_initialized() and not failed:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _end_with_the_launcher() -> None:
    """Under torchrun, a worker whose agent dies (SIGKILL, a lost node) gets SIGTERM, as if it were
    asked to stop, instead of training on as an orphan that holds the GPU (Linux prctl)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_sigterm(message: str) -> Iterator[None]:
    """While inside, SIGTERM (torchrun ending the other workers after one failed, scancel, a
    dying agent) raises StoppedError(message) where the stage is, so its events and notes are
    written on the way out instead of the process vanishing. Main thread only; restored after."""
    import signal
    import threading

    from flux_lora.errors import StoppedError

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StoppedError(message)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _active():
        if info().device.type == "cuda":
            dist.barrier(device_ids=[info().device.index])
        else:
            dist.barrier()


def gather_objects(obj: object) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's object on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Items this rank handles: rank, rank + world, rank + 2·world, ... (may be empty)."""
    return list(range(rank, n, world))


def main_then_share(fn):
    """Run fn() on rank 0 only and give its result to every rank; if it raises a FluxLoraError,
    every rank raises the same error (so no rank waits at a barrier for a rank that failed)."""
    from flux_lora import errors

    result, failure = None, None
    if info().is_main:
        try:
            result = fn()
        except errors.FluxLoraError as e:
            failure = (type(e).__name__, str(e))
    result, failure = broadcast_object((result, failure))
    if failure:
        err = getattr(errors, failure[0], errors.FluxLoraError)(failure[1])
        err.shared = True  # every rank raises it: only rank 0 needs to print it
        raise err
    return result


def all_sum_on_device(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks, leaving the result where it is (no host sync on CUDA)."""
    t = t.float() if t.device.type == "cuda" else t.double()
    if _active():
        dist.all_reduce(t)
    return t
