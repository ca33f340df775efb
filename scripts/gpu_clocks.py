"""The GPU's SM clock and power draw while bench.py times its steps, sampled by nvidia-smi.

Why: a FLUX.1 step at 512 px runs an H200 into its power limit (700 W; session 24: SM clocks
1530-1755 MHz during the timed steps against 1980 MHz idle), so two machines with the same code
differ by the clock their chip holds under that limit. Results then say what clock they ran at.
Empty where nvidia-smi is missing (CPU runs)."""

from __future__ import annotations

import shutil
import statistics
import subprocess

import torch

SW_POWER_CAP = 0x4  # nvidia-smi's clocks_event_reasons bit: clocks lowered to stay under the power limit


class Sampler:
    """Context manager: samples every `interval_ms` while open; `summary()` after."""

    def __init__(self, device: torch.device, interval_ms: int = 200):
        self.device, self.interval_ms = device, interval_ms
        self.proc, self.lines = None, []

    def __enter__(self) -> "Sampler":
        smi = shutil.which("nvidia-smi")
        if smi and self.device.type == "cuda":
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            self.proc = subprocess.Popen(
                [smi, "-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}",
                 "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active",
                 "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.lines = [line for line in out.splitlines() if line.strip()]

    def summary(self) -> dict:
        """Median SM MHz and watts, and the share of samples held down by the power limit."""
        rows = []
        for line in self.lines:
            try:
                mhz, watts, reasons = (f.strip() for f in line.split(","))
                rows.append((float(mhz), float(watts), int(reasons, 16)))
            except ValueError:
                continue
        if not rows:
            return {}
        return {"sm_mhz_median": statistics.median(r[0] for r in rows),
                "sm_mhz_min": min(r[0] for r in rows),
                "power_w_median": statistics.median(r[1] for r in rows),
                "power_capped_share": sum(1 for r in rows if r[2] & SW_POWER_CAP) / len(rows),
                "samples": len(rows)}
