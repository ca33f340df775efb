"""The test suite's forked torchrun ranks (tests/forked_rank.py) behave as the processes they stand
for: output, exit codes, deaths by signal, signals passed on, and a killed worker takes its rank
along. (flux_lora's own multi-rank behaviour is tested through them in test_checkpoint, test_fsdp, ...)"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import forked_rank
from conftest import ROOT

WORKER = str(ROOT / "tests" / "forked_rank.py")


def _env() -> dict:
    """The zygote's own environment: whatever earlier tests in this process left in os.environ, the
    ranks here are forked, not fresh interpreters."""
    path = forked_rank.start_zygote(str(ROOT))
    return {**forked_rank.started_with, forked_rank.ZYGOTE_ENV: path}


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "rank.py"
    path.write_text("import os, signal, sys, time\n" + body)
    return str(path)


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def test_output_exit_code_and_death_by_signal(tmp_path):
    script = _script(tmp_path, "print('out', os.environ['RANK']); print('err', file=sys.stderr); sys.exit(7)")
    proc = subprocess.run([sys.executable, WORKER, script], capture_output=True, text=True, env={**_env(), "RANK": "1"},
                          cwd=ROOT, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out 1\n", "err\n")
    script = _script(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, WORKER, script], env=_env(), cwd=ROOT, timeout=60).returncode == -signal.SIGKILL


def test_signals_pass_on_and_a_killed_worker_takes_its_rank_along(tmp_path):
    pid_file, got = tmp_path / "pid", tmp_path / "got"
    script = _script(tmp_path, f"signal.signal(signal.SIGUSR1, lambda *a: open({str(got)!r}, 'w').write('usr1'))\n"
                               f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                               "time.sleep(120)\n")
    worker = subprocess.Popen([sys.executable, WORKER, script], env=_env(), cwd=ROOT)
    try:
        _wait_for(lambda: pid_file.is_file() and pid_file.read_text())
        rank = int(pid_file.read_text())
        assert rank != worker.pid and not _gone(rank)
        worker.send_signal(signal.SIGUSR1)
        _wait_for(lambda: got.is_file() and got.read_text() == "usr1")
        worker.kill()  # what torchrun does to a worker that outlives its grace period
        worker.wait()
        _wait_for(lambda: _gone(rank), 10)
    finally:
        worker.kill()
