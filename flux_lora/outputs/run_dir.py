"""A run's directory (an output or a cache): whether flux_lora made it (a marker), which of its
files are ours (the only ones --overwrite removes), the lock that keeps a second run out, and the
notes failing ranks leave so rank 0 can report the real cause.

    DIR/.flux_lora             marker: {"kind": "output"|"cache"}; a folder without it is never emptied
    DIR/.flux_lora.lock        {host, pid, job, started}: held while a run writes; refreshed every
                               HEARTBEAT_S, stale when its process is gone (same host) or silent
                               for STALE_S (another host), or when the same job restarts
    DIR/.flux_lora-failures/RUN/rank-R.json   a failing rank's own error, for rank 0's event
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from flux_lora.errors import FluxLoraError
from flux_lora.outputs import files
from flux_lora.parallel import session

MARKER = ".flux_lora"
LOCK = ".flux_lora.lock"
FAILURES = ".flux_lora-failures"
HEARTBEAT_S = 15
STALE_S = 90

# What each kind of run writes; --overwrite removes these names and nothing else.
OURS = {
    "output": ["events.jsonl", "config.yaml", "loss.png", "lora.safetensors", "lora-kohya.safetensors", "model-card.md",
               "lora-ema.safetensors", "tensorboard", "wandb",
               "lora-step-*.safetensors", "best.safetensors", "checkpoints/step-*", "checkpoints/.step-*.tmp",
               "samples/step-*.png", FAILURES],
    "cache": ["events.jsonl", "config.yaml", "settings.json", "manifest.json", "captions.jsonl", "samples.pt", "empty_prompt.pt",
              "shards/rank-*", "shards/res-*", "progress/rank-*", "download/*", "extracted", ".extracted.tmp", "dataset-*", FAILURES],
}
MADE_BY = {"output": "a training output (train wrote it)", "cache": "a cache (preprocess wrote it; train reads it)"}
_BOOKKEEPING = {MARKER, LOCK}
_CONTAINERS = ("checkpoints", "samples", "shards", "progress", "download")  # looked into, entry by entry


class DirectoryError(FluxLoraError):
    """A directory that is not ours to write or to empty, or that another run holds."""


def _ours(kind: str, rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in OURS[kind])


def _entries(folder: Path) -> list[str]:
    """Top-level names, and for the folders our patterns look into, their entries as DIR/NAME."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.name in _BOOKKEEPING:
            continue
        if entry.is_dir() and not entry.is_symlink() and entry.name in _CONTAINERS:
            out += [f"{entry.name}/{sub.name}" for sub in sorted(entry.iterdir())]  # an empty one: nothing to say
        else:
            out.append(entry.name)
    return out


def claim(folder: Path, kind: str, flag: str) -> None:
    """Make folder ours to write: create it with the marker; adopt an existing folder that holds
    only files of ours (a run from before markers); accept a folder of someone else's files as long
    as none of them has a name this run writes. `flag` names the option in the messages."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DirectoryError(f"{flag} {folder} is a file, not a directory; pass a directory")
    try:
        files.check_writable(folder)
    except OSError as e:
        raise DirectoryError(f"{flag} {folder} is not writable ({e.strerror or e}); choose another {flag}") from None
    if (folder / MARKER).is_file():
        made_by = (files.read_json(folder / MARKER) or {}).get("kind", kind)
        if made_by != kind:  # a cache and an output share file names (config.yaml, events.jsonl)
            raise DirectoryError(f"{flag} {folder} is {MADE_BY.get(made_by, 'another kind of flux_lora folder')}; "
                                 f"its files would be replaced: choose another {flag}")
        return
    entries = _entries(folder)
    clashes = [rel for rel in entries if _ours(kind, rel)]
    foreign = [rel for rel in entries if rel not in clashes]
    if clashes and foreign:
        raise DirectoryError(f"{flag} {folder} holds files flux_lora did not write (e.g. {foreign[0]}) beside "
                             f"{clashes[0]}, which this run would replace; choose an empty or new {flag}")
    files.write_atomic(folder / MARKER, {"kind": kind, "created": time.time()}, as_json=True, every_rank=True)


def remove_ours(folder: Path, kind: str) -> list[str]:
    """--overwrite: delete what runs of ours wrote in folder (by name), never anything else, and
    only in a folder with our marker. Returns what was removed."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        return []
    removed = []
    for rel in _entries(folder):
        path = folder / rel
        if _ours(kind, rel):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(rel)
    for container in _CONTAINERS:  # our folders, once empty
        if (folder / container).is_dir() and not any((folder / container).iterdir()):
            (folder / container).rmdir()
    return removed


def start_fresh(folder: Path, kind: str, overwrite: bool) -> str:
    """Rank 0, holding the lock: with --overwrite remove what earlier runs of ours wrote (by name),
    drop old failure notes. Returns this run's id (where failing ranks leave their notes)."""
    if overwrite:
        remove_ours(folder, kind)
    run_id = f"{time.time_ns()}"
    clear_failures(folder, keep=run_id)
    return run_id


# ---------------------------------------------------------------- the lock

def _job() -> str:
    """What identifies this job across its restarts: SLURM's job id, else torchrun's run id."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_state(folder: Path) -> str:
    """held, stale or absent."""
    path = Path(folder) / LOCK
    holder = files.read_json(path)
    if holder is None:
        if not path.exists():
            return "absent"
        young = time.time() - path.stat().st_mtime < 5  # being written by its taker right now
        return "held" if young else "stale"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
        return "stale"
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return "absent"
    return "stale" if age > STALE_S else "held"


class Lock:
    """Held by one process (rank 0) while a run writes the folder; released on exit, taken over
    when stale. A heartbeat thread refreshes it, so a run killed on another host frees it."""

    def __init__(self, folder: Path, what: str):
        self.path, self.what = Path(folder) / LOCK, what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = files.read_json(self.path) or {}
                same_job = bool(me["job"]) and holder.get("job") == me["job"]
                if same_job or lock_state(self.path.parent) == "stale":
                    self.path.unlink(missing_ok=True)  # a dead run's lock, or this job's previous attempt
                    continue
                raise DirectoryError(
                    f"{self.what} {self.path.parent} is in use by another flux_lora run (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, since {time.strftime('%H:%M:%S', time.localtime(holder.get('started', 0)))}); "
                    f"wait for it or stop it, or use another {self.what} (a lock silent for {STALE_S} s is taken over)") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="flux-lora-lock")
            self._thread.start()
            return self
        raise DirectoryError(f"cannot take the lock {self.path}; another run is taking it at the same moment")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        holder = files.read_json(self.path) or {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def take_lock(folder: Path, what: str) -> "Lock | None":
    """Every rank calls it; rank 0 takes the lock (and returns it), a refusal is raised on every rank."""
    held: list[Lock] = []
    session.main_then_share(lambda: held.append(Lock(folder, what).acquire()))
    return held[0] if held else None


# ---------------------------------------------------------------- failing ranks

def note_failure(folder: Path, run_id: str, rank: int, error: BaseException) -> None:
    """A failing rank's own cause, where rank 0 can read it (peers only see a broken connection)."""
    message = str(error).strip().splitlines()[0][:400] if str(error).strip() else ""
    try:
        files.write_atomic(Path(folder) / FAILURES / run_id / f"rank-{rank:05d}.json",
                           {"rank": rank, "type": type(error).__name__, "message": message,
                            "exit_code": getattr(error, "exit_code", 1)}, as_json=True, every_rank=True)
    except OSError:
        pass  # the cause still reaches this rank's stderr


def peer_failure(folder: Path, run_id: str, me: int, wait_s: float = 3.0) -> dict | None:
    """The first other rank's failure note of this run, waiting briefly for it to be written."""
    deadline = time.time() + wait_s
    notes = Path(folder) / FAILURES / run_id
    while True:
        for path in sorted(notes.glob("rank-*.json")) if notes.is_dir() else []:
            note = files.read_json(path)
            if note and note.get("rank") != me:
                return note
        if time.time() >= deadline:
            return None
        time.sleep(0.2)


def clear_failures(folder: Path, keep: str) -> None:
    """Rank 0 at a run's start: notes of earlier runs go."""
    root = Path(folder) / FAILURES
    if root.is_dir():
        for old in root.iterdir():
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
