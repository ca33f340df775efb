"""The zygote behind tests/forked_rank.py: imports what flux_lora's commands import
(forked_cli_preload), then serves a Unix socket. For each worker that connects it forks a monitor,
which forks the rank (the worker's environment, working directory and stdio, then
`flux_lora.cli.main` or the script) and reports the rank's pid and then its wait status.

    python forked_rank_zygote.py SOCKET_PATH      (tests/conftest.py starts one per pytest worker)"""

import ctypes
import faulthandler
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback

BASE_ENV = dict(os.environ)  # as this process was started: the preload below sets some defaults

import forked_cli  # noqa: E402
import forked_cli_preload  # noqa: E402, F401  (the point: imported once, here)
from flux_lora.cli import _leave  # noqa: E402


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = conn.recv(min(n, 1 << 16))
        if not chunk:
            raise ConnectionError("worker went away")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _rank(request: dict, fds: list[int]) -> None:
    """In the forked rank: the worker's stdio, environment and working directory, then its command.
    flux_lora's CLI ends the process itself; a script ends as an interpreter would end it."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    faulthandler.enable()  # a crash says where, on the worker's stderr
    argv, code = request["argv"], 0
    try:
        if argv[:2] == ["-m", "flux_lora"]:
            forked_cli.child_main(argv[2:], request["env"], request["cwd"], None)
        else:
            forked_cli.child_main(argv[1:], request["env"], request["cwd"], argv[0])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 1
    _leave(code)  # as flux_lora's CLI ends: threads joined, exit handlers run, output flushed


def _monitor(conn: socket.socket, request: dict, fds: list[int]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores it (auto-reap); waitpid needs it back
    pid = os.fork()
    if pid == 0:
        conn.close()
        try:
            _rank(request, fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)  # the rank alone holds the worker's stdio: torchrun sees EOF when it ends
    conn.sendall(f"pid {pid}\n".encode())
    _, status = _wait_unless_the_worker_dies(pid, conn)
    try:
        conn.sendall(f"status {status}\n".encode())
    except OSError:
        pass  # the worker is gone
    os._exit(0)


def _wait_unless_the_worker_dies(pid: int, conn: socket.socket) -> tuple[int, int]:
    """waitpid(pid), but SIGKILL the rank first if its worker dies (torchrun's SIGKILL after a
    stop's grace period, a test's kill): a killed worker takes its rank along, as a real rank would
    die, instead of leaving it training on beside the next run. The worker sends nothing after its
    request, so a readable connection means it closed."""
    try:
        watched = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll
        watched = None
    while True:
        ready, _, _ = select.select([conn] + ([watched] if watched is not None else []), [], [],
                                    None if watched is not None else 0.2)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return done, status
        if conn in ready:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)


def serve(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        request = json.loads(_read_exactly(conn, struct.unpack("!Q", header)[0]))
        if forked_cli.needs_fresh_interpreter(request["env"], BASE_ENV):
            conn.sendall(b"fresh\n")
        elif os.fork() == 0:
            server.close()
            try:
                _monitor(conn, request, fds)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        conn.close()


if __name__ == "__main__":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: ends with its pytest worker
    serve(sys.argv[1])
