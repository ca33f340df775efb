"""Running figures of a training run: samples/s and ETA for progress events, and the done event's
start-up timings (time to first step, set-up, garbage-collection pauses)."""

from __future__ import annotations

import math
import os
import time

import torch

from flux_lora.fast.gc_freeze import GcPauses


def process_started_at() -> float | None:
    """Unix time this process started (Linux /proc; within a second), or None elsewhere: the time
    to first step a user waits includes Python's and torch's imports, which run before any timer."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class Phases:
    """Host seconds of set-up's phases, in order, for the done event: where a start's time goes.
    GPU work a phase queues without waiting shows in the next phase that waits for it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """The phase `name` ends now (a name marked twice adds up)."""
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


def step_timings(t_start: float, setup_s: float, first_step_s: float | None, pauses: GcPauses,
                 marks: dict | None = None, phases: dict | None = None) -> dict:
    """The done event's timing fields (seconds from t_start unless named otherwise). `marks`: when
    train's run() was entered (imports done) and when its process group was up (unix times);
    `phases`: set-up's own phases (Phases.seconds)."""
    out = {"time_to_first_step_s": first_step_s, "setup_s": setup_s, "setup_phases_s": phases or {},
           "gc_full_collections": pauses.summary(), "compile": compile_summary()}
    started = process_started_at()
    if started is not None and first_step_s is not None:
        out["first_step_since_process_start_s"] = first_step_s + t_start - started
        if marks:
            out["before_setup_s"] = {"imports": round(marks["entered"] - started, 2),
                                     "process_group": round(marks["process_group"] - marks["entered"], 2),
                                     "resume_check": round(t_start - marks["process_group"], 2)}
    return out


def compile_summary(least_s: float = 0.3) -> dict:
    """Where this process's torch.compile time went, from torch's own timers (summed over every
    compile; phases nest, e.g. inductor inside the backend inside dynamo's total) and which on-disk
    caches hit: the done event's account of the time to first step beyond set-up."""
    try:
        from torch._dynamo.utils import compile_times, counters
        names, values = compile_times(repr="csv", aggregate=True)
    except (ImportError, ValueError, TypeError):  # a torch without these metrics
        return {}
    seconds = {name: round(float(v), 2) for name, v in zip(names, values) if float(v) >= least_s}
    hits = {k: v for group in ("inductor", "aot_autograd") for k, v in counters[group].items() if "cache" in k}
    return {"seconds": seconds, "caches": hits} if seconds or hits else {}


class Meter:
    """Running figures for progress events (loss averaged over ranks, samples/s, ETA).
    samples_per_s counts all the time since the first step (previews, validation and checkpoints
    included): the rate the run's end comes at, which the ETA uses; training_samples_per_s counts
    the training steps alone."""

    def __init__(self, total: int, start: int, global_batch: int):
        self.total, self.global_batch = total, global_batch
        self.t0, self.sum, self.n, self.avg_loss = time.time(), 0.0, 0, float("nan")
        self.t_first, self.step_first = None, start
        self.outputs_s = 0.0  # spent on previews, validation and checkpoints since the first step

    def exclude(self, seconds: float) -> None:
        """Time that was not training (periodic outputs), left out of training_samples_per_s."""
        if self.t_first is not None:
            self.outputs_s += seconds

    def update(self, step: int, loss: float, lr: float) -> dict:
        now = time.time()
        if math.isfinite(loss):
            self.sum, self.n = self.sum + loss, self.n + 1
            self.avg_loss = self.sum / self.n
        if self.t_first is None:  # the first step includes compile/warm-up: rates count from its end
            self.t_first, self.step_first = now, step
        done, dt = step - self.step_first, now - self.t_first
        steps_s = done / dt if done and dt > 0 else 0.0
        training_s = dt - self.outputs_s
        out = {"step": step, "total_steps": self.total, "progress": step / self.total, "loss": loss,
               "avg_loss": self.avg_loss, "learning_rate": lr, "samples_per_s": steps_s * self.global_batch,
               "training_samples_per_s": done / training_s * self.global_batch if done and training_s > 0 else 0.0,
               "eta_s": (self.total - step) / steps_s if steps_s else None, "elapsed_s": now - self.t0}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # no sync: a host-side counter
        return out
