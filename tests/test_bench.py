"""scripts/bench.py must not rot: its --tiny mode runs the same code paths on CPU.
    pytest -q tests/test_bench.py"""

import json
import subprocess
import sys

from conftest import ROOT, cli_env


def _bench(kind, out, *flags):
    proc = subprocess.run([sys.executable, "scripts/bench.py", kind, "--tiny", "--out", str(out), *flags],
                          capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_train_tiny(tmp_path):
    report = _bench("train", tmp_path / "b.json")
    ours, baseline = report["results"]
    assert ours["samples_per_s"] > 0 and ours["tflop_per_sample"] > 0 and baseline["checkpointing"] == "on"
    assert report["speedup_vs_diffusers_setting"] > 0


def test_bench_compares_the_lora_forwards(tmp_path):
    report = _bench("train", tmp_path / "b.json", "--compare-up-add", "--no-baseline")
    ours, peft_forward = report["results"]
    assert ours["fuse_lora_up"] and not peft_forward["fuse_lora_up"]
    # same seeds and data: the losses agree to float rounding (fp32 on the CPU)
    assert report["loss_vs_up_add_toggled"]["max_abs_diff"] < 1e-4


def test_bench_preprocess_tiny(tmp_path):
    report = _bench("preprocess", tmp_path / "p.json")
    assert report["images"] == 6 and report["world_size"] == 1
    assert report["images_per_s"] > 0 and report["images_per_s_per_gpu"] == report["images_per_s"]
    timing = report["timing"][0]  # where the rank's time went: each encoder queued, the GPU and decoding waited
    assert timing["images_s"] > 0 and timing["text_s"] > 0 and timing["gpu_wait_s"] >= 0 and timing["decode_wait_s"] >= 0
