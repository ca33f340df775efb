"""OUTPUT/loss.png: loss and its moving average against step, learning rate on a second axis."""

from __future__ import annotations

import math
from pathlib import Path

from flux_lora.outputs import files

SIZE_IN, DPI = (8, 4.5), 100  # 800 × 450 pixels


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        if math.isfinite(v):
            acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc) if acc else float("nan"))
    return out


def write_loss_plot(path: Path, history: list, validation: list = ()) -> None:
    """history: (step, loss, lr) tuples; validation: (step, loss) of the held-out items. Written
    atomically by rank 0; an empty history writes nothing."""
    if not history or not files.writes_here():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    lrs = [h[2] for h in history]
    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    ax.plot(steps, losses, color="0.7", linewidth=0.8, label="loss")
    ax.plot(steps, moving_average(losses, max(5, len(losses) // 20)), color="C0", label="moving average")
    if validation:
        ax.plot([v[0] for v in validation], [v[1] for v in validation], color="C2", marker="o", linewidth=1.2,
                label="validation (fixed t and noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, lrs, color="C1", linewidth=0.8, linestyle="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    try:
        files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)
