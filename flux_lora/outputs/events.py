"""Rank-0 output: JSON-lines events (file, and stdout with --json) and a progress display on stderr.

Event schema (version EVENT_VERSION), one JSON object per line, flushed as written:
    {"v": 1, "event": KIND, "stage": "train"|"preprocess", "time": UNIX_SECONDS, ...fields}
KIND is start, progress, checkpoint, sample, warning, error or done; README lists the fields.
Other ranks get a NullReporter, so stage code calls the reporter unconditionally.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

EVENT_VERSION = 1


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; consumers see null
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


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


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_line(ev: dict) -> str:
    """One human line for a progress event (used by the plain display and by `watch`)."""
    if ev.get("stage") == "preprocess":
        return (f"preprocess {ev.get('done', 0)}/{ev.get('total', '?')}  {ev.get('items_per_s') or 0:.1f} img/s  "
                f"eta {format_duration(ev.get('eta_s'))}")
    loss = ev.get("loss")
    loss_s = f"{loss:.4f}" if isinstance(loss, (int, float)) else "nan"
    avg = ev.get("avg_loss")
    avg_s = f"{avg:.4f}" if isinstance(avg, (int, float)) else "nan"
    return (f"step {ev.get('step')}/{ev.get('total_steps')}  loss {loss_s} (avg {avg_s})  "
            f"lr {ev.get('learning_rate', 0):.2e}  {ev.get('samples_per_s', 0):.2f} samples/s  "
            f"eta {format_duration(ev.get('eta_s'))}")


class Display:
    """A rich progress bar when stderr is a terminal, else one plain line every `every` updates."""

    def __init__(self, total: int, description: str, every: int = 10, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.every, self.count, self.total = max(1, every), 0, total
        self.progress = None
        if self.stream.isatty() and os.environ.get("FLUX_LORA_PLAIN") != "1":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=Console(file=self.stream), transient=False)
            self.task = self.progress.add_task(description, total=total, info="")
            self.progress.start()

    def update(self, done: int, ev: dict) -> None:
        self.count += 1
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=progress_line(ev).split("  ", 1)[-1])
        elif self.count % self.every == 0 or done >= self.total:
            print(progress_line(ev), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class Reporter:
    """Writes events for one stage; the only writer of events.jsonl (rank 0)."""

    def __init__(self, events_path: Path, stage: str, json_stdout: bool = False, log_every: int = 10):
        events_path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.stage, self.json_stdout, self.log_every = events_path, stage, json_stdout, log_every
        self.file = open(events_path, "a", encoding="utf-8")
        self.display: Display | None = None
        self.lock = threading.RLock()  # preprocess reports from its chunk-writer thread too

    def emit(self, kind: str, **fields: Any) -> dict:
        ev = _clean({"v": EVENT_VERSION, "event": kind, "stage": self.stage, "time": round(time.time(), 3), **fields})
        line = json.dumps(ev, separators=(",", ":"))
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            if self.json_stdout:
                print(line, flush=True)
        return ev

    def start(self, total: int, description: str, **fields: Any) -> None:
        self.emit("start", **fields)
        self.display = Display(total, description, self.log_every)

    def progress(self, position: int, **fields: Any) -> None:
        with self.lock:
            ev = self.emit("progress", **fields)
            if self.display:
                self.display.update(position, ev)

    def info(self, text: str) -> None:
        (self.display.message if self.display else lambda t: print(t, file=sys.stderr, flush=True))(text)

    def warning(self, text: str, **fields: Any) -> None:
        self.emit("warning", message=text, **fields)
        self.info(f"warning: {text}")

    def error(self, text: str, **fields: Any) -> None:
        self.emit("error", message=text, **fields)

    def done(self, **fields: Any) -> None:
        if self.display:
            self.display.close()
        self.emit("done", **fields)

    def close(self) -> None:
        if self.display:
            self.display.close()
        self.file.close()


class NullReporter:
    """What non-zero ranks get: warnings still reach stderr (tagged with the rank), nothing else."""

    def __init__(self, rank: int):
        self.rank = rank

    def warning(self, text: str, **fields: Any) -> None:
        print(f"rank {self.rank}: warning: {text}", file=sys.stderr, flush=True)

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def make_reporter(is_main: bool, rank: int, events_path: Path, stage: str, json_stdout: bool = False,
                  log_every: int = 10):
    return Reporter(events_path, stage, json_stdout, log_every) if is_main else NullReporter(rank)
