"""`python -m flux_lora ARGS` (or `python scripts/X.py ARGS`) as a process forked from a server
that has imported the libraries.

A fresh interpreter spends ~5 s of a CPU core importing torch, diffusers, transformers and peft
before a tiny-model command does ~2 s of work; the suite runs ~90 single-process commands. Here
each one is a child of a multiprocessing fork server started once per pytest worker, which
imported those libraries (and flux_lora's modules, which the CLI imports the same way) before any
test ran: the child starts with them in memory and runs `flux_lora.cli.main` or the script, in its
own process (own exit code, signals, files), with the environment, working directory, stdout and
stderr a subprocess would have.

What a fork cannot give a child (an environment variable that a library reads while it is
imported) sends the command to a real subprocess: see `needs_fresh_interpreter`. torchrun's ranks
are forked likewise, from a zygote of their own (tests/forked_rank.py).
"""

from __future__ import annotations

import io
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile

# read while these libraries are imported: a child whose environment differs here needs its own
IMPORT_TIME_ENV = ("TORCH", "PYTORCH", "TRITON", "OMP_", "MKL", "CUDA", "HF_", "HUGGINGFACE", "TRANSFORMERS",
                   "DIFFUSERS", "TOKENIZERS", "PYTHON")
EMULATED_ENV = ("PYTHONPATH", "PYTHONUNBUFFERED")  # the child imports flux_lora from this checkout, writes unbuffered
RUNTIME_ENV = ("TORCHELASTIC_", "TORCH_NCCL_")  # torchrun's, for its workers: read when used, not at import
# what flux_lora itself sets after its imports (so read when used): a test that ran flux_lora code in
# the pytest process leaves them in os.environ, which must not send every later command to a fresh interpreter
SET_BY_FLUX_LORA = ("HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM", "TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE",
                    "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUBLAS_WORKSPACE_CONFIG")
PRELOAD = ["forked_cli_preload"]
_context = None


def needs_fresh_interpreter(env: dict, base: dict | None = None) -> bool:
    """Whether `env` differs from `base` (this process's environment, with which the server was
    started) in a variable that the preloaded libraries read at import."""
    base = os.environ if base is None else base
    keys = {k for k in {*env, *base} if k.startswith(IMPORT_TIME_ENV) and k not in EMULATED_ENV + SET_BY_FLUX_LORA
            and not k.startswith(RUNTIME_ENV)}
    return any(env.get(k) != base.get(k) for k in keys)


def _server():
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        # the server imports PRELOAD from its own sys.path (Python 3.11 ignores the one handed to it)
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), before]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.pop("PYTHONPATH") if before is None else os.environ.update(PYTHONPATH=before)
        _context = context
    return _context


def _child(argv: list[str], env: dict, cwd: str, out_path: str, err_path: str, script: str | None) -> None:
    """In the forked child: stdout and stderr to their files, then child_main."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    child_main(argv, env, cwd, script)


def child_main(argv: list[str], env: dict, cwd: str, script: str | None) -> None:
    """The subprocess's surroundings (its stdio already on fds 0-2), then the CLI (which ends the
    process) or the script (whose SystemExit or exception the caller handles, as an interpreter
    would). Also the rank of tests/forked_rank_zygote.py."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # PYTHONUNBUFFERED, as cli_env asks of a subprocess
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", write_through=True,
                                  errors="backslashreplace")
    if script is not None:
        sys.argv = [script, *argv]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` puts it first
        runpy.run_path(script, run_name="__main__")
        return
    sys.argv = [os.path.join(cwd, "flux_lora", "__main__.py"), *argv]
    from flux_lora.cli import main

    main()
    os._exit(0)  # main ends the process itself; this only guards against a return


def run(argv: list[str], env: dict, cwd: str, timeout: float, script: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run([python, -m, flux_lora, *argv], capture_output=True, text=True, ...), forked;
    with `script`, [python, script, *argv]."""
    args = [sys.executable, *([script] if script else ["-m", "flux_lora"]), *argv]
    if needs_fresh_interpreter(env):
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    with tempfile.TemporaryDirectory(prefix="forked_cli_") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        proc = _server().Process(target=_child, args=(argv, env, cwd, out_path, err_path, script))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(args, timeout)
        with open(out_path, encoding="utf-8", errors="replace") as f, \
                open(err_path, encoding="utf-8", errors="replace") as g:
            return subprocess.CompletedProcess(args, proc.exitcode, f.read(), g.read())
