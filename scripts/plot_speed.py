"""What writing OUTPUT/loss.png costs rank 0: the first plot of a process (its imports included) and
a later one, for a history of N steps with a validation point every 50, in a fresh interpreter that
has imported what a training process has (torch, PIL, flux_lora.outputs.files) first.
`--module PATH` times another plot module of the same interface (e.g. an older flux_lora's).

    python scripts/plot_speed.py --steps 2000 [--module PATH]"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--module", default="", help="a plot module file with write_loss_plot (default: flux_lora's)")
    args = p.parse_args()
    history = [(s, 0.6 * math.exp(-s / 500) + 0.3 + 0.05 * math.sin(s * 1.7), 1e-4 * min(1.0, s / 100))
               for s in range(1, args.steps + 1)]
    validation = [(s, 0.6 * math.exp(-s / 500) + 0.32) for s in range(50, args.steps + 1, 50)]
    import PIL.Image  # noqa: F401  (loaded in a training process: diffusers imports it)

    from flux_lora.outputs import files  # noqa: F401  (imports torch)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.module:
            spec = importlib.util.spec_from_file_location("plot_under_test", args.module)
            plot = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(plot)
        else:
            from flux_lora.outputs import plot
        times = []
        for _ in range(3):
            plot.write_loss_plot(Path(tmp) / "loss.png", history, validation)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    print(json.dumps({"module": args.module or "flux_lora.outputs.plot", "steps": args.steps,
                      "first_plot_s": round(times[0], 3), "later_plot_s": round(min(times[1:]), 3)}))


if __name__ == "__main__":
    main()
