"""scripts/bench.py must not rot: its --tiny mode runs the same code paths on CPU.
    pytest -q tests/test_bench.py"""

import json

import forked_cli
import pytest
from conftest import ROOT, cli_env


def _bench(kind, out, *flags):
    proc = forked_cli.run([kind, "--tiny", "--out", str(out), *flags], cli_env(), str(ROOT), 300, script="scripts/bench.py")
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


def test_bench_counts_the_fp8_matmuls_apart(tmp_path):
    """The fp8 base's matmuls are counted apart from the rest (for an MFU against the fp8 peak,
    which the CPU has none of); a bf16 base has none."""
    report = _bench("train", tmp_path / "b.json", "--fp8-compute", "on", "--compare-bf16", "--no-baseline")
    fp8_run, bf16_run = report["results"]
    assert fp8_run["fp8_base"] and not bf16_run["fp8_base"]
    assert 0 < fp8_run["fp8_matmul_tflop_per_sample"] < fp8_run["tflop_per_sample"]
    assert bf16_run["fp8_matmul_tflop_per_sample"] == 0
    assert report["peak_fp8_tflops"] is None and "mfu_fp8_aware" not in fp8_run


def test_fp8_aware_mfu_counts_each_matmul_at_its_own_peak():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 8 of 10 TFLOP a sample on fp8 tensor cores twice as fast: 0.4 + 0.2 s a sample at the peaks
    assert bench.fp8_aware_mfu(10.0, 8.0, 1.0, bf16_peak=10.0, fp8_peak=20.0) == pytest.approx(0.6)
    # with no fp8 matmuls, or an fp8 peak no faster, it is the plain MFU
    assert bench.fp8_aware_mfu(10.0, 0.0, 0.5, 10.0, 20.0) == pytest.approx(0.5)
    assert bench.fp8_aware_mfu(10.0, 8.0, 0.5, 10.0, 10.0) == pytest.approx(0.5)


def test_gpu_clock_samples_summarised(monkeypatch):
    """bench.py's record of the clock a GPU held under its power limit: nvidia-smi's CSV lines
    summarised (unparseable ones skipped); nothing sampled on the CPU."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_clocks

    with gpu_clocks.Sampler(torch.device("cpu")) as cpu:
        pass
    assert cpu.summary() == {}
    sampler = gpu_clocks.Sampler(torch.device("cpu"))
    sampler.lines = ["1980, 120.5, 0x0000000000000000", "1635, 689.1, 0x0000000000000004",
                     "1530, 693.4, 0x0000000000000004", "[N/A], [N/A], [N/A]"]
    got = sampler.summary()
    assert got["sm_mhz_median"] == 1635 and got["sm_mhz_min"] == 1530 and got["power_w_median"] == 689.1
    assert got["power_capped_share"] == pytest.approx(2 / 3) and got["samples"] == 3
