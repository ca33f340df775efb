"""Directories a run writes (flux_lora.outputs.run_dir): --overwrite removes only what runs of ours
wrote, a folder we did not make is never emptied, one run at a time holds a folder, and a failing
rank's own cause reaches rank 0.   pytest -q tests/test_run_dir.py"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import run_cli, train_args
from flux_lora.outputs import run_dir
from flux_lora.outputs.run_dir import DirectoryError


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_removes_only_our_names_and_only_in_our_folders(tmp_path):
    user = tmp_path / "u"
    user.mkdir()
    for name in ("photo.png", "mine.yaml", "notes.txt"):
        (user / name).write_text("the user's")
    run_dir.claim(user, "output", "--output")  # someone else's files, none with our names: usable
    (user / "lora.safetensors").write_text("ours")
    (user / "checkpoints" / "step-000002").mkdir(parents=True)
    (user / "samples").mkdir()
    (user / "samples" / "step-000002.png").write_text("ours")
    (user / "samples" / "holiday.png").write_text("the user's")
    removed = run_dir.remove_ours(user, "output")
    assert sorted(removed) == ["checkpoints/step-000002", "lora.safetensors", "samples/step-000002.png"]
    assert _tree(user) == [".flux_lora", "mine.yaml", "notes.txt", "photo.png", "samples", "samples/holiday.png"]


def test_a_folder_we_did_not_make_is_never_emptied(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "config.yaml").write_text("k: v")  # a name a run writes
    (folder / "thesis.tex").write_text("...")
    assert run_dir.remove_ours(folder, "output") == []  # no marker: nothing removed
    with pytest.raises(DirectoryError, match=r"holds files flux_lora did not write \(e.g. thesis.tex\)"):
        run_dir.claim(folder, "output", "--output")
    assert _tree(folder) == ["config.yaml", "thesis.tex"]
    legacy = tmp_path / "old-run"  # a run of ours from before markers: adopted
    (legacy / "checkpoints" / "step-000004").mkdir(parents=True)
    (legacy / "events.jsonl").write_text("")
    run_dir.claim(legacy, "output", "--output")
    assert (legacy / ".flux_lora").is_file()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DirectoryError, match="is a file, not a directory"):
        run_dir.claim(tmp_path / "a-file", "cache", "--cache-dir")


def test_train_overwrite_keeps_the_users_files(tiny_model, cache_dir, images, tmp_path):
    """The reported case: --output pointed at a folder of the user's images and YAML."""
    user = tmp_path / "u"
    user.mkdir()
    for f in sorted(images.iterdir())[:3]:
        (user / f.name).write_bytes(f.read_bytes())
    (user / "mine.yaml").write_text("k: v\n")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    run_cli(*train_args(tiny_model, cache_dir, user, "--steps", "1", "--overwrite"), check=True)
    run_cli(*train_args(tiny_model, cache_dir, user, "--steps", "1", "--overwrite"), check=True)
    assert all((user / name).read_bytes() == data for name, data in before.items())
    assert (user / "lora.safetensors").is_file()


def test_a_cache_is_never_an_output_nor_an_output_a_cache(tmp_path):
    """Both write config.yaml and events.jsonl: one in the other's folder would replace them."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    run_dir.claim(cache, "cache", "--cache-dir")
    run_dir.claim(out, "output", "--output")
    with pytest.raises(DirectoryError, match=r"--output .*cache is a cache \(preprocess wrote it; train reads it\); "
                                             r"its files would be replaced: choose another --output"):
        run_dir.claim(cache, "output", "--output")
    with pytest.raises(DirectoryError, match=r"--cache-dir .*out is a training output"):
        run_dir.claim(out, "cache", "--cache-dir")
    run_dir.claim(cache, "cache", "--cache-dir")  # its own kind: still ours


def test_train_into_its_own_cache_refuses_and_changes_nothing(tiny_model, cache_dir):
    before = {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()}
    result = run_cli(*train_args(tiny_model, cache_dir, cache_dir, "--steps", "1"))
    assert result.returncode != 0
    assert f"--output {cache_dir} is a cache" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()} == before


def test_a_second_run_refuses_at_once_naming_the_first(tmp_path):
    folder = tmp_path / "out"
    run_dir.claim(folder, "output", "--output")
    first = run_dir.Lock(folder, "--output").acquire()
    try:
        with pytest.raises(DirectoryError, match=rf"in use by another flux_lora run \(host {socket.gethostname()}, pid {os.getpid()}"):
            run_dir.Lock(folder, "--output").acquire()
        assert run_dir.lock_state(folder) == "held"
    finally:
        first.release()
    assert run_dir.lock_state(folder) == "absent"


def test_a_killed_runs_lock_is_taken_over(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / run_dir.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job": ""}))
    assert run_dir.lock_state(folder) == "stale"  # its process is gone
    run_dir.Lock(folder, "--output").acquire().release()
    (folder / run_dir.LOCK).write_text(json.dumps({"host": "another-node", "pid": 1, "job": ""}))
    assert run_dir.lock_state(folder) == "held"  # another host: alive while its heartbeat is fresh
    old = time.time() - run_dir.STALE_S - 5
    os.utime(folder / run_dir.LOCK, (old, old))
    assert run_dir.lock_state(folder) == "stale"
    (folder / run_dir.LOCK).write_text(json.dumps({"host": "another-node", "pid": 1, "job": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto another node
    run_dir.Lock(folder, "--output").acquire().release()


def test_failure_notes_reach_rank_0(tmp_path):
    run_dir.note_failure(tmp_path, "run1", 1, ValueError("bad shard on rank 1"))
    note = run_dir.peer_failure(tmp_path, "run1", me=0, wait_s=0)
    assert note["rank"] == 1 and note["type"] == "ValueError" and "bad shard" in note["message"]
    assert run_dir.peer_failure(tmp_path, "run1", me=1, wait_s=0) is None  # its own note is not a peer's
    run_dir.clear_failures(tmp_path, keep="run2")
    assert run_dir.peer_failure(tmp_path, "run1", me=0, wait_s=0) is None
