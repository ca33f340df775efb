"""Shared fixtures: the tiny model, synthetic images, a finished cache, and CLI/torchrun runners.

    .venv/bin/python -m pytest -q tests
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import forked_cli
import forked_rank

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--resolution", "64", "--max-sequence-length", "32", "--num-workers", "0"]


def cli_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_cli(*args, timeout: float = 300, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m flux_lora ARGS` in a process of its own, forked with the libraries imported
    (tests/forked_cli.py): what subprocess.run gives, ~5 s of imports sooner."""
    proc = forked_cli.run(list(map(str, args)), env or cli_env(), str(ROOT), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"flux_lora {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def torchrun(nproc: int, *args, timeout: float = 300, check: bool = True, module: bool = True,
             extra: list[str] | None = None, env: dict | None = None, fork: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N -m flux_lora ARGS` (gloo on CPU). With `fork`, each rank is a
    process forked from a zygote that imported the libraries (tests/forked_rank.py): ~6 s of a
    core sooner each; torchrun's agent, rendezvous, signals and exit codes are as they were."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *(extra or [])]
    env = dict(env or cli_env())
    zygote = forked_rank.start_zygote(str(ROOT)) if fork else ""
    if zygote:
        env[forked_rank.ZYGOTE_ENV] = zygote
        cmd.append(str(ROOT / "tests" / "forked_rank.py"))
    cmd += (["-m", "flux_lora"] if module else []) + list(map(str, args))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from flux_lora.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """Same architecture, different random weights: a cache built for it must not train tiny_model."""
    from flux_lora.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny2") / "flux", seed=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    from flux_lora.data.demo import make_images

    out = tmp_path_factory.mktemp("images")
    make_images(out, count=8)
    return out


def preprocess_args(model: Path, data: Path | str, cache: Path, *extra) -> list:
    return ["preprocess", "--model", model, "--data", data, "--cache-dir", cache, *TINY_ARGS,
            "--captioner", Path(model) / "captioner", "--trigger-word", "sks", *extra]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, tiny_model, images) -> Path:
    """A finished cache (1 process) of the 8 synthetic images, with two sample prompts."""
    cache = tmp_path_factory.mktemp("cache") / "c"
    run_cli(*preprocess_args(tiny_model, images, cache, "--sample-prompt", "sks, a red circle",
                             "--sample-prompt", "sks, a blue square"), check=True)
    return cache


def train_args(model: Path, cache: Path, out: Path, *extra) -> list:
    return ["train", "--model", model, "--cache-dir", cache, "--output", out, "--lora-rank", "4", *extra]


# the longest files first: `-n 2 --dist loadfile` hands files to the two workers in collection
# order, so long files at the end would leave one worker waiting (longest-first keeps them even)
LONGEST_FIRST = ["test_checkpoint.py", "test_fsdp.py", "test_learn_check.py", "test_slurm.py", "test_compiled_blocks.py",
                 "test_preprocess.py", "test_families_train.py", "test_session.py", "test_quality.py", "test_train.py",
                 "test_bench.py", "test_resolutions.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their own order
