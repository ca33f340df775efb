"""Host memory against dataset size: preprocess and train the tiny model on N synthetic images for
each N, and report each rank's peak resident memory (the done events' host_peak_rss_mib_per_rank);
for the largest N, preprocess is killed part-way first and rerun, which must encode only the
chunks the killed run did not finish.

    python scripts/memory_scaling.py --counts 1000 20000 --out bench/results/DATE_cpu_memory-scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--resolution", "64", "--max-sequence-length", "32", "--num-workers", "1", "--captioner", "none",
        "--trigger-word", "sks"]


def torchrun(nproc: int, *args) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "flux_lora", *map(str, args)]
    return cmd


def done_event(folder: Path) -> dict:
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "done"][-1]


def killed_then_resumed(cmd: list, cache: Path, env: dict, kill_after_chunks: int) -> dict:
    """Start preprocess, SIGKILL its process group once `kill_after_chunks` chunks are on disk, rerun."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and len(list((cache / "shards").glob("*.json"))) < kill_after_chunks:
        time.sleep(0.5)
    finished_before = len(list((cache / "shards").glob("*.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([c for c in cmd if c != "--overwrite"], env=env, cwd=ROOT, check=True, capture_output=True)
    done = done_event(cache)
    return {"chunks_done_when_killed": finished_before, "encoded_after_resume": done.get("encoded_items"),
            "total_items": done["total_items"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--work", default="/tmp/flux_lora-memory-scaling")
    p.add_argument("--out", default="")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from flux_lora.data.demo import make_images
    from flux_lora.models.tiny import make_tiny

    work = Path(args.work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    model = work / "tiny"
    if not model.exists():
        make_tiny(model)
    rows = []
    for n in args.counts:
        images, cache, out = work / f"images-{n}", work / f"cache-{n}", work / f"out-{n}"
        if not images.exists():
            make_images(images, count=n)
        cmd = torchrun(args.nproc, "preprocess", "--model", model, "--data", images, "--cache-dir", cache, *TINY,
                       "--overwrite")
        row = {"items": n}
        if n == max(args.counts):  # the kill and resume, on the largest set
            row["resume"] = killed_then_resumed(cmd, cache, env, kill_after_chunks=max(2, n // 64 // 3))
        else:
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
        row["preprocess_rss_mib_per_rank"] = done_event(cache)["host_peak_rss_mib_per_rank"]
        subprocess.run(torchrun(args.nproc, "train", "--model", model, "--cache-dir", cache, "--output", out,
                                "--steps", args.steps, "--lora-rank", "4", "--overwrite", "--no-resume"),
                       env=env, cwd=ROOT, check=True, capture_output=True)
        row["train_rss_mib_per_rank"] = done_event(out)["host_peak_rss_mib_per_rank"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"kind": "memory-scaling", "nproc": args.nproc, "steps": args.steps, "results": rows,
              "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
