"""Experiment trackers fed from the run's own events (`--log-to tensorboard,wandb`): each event
that events.jsonl gets is also handed to every tracker, so a number appears once per step in the
file, on TensorBoard and on wandb alike, under the same name.

    progress    train/<field> for each number (loss, avg_loss, learning_rate, samples_per_s, ...)
    validation  validation/<field> (loss, ...)
    sample      the preview grid as an image, at its step
    warning     text; start: the run's config; done: the summary numbers

TensorBoard writes OUTPUT/tensorboard/; wandb writes OUTPUT/wandb/ and follows its own settings
(`WANDB_MODE=offline` keeps it on this machine; `wandb sync OUTPUT/wandb/offline-run-*` uploads
later). A resumed run continues the same wandb run. A tracker that fails mid-run is turned off
with one warning: the training goes on and events.jsonl stays complete.
"""

from __future__ import annotations

import json
import numbers
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from flux_lora.errors import ConfigError
_NOT_SCALARS = {"v", "time", "step", "total_steps"}  # bookkeeping, or the x axis itself
_SECTION = {"progress": "train", "validation": "validation"}


def parse_log_to(value: str) -> list[str]:
    """`tensorboard,wandb` -> ["tensorboard", "wandb"] (the config has checked the names)."""
    return list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))


def scalars(ev: dict) -> dict[str, float]:
    """The numbers of a progress or validation event as tracker tags (`train/loss`); {} for others."""
    section = _SECTION.get(ev.get("event", ""))
    if section is None or ev.get("stage", "train") != "train":
        return {}
    return {f"{section}/{k}": v for k, v in summary_numbers(ev).items()}


def summary_numbers(ev: dict) -> dict[str, float]:
    """The top-level numbers of an event (for done: final_loss, steps, time_to_first_step_s, ...)."""
    return {k: float(v) for k, v in ev.items()
            if k not in _NOT_SCALARS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _resolve(path: str, out: Path) -> Path | None:
    """A sample event's path (relative to where train ran, or absolute) as a file in the output."""
    for candidate in (Path(path), out / "samples" / Path(path).name):
        if candidate.is_file():
            return candidate
    return None


class TensorBoard:
    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("output.log_to=tensorboard needs the tensorboard package: pip install 'flux_lora[trackers]'") from None
        self.out, self.writer = out, SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, ev: dict, step: int) -> None:
        for tag, value in scalars(ev).items():
            self.writer.add_scalar(tag, value, step)
        kind = ev.get("event")
        if kind == "start" and ev.get("config"):
            self.writer.add_text("config", "```\n" + json.dumps(ev["config"], indent=2) + "\n```", step)
        elif kind == "sample" and (image := _resolve(ev.get("path", ""), self.out)):
            import numpy as np
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(image).convert("RGB")), step, dataformats="HWC")
        elif kind in ("warning", "error", "stopped"):
            self.writer.add_text(kind, str(ev.get("message", "")), step)
        elif kind == "done":
            for tag, value in summary_numbers(ev).items():
                self.writer.add_scalar(f"summary/{tag}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """One wandb run per output folder: its id is kept in OUTPUT/wandb/flux_lora-run-id, so a
    resumed run (same folder) logs into the same wandb run and --overwrite starts a new one."""

    def __init__(self, out: Path, project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("output.log_to=wandb needs the wandb package: pip install 'flux_lora[trackers]'") from None
        self.wandb, self.out = wandb, out
        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "flux_lora-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=project, name=out.resolve().name, id=run_id, resume="allow", dir=str(out),
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # noqa: BLE001 - wandb's own errors (not logged in, no network, ...)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ConfigError(f"wandb could not start a run ({type(e).__name__}: {first}); run `wandb login`, "
                              "or set WANDB_MODE=offline to log on this machine and `wandb sync` later") from None

    def write(self, ev: dict, step: int) -> None:
        kind = ev.get("event")
        numbers_now = scalars(ev)
        if numbers_now:
            self.run.log(numbers_now, step=step)
        if kind == "start" and ev.get("config"):
            self.run.config.update(ev["config"], allow_val_change=True)
        elif kind == "sample" and (image := _resolve(ev.get("path", ""), self.out)):
            self.run.log({"samples": self.wandb.Image(str(image), caption=" | ".join(ev.get("prompts", [])))}, step=step)
        elif kind == "done":
            self.run.summary.update(summary_numbers(ev))

    def close(self) -> None:
        self.run.finish()


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Trackers:
    """Every tracker of a run, fed each event with the step it belongs to (events without a step
    of their own, e.g. warnings and done, go at the last step seen). `say` prints a line for a
    person (the run's display, so a progress bar is not torn)."""

    def __init__(self, names: list[str], out: Path, project: str = "flux_lora", say: Callable[[str], None] = _to_stderr):
        self.step, self.active, self.say = 0, [], say
        for name in names:
            self.active.append(TensorBoard(out) if name == "tensorboard" else Wandb(out, project))

    def write(self, ev: dict) -> None:
        if isinstance(ev.get("step"), int) and ev.get("stage", "train") == "train":
            self.step = ev["step"]
        for tracker in list(self.active):
            try:
                tracker.write(ev, self.step)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not end the training
                self.active.remove(tracker)
                self.say(f"warning: {type(tracker).__name__.lower()} logging stopped ({type(e).__name__}: {e}); "
                         "events.jsonl has every event")

    def close(self) -> None:
        for tracker in self.active:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                self.say(f"warning: closing {type(tracker).__name__.lower()}: {e}")
        self.active = []


def open_trackers(log_to: str, out: Path, project: str, say: Callable[[str], None] = _to_stderr) -> Any:
    """The run's trackers, or None when output.log_to is empty."""
    names = parse_log_to(log_to)
    return Trackers(names, Path(out), project, say) if names else None
