"""Resumable train state: OUTPUT/checkpoints/step-NNNNNN/ written atomically, keep-last-k, and the
stop flag that signals set. A DDP run's checkpoint is written by rank 0:

    step-NNNNNN/lora.safetensors   LoRA tensors (fp32)
    step-NNNNNN/optimizer.pt       optimizer + LR scheduler state (torch.load weights_only=True)
    step-NNNNNN/state.json         step, sampler position, the math-relevant config, RNG seeds
An FSDP2 run's by every rank, each its own shard, through torch.distributed.checkpoint:

    step-NNNNNN/dcp/               .metadata + one __R_0.distcp per rank: LoRA and optimizer state
    step-NNNNNN/state.json         as above, with the LR scheduler and "format": "dcp"
Either is built under a temp name and renamed into place only after every file is written and
fsynced, so a crash or a full disk mid-write leaves the previous checkpoint as the latest valid
one. Either resumes on any number of ranks, sharded or not (resume_into).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
from pathlib import Path

import torch

from flux_lora.errors import CheckpointError, ConfigError
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


SHARDED_DIR = "dcp"


def save_sharded_checkpoint(out_dir: Path, step: int, model, opt, state: dict, keep: int,
                            ema: dict | None = None) -> Path | None:
    """Every rank writes its shards of the LoRA and optimizer state (torch.distributed.checkpoint);
    rank 0 then writes state.json and renames the directory into place. Returns the path on rank 0."""
    import os

    import torch.distributed.checkpoint as dcp

    from flux_lora.parallel import session

    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    main = session.info().is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    session.barrier()
    try:
        faults.before_checkpoint_write(step)
        model_sd, optim_sd = _sharded_state(model, opt)
        dcp.save({"lora": model_sd, "optim": optim_sd, **({"ema": ema} if ema else {})},
                 checkpoint_id=str(tmp / SHARDED_DIR))
        if not main:
            return None
        written = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        files.write_atomic(tmp / "state.json", {**state, "step": step, "format": "dcp", "file_bytes": written},
                           as_json=True, every_rank=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as e:  # noqa: BLE001 - an OSError, or torch.distributed.checkpoint's wrap of one
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror or e if isinstance(e, OSError) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise CheckpointError(f"cannot write checkpoint {final} ({why}); free disk space or fix permissions; "
                              "the previous checkpoint is intact") from None
    files._fsync_dir(final.parent)
    prune(out_dir, keep)
    return final


def _state_options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # not strict: the frozen base is not in the checkpoint (_set_lora_and_optim checks the LoRA's keys)
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, strict=False)


def _set_lora_and_optim(model, opt, model_sd: dict, optim_sd: dict, full: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    result = set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_state_options(full))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"checkpoint LoRA does not fit this model ({len(missing)} missing keys, e.g. {missing[0]})")


def _sharded_state(model, opt) -> tuple[dict, dict]:
    """The LoRA's and the optimizer's state keyed by parameter name (DTensor shards under FSDP2,
    whole tensors otherwise): the form torch.distributed.checkpoint saves and reshards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt, options=_state_options())


@contextlib.contextmanager
def _optimizer_ready_to_load(opt):
    """torch.distributed.checkpoint's state-dict functions create the optimizer state a checkpoint
    loads into (a step at lr 0) only for an optimizer without any state and without gradients;
    otherwise that state is silently not loaded and the resumed run restarts its averages.
    Schedule-free's train() leaves an empty state per parameter (dropped here), and CUDA graphs
    keep the gradients allocated (zeros) from the compile on (set aside, and put back after)."""
    for param in [p for p, state in opt.state.items() if not state]:
        del opt.state[param]
    kept = {p: p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None}
    for param in kept:
        param.grad = None
    try:
        yield
    finally:
        for param, grad in kept.items():
            param.grad = grad


def resume_into(saved: dict, model, opt, sched, ema=None) -> None:
    """Load a checkpoint of either format into the model, optimizer, LR schedule (and EMA) of this
    run, whatever its number of ranks and sharding (every rank calls it)."""
    with _optimizer_ready_to_load(opt):
        _load_into(saved, model, opt, sched, ema)


def _load_into(saved: dict, model, opt, sched, ema=None) -> None:
    if "dcp" in saved:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = _sharded_state(model, opt)
        both = {"lora": model_sd, "optim": optim_sd, **({"ema": ema.state()} if ema else {})}
        dcp.load(both, checkpoint_id=saved["dcp"])  # resharded to this run's ranks (the EMA in place)
        _set_lora_and_optim(model, opt, both["lora"], both["optim"])
        sched.load_state_dict(saved["state"]["scheduler"])
        return
    from flux_lora.parallel.fsdp import is_sharded
    from flux_lora.training import lora, optim

    if is_sharded(model):  # a DDP run's whole tensors into this run's shards
        names = [n for n, _ in lora.lora_parameters(model)]
        order = [n for group in optim.lora_groups(names) for n in group]  # the optimizer's own indices
        model_sd = {n: saved["lora"][lora.peft_key(n)] for n in names}
        optim = saved["optim"]["optimizer"]
        optim_sd = {"state": {order[int(i)]: v for i, v in optim["state"].items()},
                    "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]]}
        _set_lora_and_optim(model, opt, model_sd, optim_sd, full=True)
    else:
        lora.load_lora_state_dict(model, saved["lora"])
        opt.load_state_dict(saved["optim"]["optimizer"])
    sched.load_state_dict(saved["optim"]["scheduler"])
    if ema is not None:
        ema.load(saved["optim"].get("ema", {}))
    if "rng" in saved["optim"]:
        torch.set_rng_state(saved["optim"]["rng"]["cpu"])


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
    expected = state.get("file_bytes", {}) if state.get("format") == "dcp" else CHECKPOINT_FILES
    for name in expected:
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
    state = files.read_json(path / "state.json")
    if state.get("format") == "dcp":
        from torch.distributed.checkpoint import FileSystemReader

        try:
            FileSystemReader(str(path / SHARDED_DIR)).read_metadata()
        except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt checkpoint
            raise _unreadable(path, f"{type(e).__name__} while reading its metadata") from None
        return {"state": state, "dcp": str(path / SHARDED_DIR), "path": str(path)}
    try:
        lora = load_file(str(path / "lora.safetensors"))
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt checkpoint
        raise _unreadable(path, f"{type(e).__name__} while decoding") from None
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
