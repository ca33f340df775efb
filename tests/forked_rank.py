"""A torchrun worker that runs as a process forked from a zygote which imported the libraries
(tests/forked_rank_zygote.py), for tests/conftest.py's `torchrun`: each rank of a fresh
interpreter spends ~6 s of a CPU core on imports, and the suite starts ~70 of them.

torchrun starts this script (standard library only: ~30 ms) as its worker. It hands the zygote its
command line, environment (RANK, MASTER_PORT, ...), working directory and stdin/stdout/stderr; the
zygote forks the rank, which runs `python -m flux_lora ARGS` (or a script) there. This process stays
as the rank's stand-in for torchrun:
- signals torchrun or a test sends it (SIGTERM, SIGINT, SIGUSR1, ...) go on to the rank;
- if torchrun's agent dies, it gets SIGTERM (as flux_lora's ranks ask for themselves) and passes it on;
- it ends as the rank ended: the same exit code, or killed by the same signal.
An environment the zygote cannot give a forked child (a variable that a library reads at import)
makes it run the command in this process instead: `exec python ...`, a fresh interpreter.

    python forked_rank.py -m flux_lora ARGS...      or      python forked_rank.py SCRIPT ARGS..."""

import ctypes
import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ZYGOTE_ENV = "FLUX_LORA_TEST_ZYGOTE"  # the zygote's socket path, set by tests/conftest.py
_zygote = None
started_with: dict = {}  # the environment the zygote was started with (tests/test_forked_rank.py's base)


def start_zygote(root: str) -> str:
    """Start this pytest process's zygote (once); returns its socket path, for ZYGOTE_ENV, or ""
    if it could not start (the ranks are then fresh interpreters, as without it)."""
    global _zygote
    if _zygote is None:
        import atexit
        import shutil
        import subprocess
        import tempfile

        # a short path: a socket's is limited to 107 bytes, which a long TMPDIR could pass
        folder = tempfile.mkdtemp(prefix="flux_lora_zygote_", dir="/tmp" if os.path.isdir("/tmp") else None)
        path = os.path.join(folder, "sock")
        tests = os.path.join(root, "tests")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, root, os.environ.get("PYTHONPATH")]))}
        started_with.update(env)
        proc = subprocess.Popen([sys.executable, os.path.join(tests, "forked_rank_zygote.py"), path],
                                stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        atexit.register(lambda: (proc.kill(), proc.wait(), shutil.rmtree(folder, ignore_errors=True)))
        ready = proc.stdout.readline().strip() == "ready"
        if not ready:
            print(f"forked_rank: the zygote did not start (exit code {proc.poll()}); torchrun's ranks start fresh",
                  file=sys.stderr)
        _zygote = path if ready else ""
    return _zygote


def _fresh(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *argv])


def main(argv: list[str]) -> None:
    path = os.environ.get(ZYGOTE_ENV)
    if not path:
        _fresh(argv)
    pending, child = [], [0]

    def forward(signum, _frame):
        if child[0]:
            os.kill(child[0], signum)
        else:
            pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the agent's death reaches us
    payload = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    socket.send_fds(sock, [struct.pack("!Q", len(payload))], [0, 1, 2])
    sock.sendall(payload)
    replies = sock.makefile("r")
    first = replies.readline().split()
    if not first:
        sys.exit("forked_rank: the zygote closed the connection")
    if first == ["fresh"]:
        sock.close()
        _fresh(argv)
    child[0] = int(first[1])
    for signum in pending:
        os.kill(child[0], signum)
    last = replies.readline().split()
    if not last:
        sys.exit("forked_rank: the zygote's monitor went away")
    status = int(last[1])
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)  # (SIGKILL and most others were never caught)
        os.kill(os.getpid(), signum)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main(sys.argv[1:])
