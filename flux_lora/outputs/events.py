"""Events of a run: JSON lines (file, and stdout with --json) and a progress display on stderr.

Event schema (version EVENT_VERSION), one JSON object per line, flushed as written:
    {"v": 1, "event": KIND, "stage": "train"|"preprocess", "time": UNIX_SECONDS, ...fields}
KIND is start, progress, checkpoint, sample, warning, error or done; README lists the fields.
Other ranks get a NullReporter, so stage code calls the reporter unconditionally.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flux_lora.errors import FluxLoraError, RankFailedError, StoppedError
from flux_lora.outputs import files, run_dir
from flux_lora.parallel import session
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
        self.trackers = None  # outputs.trackers.Trackers: TensorBoard/wandb, fed every event
        self.lock = threading.RLock()  # preprocess reports from its chunk-writer thread too

    def emit(self, kind: str, **fields: Any) -> dict:
        ev = _clean({"v": EVENT_VERSION, "event": kind, "stage": self.stage, "time": round(time.time(), 3), **fields})
        line = json.dumps(ev, separators=(",", ":"))
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            if self.json_stdout:
                print(line, flush=True)
            if self.trackers is not None:
                self.trackers.write(ev)
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
        if self.trackers is not None:
            self.trackers.close()
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


def _looks_like_a_lost_peer(error: BaseException) -> bool:
    """A collective that broke because another rank went away (gloo/NCCL), not this rank's own fault."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        k in text for k in ("Connection closed by peer", "Connection reset", "Broken pipe", "gloo", "NCCL", "ProcessGroup"))


def _stop_inside(error: BaseException) -> StoppedError | None:
    """A StoppedError (SIGTERM's, from session.stop_on_sigterm) that some library turned into its own
    error on the way out, e.g. diffusers' lazy import ("Failed to import ... because of ...")."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StoppedError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _raise_if_a_peer_failed(reporter, folder: Path, run_id: str, rank: int) -> None:
    """Another rank's own cause, if it left one: reported as this run's error, exit 5."""
    peer = run_dir.peer_failure(folder, run_id, rank)
    if peer is not None:
        failed = RankFailedError(f"rank {peer['rank']} failed: {peer['type']}: {peer['message']}")
        reporter.error(str(failed), rank=peer["rank"], exit_code=failed.exit_code)
        raise failed from None


@contextlib.contextmanager
def ending_the_stream(reporter, rank: int, distributed: bool, folder: Path, run_id: str):
    """Whatever ends a stage, its events end with `done` (the stage's own), `stopped` or `error`,
    the error naming the rank and its own cause. A rank that fails leaves a note; a rank whose
    collective broke because a peer went away reports that peer's note and exits 5."""
    try:
        yield
    except StoppedError as e:
        # a stop all ranks agreed on is a stop; one that hit this rank alone (SIGTERM from torchrun
        # after another worker failed) may be that failure's echo
        if distributed and not getattr(e, "shared", False):
            _raise_if_a_peer_failed(reporter, folder, run_id, rank)
        reporter.emit("stopped", message=str(e), exit_code=e.exit_code)
        raise
    except FluxLoraError as e:
        if not getattr(e, "shared", False):  # an error all ranks raised together needs no note
            run_dir.note_failure(folder, run_id, rank, e)
        reporter.error(str(e), rank=rank, exit_code=e.exit_code)
        raise
    except BaseException as e:  # a crash, a broken collective, Ctrl-C
        stop = _stop_inside(e)
        if stop is not None:  # our SIGTERM stop, re-raised as another error by code it interrupted
            if distributed:
                _raise_if_a_peer_failed(reporter, folder, run_id, rank)
            reporter.emit("stopped", message=str(stop), exit_code=stop.exit_code)
            raise stop from None
        if distributed and _looks_like_a_lost_peer(e):
            _raise_if_a_peer_failed(reporter, folder, run_id, rank)
        run_dir.note_failure(folder, run_id, rank, e)
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        reporter.error(f"rank {rank}: {type(e).__name__}: {first}".rstrip(": "), rank=rank,
                       exit_code=3 if isinstance(e, KeyboardInterrupt) else 1)
        raise


@contextlib.contextmanager
def holding(folder: Path, kind: str, flag: str, overwrite: bool, stage: str, json_stdout: bool = False,
            log_every: int = 10):
    """A stage's hold on its directory, the same for preprocess (the cache) and train (the output):
    claimed (never someone else's folder), locked (one run at a time), cleared with --overwrite
    (only our files), the events opened; yields the reporter. On the way out the events end with
    done, stopped or error, and the lock is released. Every rank enters; rank 0 does the writing."""
    di = session.info()
    session.main_then_share(lambda: run_dir.claim(folder, kind, flag))
    lock = run_dir.take_lock(folder, flag)  # before anything is removed or written
    try:
        run_id = session.main_then_share(lambda: run_dir.start_fresh(folder, kind, overwrite))
        reporter = make_reporter(di.rank, folder / "events.jsonl", stage, json_stdout, log_every)
        try:
            with ending_the_stream(reporter, di.rank, di.distributed, folder, run_id):
                yield reporter
        finally:
            reporter.close()
    finally:
        if lock is not None:
            lock.release()
