"""One line per setting of bench.py results files: samples/s, s/step, MFU, step and whole-run peaks.
    python scripts/bench_summary.py OUT/*.json
For reading results on the GPU machine, where only the command's output comes back whole."""

from __future__ import annotations

import json
import sys


def line(path: str, row: dict) -> str:
    keys = ("samples_per_s", "step_s", "mfu", "mfu_fp8_aware", "mfu_model_flops", "peak_mem_gib", "whole_run_peak_gib", "load_peak_gib",
            "time_to_first_step_s", "checkpointed_share", "cuda_graphs_on", "fsdp_blocks_kept_gathered",
            "fsdp_lora_replicated", "images_per_s", "steady_images_per_s")
    shown = " ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row[k]}"
                     for k in keys if row.get(k) is not None)
    clocks = row.get("gpu_clocks") or {}
    if clocks:  # the clock the chip held under its power limit while the steps were timed
        shown += (f" sm_mhz={clocks['sm_mhz_median']:.0f} (min {clocks['sm_mhz_min']:.0f})"
                  f" power_w={clocks['power_w_median']:.0f} power_capped={clocks['power_capped_share']:.0%}")
    return f"{path.rsplit('/', 1)[-1]} | {row.get('name', '')} | {shown}"


def main(paths: list[str]) -> None:
    for path in paths:
        try:
            data = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"{path}: unreadable ({e})")
            continue
        for row in data.get("results", [data]):
            print(line(path, row))
        for key, value in data.items():
            if key.startswith("loss_vs"):
                print(f"  {key}: {json.dumps(value)[:300]}")


if __name__ == "__main__":
    main(sys.argv[1:])
