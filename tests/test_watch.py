"""Events, `watch` (terminal) and `watch --serve` (Server-Sent Events over HTTP), the loss plot,
preview grids and the `sample` / `export` commands.   pytest -q tests/test_watch.py"""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from conftest import ROOT, cli_env, run_cli, train_args
from flux_lora.outputs.events import Reporter


@pytest.fixture(scope="module")
def finished_run(tiny_model, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "6", "--sample-every", "3", "--checkpoint-every", "3",
                        "--export-format", "kohya", "--json"), check=True)
    return out


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_events_are_ordered_and_complete(finished_run):
    events = _events(finished_run)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert all(e["v"] == 1 and e["stage"] == "train" for e in events)
    times = [e["time"] for e in events]
    assert times == sorted(times)
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6]
    assert [e["step"] for e in events if e["event"] == "sample"] == [0, 3, 6]  # step 0: the base model
    start = events[0]
    assert start["world_size"] == 1 and start["dataset_size"] == 8 and start["config"]["train"]["steps"] == 6


def test_event_losses_match_training_history(finished_run):
    from flux_lora.training.checkpoint import list_checkpoints, load_checkpoint

    progress = [e for e in _events(finished_run) if e["event"] == "progress"]
    history = load_checkpoint(list_checkpoints(finished_run)[-1][1])["state"]["loss_history"]
    assert [round(e["loss"], 6) for e in progress] == [round(h[1], 6) for h in history]


def test_loss_plot_and_sample_grids(finished_run):
    with Image.open(finished_run / "loss.png") as im:
        assert im.format == "PNG" and im.size == (800, 450)
    grids = sorted((finished_run / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000000.png", "step-000003.png", "step-000006.png"]
    with Image.open(grids[0]) as im:
        assert im.width == 2 * 64 and im.height > 64  # two prompts side by side, captions below
    assert (finished_run / "lora-kohya.safetensors").is_file()


def test_watch_finished_run_exits_0(finished_run):
    proc = run_cli("watch", finished_run, "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stdout + proc.stderr and "step 6/6" in proc.stdout + proc.stderr


def test_watch_failed_run_exits_1(tmp_path):
    rep = Reporter(tmp_path / "events.jsonl", "train")
    rep.start(10, "train", world_size=2, dataset_size=5, total_steps=10)
    rep.progress(1, step=1, total_steps=10, loss=0.5, avg_loss=0.5, learning_rate=1e-4, samples_per_s=1.0)
    rep.error("rank 1: RuntimeError: boom")
    rep.close()
    proc = run_cli("watch", tmp_path, "--timeout", "30")
    assert proc.returncode == 1 and "boom" in proc.stdout + proc.stderr


def test_watch_exits_with_the_runs_own_code_and_notices_a_run_that_is_gone(tmp_path):
    rep = Reporter(tmp_path / "events.jsonl", "train")
    rep.start(10, "train", world_size=1, dataset_size=5, total_steps=10)
    rep.error("loss was non-finite 5 steps in a row", exit_code=4)
    rep.close()
    assert run_cli("watch", tmp_path, "--timeout", "30").returncode == 4
    gone = tmp_path / "gone"
    rep = Reporter(gone / "events.jsonl", "train")
    rep.start(10, "train", world_size=1, dataset_size=5, total_steps=10)
    rep.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the run's process, killed: its lock stays behind with a pid that is gone
    (gone / ".flux_lora.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job": ""}))
    t0 = time.time()
    proc = run_cli("watch", gone, "--timeout", "60")
    assert proc.returncode == 1 and "gone without a done or error event" in proc.stderr
    assert time.time() - t0 < 30


def test_watch_ends_a_preprocess_with_all_ranks_totals(tmp_path):
    rep = Reporter(tmp_path / "events.jsonl", "preprocess")
    rep.start(12, "preprocess", world_size=2, dataset_size=12)
    rep.progress(6, done=6, total=12, progress=0.5, items_per_s=3.0)  # what rank 0 had seen
    rep.done(total_items=12, skipped=0, shards=2, encoded_items=12, items_per_s=5.5)
    rep.close()
    proc = run_cli("watch", tmp_path, "--timeout", "30")
    assert proc.returncode == 0 and "done: preprocess 12 items in the cache" in proc.stdout + proc.stderr


def test_watch_started_before_the_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "flux_lora", "watch", str(tmp_path), "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    first = proc.stderr.readline()  # the run starts once watch is waiting (its start-up varies with the load)
    rep = Reporter(tmp_path / "events.jsonl", "train")
    rep.start(2, "train", world_size=1, dataset_size=3, total_steps=2)
    for s in (1, 2):
        rep.progress(s, step=s, total_steps=2, loss=1.0, avg_loss=1.0, learning_rate=1e-4, samples_per_s=2.0)
        time.sleep(0.3)
    rep.done(steps=2)
    rep.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "waiting for" in first + err and "step 2/2" in out + err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sse_stream_of_a_live_run(tmp_path, tiny_model, cache_dir):
    out = tmp_path / "live"
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "flux_lora", "watch", str(out), "--serve", f"127.0.0.1:{port}"],
                              stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    received = []
    try:
        deadline = time.time() + 30
        while True:  # wait for the server to listen
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)

        def read_stream():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/events", timeout=120) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                for raw in resp:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        received.append(json.loads(line[6:]))

        reader = threading.Thread(target=read_stream)
        reader.start()  # connected before the run writes anything
        run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "5"), check=True)
        reader.join(timeout=60)
        assert not reader.is_alive(), "the stream must end after the done event"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/state", timeout=10) as resp:
            state = json.loads(resp.read())
            assert "Access-Control-Allow-Origin" not in resp.headers  # other sites' pages cannot read it
        rebound = urllib.request.Request(f"http://127.0.0.1:{port}/state", headers={"Host": "evil.example:80"})
        with pytest.raises(urllib.error.HTTPError, match="403"):  # DNS rebinding
            urllib.request.urlopen(rebound, timeout=10)
    finally:
        server.terminate()
        server.wait(timeout=10)
    kinds = [e["event"] for e in received]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert [e["step"] for e in received if e["event"] == "progress"] == [1, 2, 3, 4, 5]
    assert state["finished"] is True and state["exit_code"] == 0 and state["progress"]["step"] == 5


def test_sample_command_changes_with_lora(finished_run, tiny_model, tmp_path):
    common = ["sample", "--model", tiny_model, "--prompt", "sks, a red circle", "--size", "32", "--steps", "2",
              "--max-sequence-length", "32"]
    run_cli(*common, "--out", tmp_path / "base.png", check=True)
    run_cli(*common, "--lora", finished_run / "lora.safetensors", "--out", tmp_path / "lora.png", check=True)
    a, b = Image.open(tmp_path / "base.png"), Image.open(tmp_path / "lora.png")
    assert a.size == b.size == (32, 32)
    assert a.tobytes() != b.tobytes()
    # the kohya/ComfyUI export, at the tiny model's width (diffusers' own kohya reader assumes FLUX.1-dev's)
    run_cli(*common, "--lora", finished_run / "lora-kohya.safetensors", "--out", tmp_path / "kohya.png", check=True)
    assert Image.open(tmp_path / "kohya.png").tobytes() == b.tobytes()
    proc = run_cli(*common, "--lora", tmp_path / "missing.safetensors", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    proc = run_cli(*common, "--lora", tmp_path / "junk.safetensors", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "junk.safetensors is not a readable .safetensors file" in proc.stderr


def test_a_lora_of_another_model_is_one_line_naming_a_mismatch(finished_run, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(finished_run / "lora.safetensors")
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key] = weights[key][:-1].contiguous()  # another model's width
    save_file(weights, tmp_path / "other.safetensors")
    proc = run_cli("sample", "--model", tiny_model, "--prompt", "sks", "--size", "32", "--steps", "1",
                   "--max-sequence-length", "32", "--lora", tmp_path / "other.safetensors", "--out", tmp_path / "x.png")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # not diffusers' line per tensor before it
    assert "does not load into this FLUX.1 model (RuntimeError: size mismatch for" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_export_command(finished_run, tmp_path):
    from safetensors.torch import load_file

    run_cli("export", finished_run / "lora.safetensors", "--out", tmp_path / "k.safetensors", check=True)
    keys = load_file(tmp_path / "k.safetensors").keys()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.alpha" in keys
    proc = run_cli("export", tmp_path / "k.safetensors", "--out", tmp_path / "again.safetensors")  # not diffusers'
    assert proc.returncode == 2 and "not a diffusers-format FLUX LoRA" in proc.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    proc = run_cli("export", tmp_path / "junk.safetensors", "--out", tmp_path / "again.safetensors")
    assert proc.returncode == 2 and "not a readable .safetensors file" in proc.stderr


def test_json_flag_keeps_stdout_machine_readable(tiny_model, cache_dir, tmp_path):
    proc = run_cli(*train_args(tiny_model, cache_dir, tmp_path / "j", "--steps", "2", "--json"), check=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["v"] == 1 for line in lines)
    assert json.loads(lines[-1])["event"] == "done"


def test_loss_plot_draws_its_lines_where_the_values_are(tmp_path):
    """The curve falls from left to right as the loss does; a gap where a loss is not finite, a
    run of one step and a constant learning rate still draw."""
    from flux_lora.outputs import plot

    history = [(s, 1.0 - 0.5 * s / 100, 1e-4 * s / 100) for s in range(1, 101)]
    history[40] = (41, float("nan"), history[40][2])
    plot.write_loss_plot(tmp_path / "loss.png", history, [(50, 0.8), (100, 0.55)])
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG" and im.size == (800, 450)
        pixels = im.convert("RGB").load()
    blue = [(x, y) for x in range(800) for y in range(450)
            if sum(abs(c - t) for c, t in zip(pixels[x, y], plot.COLORS["average"])) < 40]
    left = [y for x, y in blue if 80 < x < 160]
    right = [y for x, y in blue if 400 < x < 480]  # left of the legend
    assert left and right and max(left) < min(right)  # higher loss higher up
    for history in ([(7, 0.3, 1e-4)], [(1, 0.5, 1e-4), (2, 0.5, 1e-4)]):
        plot.write_loss_plot(tmp_path / "one.png", history)
        with Image.open(tmp_path / "one.png") as im:
            assert im.size == (800, 450)
