"""Never lose work: exact resume after SIGKILL, signals, failing ranks, divergence, full disks.
    pytest -q tests/test_checkpoint.py"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, run_cli, torchrun, train_args
from flux_lora.training import checkpoint
from helpers import as_rank


def _lora(out):
    return load_file(out / "lora.safetensors")


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


COMMON = ["--steps", "8", "--batch-size", "1", "--lr", "1e-2", "--checkpoint-every", "3", "--validation-split", "0.25",
          "--set", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def reference_run(tiny_model, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    torchrun(2, *train_args(tiny_model, cache_dir, out, *COMMON))
    return out


def test_sigkill_then_resume_is_bit_identical(tiny_model, cache_dir, tmp_path, reference_run):
    out = tmp_path / "killed"
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, *COMMON), check=False,
                    env=cli_env(FLUX_LORA_FAULT="kill@5"))
    assert proc.returncode != 0 and not (out / "lora.safetensors").exists()
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3]
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, *COMMON))
    assert "resuming from" in proc.stderr and "at step 3" in proc.stderr
    assert _identical(_lora(out), _lora(reference_run))
    starts = [e for e in _events(out) if e["event"] == "start"]
    assert starts[-1]["start_step"] == 3
    # validation across the kill: the same numbers as the uninterrupted run, and the best is its checkpoint
    validation = {e["step"]: e["loss"] for e in _events(out) if e["event"] == "validation"}
    reference = {e["step"]: e["loss"] for e in _events(reference_run) if e["event"] == "validation"}
    assert validation == reference and sorted(reference) == [0, 3, 6, 8]
    best = _events(reference_run)[-1]["best"]
    assert best["step"] == min(reference, key=reference.get) and "lowest validation loss" in best["reason"]
    best_lora = load_file(reference_run / "best.safetensors")
    saved = checkpoint.load_checkpoint(checkpoint.checkpoint_dir(reference_run, best["step"]))["lora"]
    assert all(v.dtype == torch.float32 for v in saved.values())  # checkpoints stay fp32, exports are bf16
    assert _identical({k.removeprefix("transformer."): v for k, v in best_lora.items()},
                      {k: v.to(torch.bfloat16) for k, v in saved.items()})


def test_torchrun_restart_resumes_by_itself(tiny_model, cache_dir, tmp_path, reference_run):
    out = tmp_path / "restarted"
    torchrun(2, *train_args(tiny_model, cache_dir, out, *COMMON), extra=["--max-restarts=1"],
             env=cli_env(FLUX_LORA_FAULT="kill@5:1"))
    assert _identical(_lora(out), _lora(reference_run))


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _wait_for_progress(out, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "events.jsonl").is_file() and '"progress"' in (out / "events.jsonl").read_text():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError("no progress event")


def test_sigterm_single_process_checkpoints_and_exits_3(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "flux_lora", *map(str, train_args(tiny_model, cache_dir, out, "--steps", "100000",
                                                                   "--checkpoint-every", "100000"))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    _wait_for_progress(out, proc)
    second = run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "3", "--overwrite"))  # one run at a time
    assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr and "in use by another flux_lora run" in second.stderr
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 3, err
    assert "rerun the same command to resume" in err
    stopped = [e for e in _events(out) if e["event"] == "stopped"]
    step = checkpoint.list_checkpoints(out)[-1][0]
    assert stopped and f"stopped at step {step}" in stopped[0]["message"]


def test_sigusr1_to_workers_under_torchrun(tiny_model, cache_dir, tmp_path):
    """What the SLURM wrapper does before preemption: USR1 to every worker."""
    out = tmp_path / "usr1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "flux_lora",
           *map(str, train_args(tiny_model, cache_dir, out, "--steps", "100000", "--checkpoint-every", "100000"))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    _wait_for_progress(out, proc)
    os.kill(_children(proc.pid)[0], signal.SIGUSR1)  # one rank only: the decision is shared
    err = proc.communicate(timeout=60)[1]
    assert err.count("rerun the same command to resume") == 1, err  # rank 0 speaks for all
    ckpts = checkpoint.list_checkpoints(out)
    assert len(ckpts) == 1
    assert _events(out)[-1]["event"] == "stopped"
    # and the run continues from there
    torchrun(2, *train_args(tiny_model, cache_dir, out, "--steps", str(ckpts[0][0] + 2)))
    assert _events(out)[-1]["event"] == "done"


def test_workers_end_with_a_killed_torchrun_agent(tiny_model, cache_dir, tmp_path):
    """SIGKILL of the agent (an OOM kill, a scancel -9) must not leave workers training on as
    orphans holding the GPUs: they stop as if asked to (checkpoint, `stopped`)."""
    out = tmp_path / "orphans"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "flux_lora",
           *map(str, train_args(tiny_model, cache_dir, out, "--steps", "100000", "--checkpoint-every", "100000"))]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=cli_env(), cwd=ROOT)
    _wait_for_progress(out, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.time() < deadline, "workers kept running after their agent was killed"
        time.sleep(0.2)
    assert _events(out)[-1]["event"] == "stopped" and checkpoint.list_checkpoints(out)


def _state(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_failing_rank_ends_the_job_fast(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "fail"
    t0 = time.time()
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, "--steps", "50"), check=False,
                    env=cli_env(FLUX_LORA_FAULT="raise@3:1"))
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "rank 1: failed: RuntimeError: injected failure at step 3" in proc.stderr
    assert "rank 0: error: rank 1 failed: RuntimeError: injected failure at step 3" in proc.stderr
    end = _events(out)[-1]  # rank 0 saw only a broken connection; the event has rank 1's own cause
    assert end["event"] == "error" and end["rank"] == 1 and end["exit_code"] == 5
    assert end["message"] == "rank 1 failed: RuntimeError: injected failure at step 3"


def test_non_finite_steps_skipped_then_diverged(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "nan"
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "4"), env=cli_env(FLUX_LORA_FAULT="nan@2"), check=True)
    warnings = [e for e in _events(out) if e["event"] == "warning"]
    assert len(warnings) == 1 and "non-finite" in warnings[0]["message"]
    assert all(torch.isfinite(v).all() for v in _lora(out).values())
    out2 = tmp_path / "diverge"
    proc = run_cli(*train_args(tiny_model, cache_dir, out2, "--steps", "20", "--set", "train.max_nonfinite=3"),
                   env=cli_env(FLUX_LORA_FAULT="nan@3-20"))
    assert proc.returncode == 4 and "non-finite 3 steps in a row" in proc.stderr
    assert _events(out2)[-1]["event"] == "error" and _events(out2)[-1]["exit_code"] == 4
    step, path = checkpoint.list_checkpoints(out2)[-1]
    assert step == 5
    ck = checkpoint.load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in ck["lora"].values())


def test_a_crash_that_is_not_ours_still_ends_the_events(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "crash"
    proc = run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "5"), env=cli_env(FLUX_LORA_FAULT="raise@2"))
    assert proc.returncode == 1
    end = _events(out)[-1]
    assert end["event"] == "error" and end["exit_code"] == 1
    assert end["message"] == "rank 0: RuntimeError: injected failure at step 2"


def test_full_disk_keeps_previous_checkpoint(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "disk"
    proc = run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "10", "--checkpoint-every", "2"),
                   env=cli_env(FLUX_LORA_FAULT="enospc@4"))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "No space left on device" in line and "previous checkpoint is intact" in line
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [2]
    assert checkpoint.latest_valid(out)[0] is not None
    assert not list((out / "checkpoints").glob(".*tmp"))


def test_resume_with_changed_math_is_refused(tiny_model, other_tiny_model, cache_dir, tmp_path):
    out = tmp_path / "changed"
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "2"), check=True)
    proc = run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "4", "--lr", "5e-4"))
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "0.0001 -> 0.0005" in proc.stderr
    # another base transformer (same VAE and text encoders, so the cache still fits) is refused too
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_model, swapped)
    shutil.rmtree(swapped / "transformer")
    shutil.copytree(other_tiny_model / "transformer", swapped / "transformer")
    proc = run_cli(*train_args(swapped, cache_dir, out, "--steps", "4"))
    assert proc.returncode == 2 and "model (family, transformer config and weights)" in proc.stderr
    proc = run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "4", "--no-resume"))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "3", "--no-resume", "--overwrite"), check=True)
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3]


def test_unwritable_output(tiny_model, cache_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli(*train_args(tiny_model, cache_dir, tmp_path / "file" / "out", "--steps", "1"))
    assert proc.returncode == 2 and "not writable" in proc.stderr


def test_keep_last_k_and_corrupt_latest_falls_back(tmp_path):
    sd = {"w": torch.ones(2)}
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, sd, {"optimizer": {}, "scheduler": {}}, {}, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
    with as_rank(1):
        assert checkpoint.save_checkpoint(tmp_path, 5, sd, {}, {}, keep=2) is None  # only rank 0 writes
    (checkpoint.checkpoint_dir(tmp_path, 4) / "optimizer.pt").write_bytes(b"garbage")
    latest, corrupt = checkpoint.latest_valid(tmp_path)
    assert latest == checkpoint.checkpoint_dir(tmp_path, 3)
    assert [d.name for d, _ in corrupt] == ["step-000004"] and "truncated" in corrupt[0][1]
    (tmp_path / "checkpoints" / ".step-000009.tmp").mkdir()  # a crash mid-write
    assert checkpoint.latest_valid(tmp_path)[0] == checkpoint.checkpoint_dir(tmp_path, 3)


def test_pruning_keeps_the_newest_readable_checkpoints(tmp_path):
    """A resumed run writes good checkpoints below corrupt higher-numbered ones: pruning must keep
    the good ones and drop the corrupt ones (a corrupt file of the same size is caught by decoding)."""
    sd = {"w": torch.ones(2)}
    for step in (6, 8):
        checkpoint.save_checkpoint(tmp_path, step, sd, {"optimizer": {}, "scheduler": {}}, {}, keep=5)
        optimizer = checkpoint.checkpoint_dir(tmp_path, step) / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:10])  # truncated
    for step in (2, 4):
        checkpoint.save_checkpoint(tmp_path, step, sd, {"optimizer": {}, "scheduler": {}}, {}, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 4]
    same_size = checkpoint.checkpoint_dir(tmp_path, 4) / "optimizer.pt"
    same_size.write_bytes(b"\0" * same_size.stat().st_size)
    latest, corrupt = checkpoint.latest_valid(tmp_path)
    assert latest == checkpoint.checkpoint_dir(tmp_path, 2) and "decoding" in corrupt[0][1]


def test_all_checkpoints_unreadable_stops_instead_of_starting_over(tmp_path):
    from flux_lora.config import build_config
    from flux_lora.errors import CheckpointError
    from flux_lora.training import train

    sd = {"w": torch.ones(2)}
    for step in (2, 4):
        checkpoint.save_checkpoint(tmp_path, step, sd, {"optimizer": {}, "scheduler": {}}, {}, keep=2)
        (checkpoint.checkpoint_dir(tmp_path, step) / "optimizer.pt").write_bytes(b"")
    cfg = build_config(None, {"output.dir": str(tmp_path)})
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is unreadable \(step-000004"):
        train.choose_resume(cfg, tmp_path)
    checkpoint.save_checkpoint(tmp_path, 1, sd, {"optimizer": {}, "scheduler": {}}, {}, keep=2)
    resume_from, notes = train.choose_resume(cfg, tmp_path)
    assert resume_from.endswith("step-000001") and len(notes) == 0  # pruning removed the unreadable ones


def test_resume_from_a_file_or_a_missing_folder_says_which(tmp_path):
    from flux_lora.config import build_config
    from flux_lora.errors import CheckpointError
    from flux_lora.training import train

    (tmp_path / "lora.safetensors").write_bytes(b"x")
    for target, said in ((tmp_path / "lora.safetensors", r"is a file; point it at a checkpoint folder.*--init-lora"),
                         (tmp_path / "nowhere", r"nowhere does not exist; point it at OUTPUT/checkpoints/step-NNNNNN")):
        cfg = build_config(None, {"output.dir": str(tmp_path / "out"), "output.resume_from": str(target)})
        with pytest.raises(CheckpointError, match=said):
            train.choose_resume(cfg, tmp_path / "out")


def test_resume_reads_the_validated_checkpoint_once(tmp_path, monkeypatch):
    sd = {"w": torch.ones(2)}
    checkpoint.save_checkpoint(tmp_path, 1, sd, {"optimizer": {}, "scheduler": {}}, {}, keep=2)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    d = checkpoint.latest_valid(tmp_path)[0]
    assert torch.equal(checkpoint.load_checkpoint(d)["lora"]["w"], sd["w"])
    assert len(loads) == 1  # validated once, handed to the resume
    checkpoint.load_checkpoint(d)
    assert len(loads) == 2  # a later load reads the files again
    checkpoint.latest_valid(tmp_path)
    checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"optimizer": {}, "scheduler": {}}, {}, keep=2)
    assert torch.equal(checkpoint.load_checkpoint(d)["lora"]["w"], torch.zeros(2))  # rewritten: not the kept copy


def test_cuda_graphs_asked_for_on_the_cpu_is_one_clear_line(tiny_model, cache_dir, tmp_path):
    proc = run_cli(*train_args(tiny_model, cache_dir, tmp_path / "graphs", "--steps", "1", "--set", "train.cuda_graphs=on"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train.cuda_graphs=on needs CUDA")
