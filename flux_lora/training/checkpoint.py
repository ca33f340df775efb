"""Resumable train state: OUTPUT/checkpoints/step-NNNNNN/ written atomically by rank 0, keep-last-k,
and the stop flag that signals set.

    step-NNNNNN/lora.safetensors   LoRA tensors (fp32)
    step-NNNNNN/optimizer.pt       optimizer + LR scheduler state (torch.load weights_only=True)
    step-NNNNNN/state.json         step, sampler position, the math-relevant config, RNG seeds
A directory is renamed into place only after all three are written and fsynced, so a crash or a
full disk mid-write leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import torch

from flux_lora.errors import CheckpointError
from flux_lora.outputs import files
from flux_lora.training import faults

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
CHECKPOINT_FILES = ("lora.safetensors", "optimizer.pt", "state.json")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(out_dir: Path, step: int, lora_sd: dict, optim_state: dict, state: dict, keep: int) -> Path | None:
    """Rank 0 writes (files.commit_dir decides); other ranks return None. Raises CheckpointError
    (the previous checkpoint intact) on an I/O failure."""
    from safetensors.torch import save_file

    final = checkpoint_dir(out_dir, step)

    def build(tmp: Path) -> None:
        faults.before_checkpoint_write(step)
        files.write_file_from(tmp / "lora.safetensors", lambda path: save_file(lora_sd, str(path)), every_rank=True)
        files.write_atomic(tmp / "optimizer.pt", lambda f: torch.save(optim_state, f), every_rank=True)
        sizes = {name: (tmp / name).stat().st_size for name in CHECKPOINT_FILES if name != "state.json"}
        files.write_atomic(tmp / "state.json", {**state, "step": step, "file_bytes": sizes}, as_json=True, every_rank=True)

    try:
        written = files.commit_dir(final, build)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {final} ({e.strerror or e}); free disk space or fix "
                              f"permissions; the previous checkpoint is intact") from None
    if written:
        prune(out_dir, keep)
    return written


def saved_step(path: str | Path) -> int:
    """The step a checkpoint directory holds, or -1 if its state.json cannot be read."""
    return int((files.read_json(Path(path) / "state.json") or {}).get("step", -1))


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Every step-NNNNNN directory, oldest first, complete or not."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(found)


def quick_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint without decoding it: a file missing, or a size that differs
    from the one recorded when it was written (truncated). None when it looks whole."""
    state = files.read_json(Path(path) / "state.json")
    if state is None:
        return "state.json missing or unreadable"
    for name in CHECKPOINT_FILES:
        if not (Path(path) / name).is_file():
            return f"{name} missing"
    for name, size in state.get("file_bytes", {}).items():
        if (Path(path) / name).stat().st_size != size:
            return f"{name} has {(Path(path) / name).stat().st_size} bytes, {size} were written (truncated?)"
    return None


def prune(out_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints that look whole; remove older ones, unreadable ones (a
    newer corrupt one must not outlive a good one) and temp directories of interrupted writes."""
    whole = [(step, d) for step, d in list_checkpoints(out_dir) if quick_problem(d) is None]
    kept = {d for _, d in whole[-keep:]}
    for _, d in list_checkpoints(out_dir):
        if d not in kept:
            shutil.rmtree(d, ignore_errors=True)
    for stale in (Path(out_dir) / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


_validated: dict[str, tuple] = {}  # what latest_valid loaded (with a stamp), for the resume that follows


def latest_valid(out_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files all load, and the newer ones that did not (with why).
    The loaded state is kept for the next load_checkpoint of that path, so resuming reads it once."""
    corrupt = []
    for _, d in reversed(list_checkpoints(out_dir)):
        try:
            _validated.clear()
            _validated[str(d)] = (_stamp(d), load_checkpoint(d))
            return d, corrupt
        except CheckpointError as e:
            corrupt.append((d, e.reason))
    return None, corrupt


def _stamp(path: Path) -> tuple:
    """Changes whenever the checkpoint's files are rewritten."""
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(path).glob("*")) if p.is_file())


def load_checkpoint(path: Path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    kept = _validated.pop(str(path), None)
    if kept is not None and kept[0] == _stamp(path):
        return kept[1]
    problem = quick_problem(path)
    if problem is not None:
        raise _unreadable(path, problem)
    try:
        lora = load_file(str(path / "lora.safetensors"))
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt checkpoint
        raise _unreadable(path, f"{type(e).__name__} while decoding") from None
    state = files.read_json(path / "state.json")
    return {"state": state, "lora": lora, "optim": optim, "path": str(path)}


def _unreadable(path: Path, reason: str) -> CheckpointError:
    error = CheckpointError(f"checkpoint {path} is unreadable ({reason}); pick another with --resume-from")
    error.reason = reason
    return error


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys of the math-relevant config whose value changed since the checkpoint (a key the
    checkpoint predates is not compared)."""
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]


class StopFlag:
    """SIGTERM / SIGINT / SIGUSR1 (SLURM's warning before preemption) set a flag; the training loop
    turns it into a shared decision at the next step boundary."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signal_name = signal.Signals(signum).name

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
