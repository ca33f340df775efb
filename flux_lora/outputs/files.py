"""The one way the package writes an output file: atomically, and only on the rank that should.

    write_atomic(path, b"...")                       rank 0 writes; other ranks return None
    write_atomic(path, obj_to_json, as_json=True)     JSON, indented
    write_atomic(path, lambda f: torch.save(x, f))    a library that writes to a file object
    write_atomic(path, data, every_rank=True)         a rank's own file (cache shards, progress)
    commit_dir(final, build)                          a directory of files, renamed into place whole

A write goes to a temp name in the same directory, is flushed and fsynced, then `os.replace`d over
the target: a crash, a full disk or an exception mid-write leaves the previous file (or none),
never half of one, and no temp file behind. Files keep the user's umask permissions (0644 for most
users); a temp file from mkstemp would be 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Callable

from flux_lora.parallel import session

Content = bytes | str | Callable[[IO[bytes]], Any]


def writes_here(every_rank: bool = False) -> bool:
    """Whether this process writes a run's shared files: rank 0, or every rank for its own files."""
    return every_rank or session.info().is_main


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, content: Content | Any, *, as_json: bool = False,
                 every_rank: bool = False) -> Path | None:
    """Write `content` (bytes, str, JSON-able with as_json, or a function writing to a binary
    file) to `path` atomically. Returns the path, or None on a rank that does not write."""
    if not writes_here(every_rank):
        return None
    if as_json:
        content = json.dumps(content, indent=1) + "\n"

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)

    return _replace_through_temp(Path(path), fill)


def write_file_from(path: str | Path, writer: Callable[[Path], Any], *, every_rank: bool = False) -> Path | None:
    """For libraries that only write to a path they open themselves (safetensors' save_file,
    diffusers' save_lora_weights): `writer(tmp_path)`, then the same fsync and rename."""
    if not writes_here(every_rank):
        return None
    return _replace_through_temp(Path(path), writer)


def _replace_through_temp(path: Path, fill: Callable[[Path], Any]) -> Path:
    """fill(temp path in the same folder), fsync it, rename it over path; the temp never stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        fill(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # a library may create its file 0600 (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def commit_dir(final: str | Path, build: Callable[[Path], Any], *, every_rank: bool = False) -> Path | None:
    """Build a directory under a temp name (`build(tmp_dir)` writes its files, each through
    write_atomic(..., every_rank=True) or write_file_from), then swap it in for `final`. On failure the
    temp directory is removed and an existing `final` is untouched."""
    if not writes_here(every_rank):
        return None
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return final


def open_append(path: str | Path, *, every_rank: bool = False) -> IO[str] | None:
    """The one append-only output (events.jsonl): lines are added, never rewritten, so a reader
    following the file sees every complete line. None on ranks that do not write."""
    if not writes_here(every_rank):
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            h.update(chunk)
    return h.hexdigest()


def check_writable(folder: str | Path) -> None:
    """Make folder (and its parents) and prove a file can be created in it; raises OSError."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    finally:
        probe.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
