"""Events of a run: JSON lines (file, and stdout with --json) and a progress display on stderr.

Event schema (version EVENT_VERSION), one JSON object per line, flushed as written:
    {"v": 1, "event": KIND, "stage": "train"|"preprocess", "time": UNIX_SECONDS, ...fields}
KIND is start, progress, checkpoint, sample, warning, error or done; README lists the fields.
Other ranks get a NullReporter, so stage code calls the reporter unconditionally.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flux_lora.outputs import files
from flux_lora.outputs.display import Display

EVENT_VERSION = 1


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; consumers see null
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Reporter:
    """Writes events for one stage; the only writer of events.jsonl (rank 0)."""

    def __init__(self, events_path: Path, stage: str, json_stdout: bool = False, log_every: int = 10):
        self.path, self.stage, self.json_stdout, self.log_every = events_path, stage, json_stdout, log_every
        self.file = files.open_append(events_path)
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


def make_reporter(rank: int, events_path: Path, stage: str, json_stdout: bool = False, log_every: int = 10):
    """The Reporter on the rank that writes the run's files (rank 0), a NullReporter elsewhere."""
    return Reporter(events_path, stage, json_stdout, log_every) if files.writes_here() else NullReporter(rank)
