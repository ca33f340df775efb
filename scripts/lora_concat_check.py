"""Would a LoRA layer cost less with the LoRA inside the base matmul's K dimension? At FLUX.1-dev's
shapes, one GPU, bf16, this times flux_lora.fast.lora_linear's way against the K-concatenated one:

    now, forward:   h = x·Aᵀ;  c = bias + s·h·Bᵀ (Triton widen, writes M×N);  y = c + x·Wᵀ (beta = 1)
    concat, fwd:    [x | s·h] (x copied, M×K) · [W | B]ᵀ + bias: one matmul, no M×N written twice
    now, backward:  dx = dh·A (widen, writes M×K) + dy·W (beta = 1)
    concat, bwd:    [dy | dh] (dy copied, M×N) · [W ; A]

A layer with more outputs than inputs (N > K) saves in the forward, one with fewer in the backward.
Times are from CUDA graphs replayed long enough to hold the chip at its power limit (as a training
step does), the two ways interleaved. Prints a line per layer and direction and the sum over one
step's layers; writes a JSON with --out. (Session 25: the measurement behind issue 25's note.)

    python scripts/lora_concat_check.py --resolution 512 --batch 4 --out OUT.json"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_kernel_speed import graph_of  # noqa: E402

from flux_lora.fast import lora_kernels as lk  # noqa: E402


def layer_shapes(resolution: int, batch: int, text_len: int = 512, rank: int = 16) -> list[tuple]:
    """(name, tokens M, in K, out N, LoRA rank r, layers a step), as the fast path groups them."""
    image, text = (resolution // 16) ** 2 * batch, text_len * batch
    shapes = []
    for stream, m in (("img", image), ("txt", text)):
        shapes += [(f"double.{stream}.qkv", m, 3072, 9216, 3 * rank, 19), (f"double.{stream}.out", m, 3072, 3072, rank, 19),
                   (f"double.{stream}.ff0", m, 3072, 12288, rank, 19), (f"double.{stream}.ff2", m, 12288, 3072, rank, 19)]
    return shapes + [("single.qkv_mlp", image + text, 3072, 21504, 4 * rank, 38),
                     ("single.proj_out", image + text, 15360, 3072, rank, 38)]


def ways(m: int, k: int, n: int, r: int, dev) -> dict:
    """direction -> {way: call}, every call writing its result into a kept tensor."""
    bf, s = torch.bfloat16, 0.5
    x, dy = torch.randn(m, k, device=dev, dtype=bf), torch.randn(m, n, device=dev, dtype=bf)
    w, bias = torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5, torch.randn(n, device=dev, dtype=bf)
    a, b = torch.randn(r, k, device=dev, dtype=bf) / k ** 0.5, torch.randn(n, r, device=dev, dtype=bf) / r ** 0.5
    wb, wa = torch.cat([w, b], dim=1), torch.cat([w, a], dim=0)  # [W | B] and [W ; A], stored so once
    xh, dyg = torch.empty(m, k + r, device=dev, dtype=bf), torch.empty(m, n + r, device=dev, dtype=bf)

    def forward_now():
        h = x @ a.t()
        return lk.widen(h, b, alpha=s, bias=bias).addmm_(x, w.t())

    def forward_concat():
        xh[:, :k].copy_(x)
        xh[:, k:].copy_((x @ a.t()).mul_(s))
        return torch.addmm(bias, xh, wb.t())

    def backward_now():
        dh = (dy @ b).mul_(s)
        return lk.widen(dh, a.t()).addmm_(dy, w)

    def backward_concat():
        dyg[:, :n].copy_(dy)
        dyg[:, n:].copy_((dy @ b).mul_(s))
        return dyg @ wa

    return {"forward": {"now": forward_now, "concat": forward_concat, "base only": lambda: torch.addmm(bias, x, w.t())},
            "backward": {"now": backward_now, "concat": backward_concat, "base only": lambda: dy @ w}}


def check(calls: dict) -> float:
    """The largest difference between the two ways' results, relative to the result's size."""
    now, concat = calls["now"]().float(), calls["concat"]().float()
    return ((now - concat).abs().max() / now.abs().max()).item()


def held_ms(fn, rounds: int = 4, calls: int = 20, seconds: float = 0.4) -> list[float]:
    """GPU ms of one call from a CUDA graph of `calls` calls, replayed for ~`seconds` each round."""
    graph = graph_of(fn, calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    replays = max(1, int(seconds * 1000 / max(start.elapsed_time(end), 1e-3)))
    out = []
    for _ in range(rounds):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / (replays * calls))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    burn = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    held_ms(lambda: burn @ burn, rounds=1, seconds=3.0)  # to the power limit before the first timing
    rows, totals = [], {}
    for name, m, k, n, r, count in layer_shapes(args.resolution, args.batch, rank=args.rank):
        for direction, calls in ways(m, k, n, r, dev).items():
            error = check(calls)
            assert error < 2e-2, f"{name} {direction}: the two ways differ by {error:.3g}"
            times = {way: [] for way in calls}
            for _ in range(2):  # interleaved: a drift of the clock hits every way alike
                for way, fn in calls.items():
                    times[way] += held_ms(fn, rounds=2)
            ms = {way: min(t) for way, t in times.items()}
            for way, t in ms.items():
                totals[f"{direction} {way}"] = totals.get(f"{direction} {way}", 0.0) + t * count
            best = min(ms["now"], ms["concat"])
            totals[f"{direction} best of the two"] = totals.get(f"{direction} best of the two", 0.0) + best * count
            rows.append({"layer": name, "direction": direction, "m": m, "k": k, "n": n, "r": r, "count": count,
                         "ms": ms, "relative_difference": error})
            print(f"{name:18s} {direction:8s} M={m} K={k} N={n} r={r}: " + "  ".join(f"{w} {t:.4f}" for w, t in ms.items())
                  + f"  (concat {100 * (ms['concat'] / ms['now'] - 1):+.1f}%)", flush=True)
    print("a step's layers, ms: " + "  ".join(f"{key} {t:.2f}" for key, t in totals.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kind": "lora_concat_check", "resolution": args.resolution, "batch": args.batch,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows, "ms_per_step": totals}, f, indent=1)


if __name__ == "__main__":
    main()
