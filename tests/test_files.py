"""The one atomic writer (flux_lora.outputs.files): an interrupted write leaves the previous file
and no temp file, only rank 0 writes a run's files, permissions follow the umask.
    pytest -q tests/test_files.py"""

import json
import os
import stat

import pytest

from flux_lora.outputs import files
from helpers import as_rank


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_interrupted_write_keeps_the_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "manifest.json"
    files.write_atomic(path, {"v": 1}, as_json=True)

    def half_then_fail(f):
        f.write(b'{"v": 2, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.write_atomic(path, half_then_fail)
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_interrupted_library_write_and_directory_commit(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")

    def library_writes_then_dies(tmp):
        tmp.write_bytes(b"new but incomplete")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_file_from(target, library_writes_then_dies)
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []

    final = tmp_path / "checkpoints" / "step-000002"
    files.commit_dir(final, lambda d: files.write_atomic(d / "state.json", "{}", every_rank=True))

    def fail(d):
        files.write_atomic(d / "state.json", '{"step": 3}', every_rank=True)
        raise RuntimeError("killed mid-checkpoint")

    with pytest.raises(RuntimeError):
        files.commit_dir(final, fail)
    assert (final / "state.json").read_text() == "{}"
    assert _leftovers(final.parent) == []


def test_contents_of_each_kind_round_trip(tmp_path):
    files.write_atomic(tmp_path / "a.txt", "text é")
    files.write_atomic(tmp_path / "b.bin", b"\x00\x01")
    files.write_atomic(tmp_path / "c.bin", lambda f: f.write(b"by function"))
    files.write_atomic(tmp_path / "sub" / "d.json", [1, 2], as_json=True)  # parent folders are made
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "text é"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"by function"
    assert files.read_json(tmp_path / "sub" / "d.json") == [1, 2]
    assert files.read_json(tmp_path / "missing.json") is None


def test_only_rank_0_writes_a_runs_files_unless_every_rank_is_asked(tmp_path):
    with as_rank(1):
        assert files.write_atomic(tmp_path / "config.yaml", "x: 1") is None
        assert files.commit_dir(tmp_path / "ck", lambda d: None) is None
        assert files.open_append(tmp_path / "events.jsonl") is None
        assert files.write_atomic(tmp_path / "rank-00001.json", "{}", every_rank=True) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-00001.json"]


def test_files_keep_the_users_permissions(tmp_path):
    from safetensors.torch import save_file
    import torch

    old = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "a", b"x")
        files.write_file_from(tmp_path / "b", lambda p: p.write_bytes(b"x"))
        files.write_file_from(tmp_path / "c", lambda p: save_file({"w": torch.zeros(1)}, str(p)))  # creates 0600
    finally:
        os.umask(old)
    for name in "abc":
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
