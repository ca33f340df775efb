"""CLI contract: help, no torch import for --help, one-line errors.   pytest -q tests/test_cli.py"""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT, cli_env, run_cli
from flux_lora.cli import app

# each command's help names what a user needs first
COMMANDS = {"make-tiny": ["out_dir", "--seed"], "demo-data": ["--count"],
            "preprocess": ["--model", "--data", "--cache-dir", "--resolution", "--trigger-word", "--config", "--set"],
            "train": ["--model", "--cache-dir", "--output", "--steps", "--lr", "--resume", "--overwrite", "--set"],
            "sample": ["--model", "--prompt", "--lora", "--out"], "export": ["lora", "--out", "--format"],
            "watch": ["run_dir", "--serve", "127.0.0.1", "only"], "config-reference": ["Markdown"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_options_that_matter(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    missing = [word for word in COMMANDS[command] if word not in text]
    assert not missing, f"{command} --help lacks {missing}:\n{result.output}"


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from flux_lora.cli import app; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert out.stdout.strip() == "False", out.stderr


def _one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_model_path_is_one_line(tmp_path, images):
    proc = run_cli("preprocess", "--model", tmp_path / "nope", "--data", images, "--cache-dir", tmp_path / "c")
    line = _one_error_line(proc)
    assert proc.returncode == 2
    assert "does not exist" in line and "nope" in line


def test_unknown_set_key_is_one_line(tmp_path):
    proc = run_cli("train", "--set", "train.stepz=3")
    assert "train.stepz" in _one_error_line(proc)


def test_bad_config_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train: [1, 2\n")
    assert "not valid YAML" in _one_error_line(run_cli("train", "--config", y))


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("train", "--set", "train.stepz=3", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_folder_that_is_not_a_pipeline(tmp_path, images):
    (tmp_path / "model").mkdir()
    proc = run_cli("preprocess", "--model", tmp_path / "model", "--data", images, "--cache-dir", tmp_path / "c")
    assert "is not a diffusers FLUX pipeline" in _one_error_line(proc)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_model_folder_missing_a_part_names_it(tmp_path, tiny_model, images):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    proc = run_cli("preprocess", "--model", broken, "--data", images, "--cache-dir", tmp_path / "c")
    line = _one_error_line(proc)
    assert f"model folder {broken} has no vae/" in line and "Hub" not in line


def test_exit_waits_for_threads_and_skips_only_the_teardown(tmp_path):
    """cli.main ends with os._exit after what a normal exit does first: work queued on a thread
    pool finishes (an idle pool left open does not hang the exit), exit handlers run, the exit
    code and output get through."""
    done, handler = tmp_path / "pool-job", tmp_path / "atexit"
    script = f"""
import atexit, sys, time
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(max_workers=1)
pool.submit(lambda: (time.sleep(0.3), open({str(done)!r}, "w").write("ok")))
atexit.register(lambda: open({str(handler)!r}, "w").write("ran"))
sys.argv = ["flux_lora", "no-such-command"]
from flux_lora.cli import main
main()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "no-such-command" in proc.stderr  # click's usage error, its code
    assert done.read_text() == "ok" and handler.read_text() == "ran"
