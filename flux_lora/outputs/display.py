"""What a person sees on stderr: a rich progress bar on a terminal, a plain line every N steps in a
log file (SLURM), and the one-line summary of a progress event that `watch` shares."""

from __future__ import annotations

import math
import os
import sys
from typing import TextIO


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
    overall, training = ev.get("samples_per_s") or 0, ev.get("training_samples_per_s")
    # the rate the end comes at; the training steps' own when previews and checkpoints slow it by over 2%
    rate = f"{overall:.2f} samples/s" + (f" ({training:.2f} in training steps)"
                                         if training and training > 1.02 * overall else "")
    return (f"step {ev.get('step')}/{ev.get('total_steps')}  loss {loss_s} (avg {avg_s})  "
            f"lr {ev.get('learning_rate', 0):.2e}  {rate}  eta {format_duration(ev.get('eta_s'))}")


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
