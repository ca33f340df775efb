"""Why the base matmul of a LoRA layer starts ~4 µs late: in the bf16 step's trace (bench/README,
session 24) cuBLAS puts a memset before each beta = 1 matmul that adds the LoRA's share
(`c.addmm_(x, Wᵀ)` in fast/lora_linear.py), and a memset node costs a CUDA graph ~3-4 µs of idle
GPU before the kernel after it. This replays, at FLUX.1-dev's shapes, the widen kernel followed by
each way of asking for the same sum, from a CUDA graph as the step does, and reports the time of
one pair, the memsets the profiler sees and the matmul kernel cuBLAS picked. One GPU.

    python scripts/addmm_memset_check.py --resolution 512 --batch 4 --out OUT.json"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json

import torch
from torch.profiler import ProfilerActivity, profile

from flux_lora.fast import lora_kernels
from lora_kernel_speed import graph_of, timed_ms  # scripts/: a CUDA graph of calls, replayed


def shapes(resolution: int, batch: int, text: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, in, out) of FLUX.1-dev's LoRA'd base matmuls at this size."""
    image = batch * (resolution // 16) ** 2
    both, txt = image + batch * text, batch * text
    return [("single linear1", both, 3072, 21504), ("single proj_out", both, 15360, 3072),
            ("double image qkv", image, 3072, 9216), ("double image ff.0", image, 3072, 12288),
            ("double image ff.2", image, 12288, 3072), ("double image out", image, 3072, 3072),
            ("double text qkv", txt, 3072, 9216), ("double text ff.2", txt, 12288, 3072)]


@contextlib.contextmanager
def blas(library: str):
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def variants(x, w, h, b, backward: bool):
    """name -> a call: the widen kernel writes c, then the base matmul adds x·Wᵀ (dy·W going back)."""
    wt = w if backward else w.t()

    def widen():
        return lora_kernels.widen(h, b, alpha=2.0)

    return {
        "addmm_ (now)": lambda: widen().addmm_(x, wt),
        "baddbmm_": lambda: widen().unsqueeze(0).baddbmm_(x.unsqueeze(0), wt.unsqueeze(0)).squeeze(0),
        "addmm out-of-place": lambda: torch.addmm(widen(), x, wt),
        "mm, no add (reference)": lambda: (widen(), x @ wt)[1],
        "mm + add_ (two passes)": lambda: (x @ wt).add_(widen()),
    }


def profiled(fn, calls: int = 10) -> dict:
    """Memsets, matmul kernel names and idle GPU time in one replay of `calls` calls."""
    graph = graph_of(fn, calls)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    names = collections.Counter(e.name for e in events)
    busy = sum(e.time_range.elapsed_us() for e in events)
    span = events[-1].time_range.end - events[0].time_range.start if events else 0
    return {"memsets_per_call": sum(v for k, v in names.items() if "emset" in k) / calls,
            "kernels": {k[:90]: v / calls for k, v in names.items()},
            "idle_us_per_call": (span - busy) / calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, bf = torch.device("cuda"), torch.bfloat16
    rows = []
    for name, m, k, n in shapes(args.resolution, args.batch, args.text):
        for backward in (False, True):
            rin, rout = (n, k) if backward else (k, n)  # going back: dx [m, k] = dy [m, n]·W [n, k]
            x = torch.randn(m, rin, device=dev, dtype=bf)
            w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
            h = torch.randn(m, args.rank, device=dev, dtype=bf)
            b = torch.randn(rout, args.rank, device=dev, dtype=bf) * 0.01
            ref = variants(x, w, h, b, backward)["addmm_ (now)"]().float()
            runs = dict(variants(x, w, h, b, backward))
            for label, fn in list(runs.items()):
                entries = [(label, fn, "cublas")]
                if label == "addmm_ (now)":
                    entries.append(("addmm_ cublasLt", fn, "cublaslt"))
                for shown, call, library in entries:
                    with blas(library):
                        err = (call().float() - ref).abs().max().item() if "reference" not in shown else None
                        row = {"shape": name, "pass": "backward" if backward else "forward", "m": m, "k": k, "n": n,
                               "variant": shown, "us": timed_ms(call) * 1e3, "max_diff_vs_now": err, **profiled(call)}
                    rows.append(row)
                    mm = [k2 for k2 in row["kernels"] if "gemm" in k2 or "nvjet" in k2 or "cutlass" in k2]
                    print(f"{name:18s} {row['pass']:8s} {shown:24s} {row['us']:8.1f} us  memsets {row['memsets_per_call']:.0f}"
                          f"  idle {row['idle_us_per_call']:5.1f} us  {mm[:1]}", flush=True)
            del x, w, h, b
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
