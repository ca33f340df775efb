"""`flux_lora plan` (training/plan.py): predicted peak memory and speed against the GPU runs
recorded in bench/results, the table and its verdict, and train's own check at start.

    pytest -q tests/test_plan.py
"""

import json

import pytest
import torch

from conftest import ROOT, run_cli
from flux_lora.config import LoraConfig, build_config
from flux_lora.models import families
from flux_lora.training import plan, sharding

RESULTS = ROOT / "bench" / "results"
S = plan.Setting
# (results file, entry, model, resolution, batch per GPU, GPUs, the setting that run used)
MEASURED = [
    ("2026-11-29_h200_train-512-after-layout.json", 0, "random:flux1-dev", 512, 4, 1, S("fast", "ddp", False, True)),
    # fp8 weights kept transposed too (train.fp8_transposed=auto: an H200 has room), the LoRA up-add by Triton
    ("2026-11-30_h200_s17-512-b4-one-node-down-vs-apart-vs-plain.json", 2, "random:flux1-dev", 512, 4, 1, S("fast", "ddp", False, True)),
    ("2026-11-30_h200_s17-1024-b1-vs-plain-lora.json", 0, "random:flux1-dev", 1024, 1, 1, S("fast", "ddp", False, True)),
    # no sync in the update, single blocks handing on two tensors, fp8 backward with fast accumulation
    ("2026-11-30_h200_s18-512-b4-final-vs-fast-accum-off-fresh-machine.json", 0, "random:flux1-dev", 512, 4, 1,
     S("fast", "ddp", False, True)),
    ("2026-11-30_h200_s18-1024-b1-final.json", 0, "random:flux1-dev", 1024, 1, 1, S("fast", "ddp", False, True)),
    ("2026-11-30_h200_s18-512-b4-bf16-final-profile.json", 0, "random:flux1-dev", 512, 4, 1, S("fast", "ddp", False, False)),
    ("2026-11-30_h200x2_one-gpu-bf16-1024.json", 0, "random:flux1-dev", 1024, 1, 1, S("fast", "ddp", False, False)),
    ("2026-11-26_h200_train-1024-fp8.json", 0, "random:flux1-dev", 1024, 1, 1, S("fp8", "ddp", True, False)),
    ("2026-11-26_h200_train-1024-nf4.json", 0, "random:flux1-dev", 1024, 1, 1, S("nf4", "ddp", True, False)),
    ("2026-11-30_h200x2_fsdp-1024.json", 0, "random:flux1-dev", 1024, 1, 2, S("fast", "fsdp", False, False)),
    ("2026-11-30_h200x2_fsdp-1024.json", 1, "random:flux1-dev", 1024, 1, 2, S("fast", "fsdp", True, False)),
    ("2026-11-30_h200x2_fsdp-flux2-dev-1024.json", 0, "random:flux2-dev", 1024, 1, 2, S("fast", "fsdp", False, False)),
    ("2026-11-30_h200x2_fsdp-flux2-dev-1024-checkpointed.json", 0, "random:flux2-dev", 1024, 1, 2, S("fast", "fsdp", True, False)),
    ("2026-11-29_h200_train-1024-flux2-dev-fp8.json", 0, "random:flux2-dev", 1024, 1, 1, S("fp8", "ddp", True, True)),
    ("2026-11-29_h200_train-1024-flux2-klein-4b.json", 0, "random:flux2-klein-4b", 1024, 1, 1, S("fast", "ddp", False, True)),
    ("2026-11-29_h200_train-1024-flux2-klein-9b.json", 0, "random:flux2-klein-9b", 1024, 1, 1, S("fast", "ddp", False, True)),
]


@pytest.mark.parametrize("name, entry, model, resolution, batch, gpus, setting", MEASURED)
def test_predictions_match_the_recorded_gpu_runs(name, entry, model, resolution, batch, gpus, setting):
    """Memory within 15% (the issue's aim; measured: within 7%), speed within 30% (within 5% but
    FLUX.2 [dev] sharded with checkpointing, 27% slow)."""
    report = json.loads((RESULTS / name).read_text())
    measured = report["results"][entry]
    sizes = sharding.planned_sizes(families.of_model(model), model, "", torch.bfloat16, LoraConfig())
    tokens = (resolution // 16) ** 2
    work = plan.Workload(tokens, tokens, report["text_len"], batch, 1, gpus, 100)
    # the GPU's size only where the run kept fp8 transposes (the runs before them had as much room)
    room = int(139 * 2**30) if measured.get("fp8_transposed_gib") else 0
    p = plan.predict(sizes, work, setting, plan.gpu_tflops("NVIDIA H200"), room)
    assert p.peak_gib == pytest.approx(measured["peak_mem_gib"], rel=0.15)
    assert p.samples_per_s == pytest.approx(measured["samples_per_s"], rel=0.30)


def test_flop_count_is_torchs_count():
    """The FLOPs formula against torch's FlopCounterMode count that bench.py recorded."""
    sizes = sharding.planned_sizes(families.of_model("random:flux1-dev"), "random:flux1-dev", "", torch.bfloat16,
                                   LoraConfig())
    for checkpointing, counted in ((False, 172.137219883008), (True, 246.953213952)):  # 2026-11-30_h200x2_fsdp-1024
        assert plan.flops_per_sample(sizes, 4096, 512, checkpointing) / 1e12 == pytest.approx(counted, rel=0.03)


def test_gpu_names():
    assert plan.gpu_tflops("NVIDIA H100 PCIe") == pytest.approx(756 * plan.MATMUL_FRACTION)
    assert plan.gpu_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989 * plan.MATMUL_FRACTION)
    assert plan.gpu_tflops("a toaster") is None
    assert plan.has_fp8("NVIDIA H200") and not plan.has_fp8("NVIDIA A100-SXM4-80GB")


def test_the_table_flags_what_does_not_fit(tiny_model, cache_dir):
    cfg = build_config(flags={"model.path": str(tiny_model), "data.cache_dir": str(cache_dir), "train.steps": 100,
                              "train.batch_size": 2})
    text, predictions = plan.report(cfg, 2, "NVIDIA H100 80GB HBM3", 80.0)
    assert "from the cache's 8 items" in text and "<- this run" in text and "NO" not in text
    assert {(p.setting.memory_mode, p.setting.sharding) for p in predictions} >= {("fast", "ddp"), ("fast", "fsdp"),
                                                                                 ("fp8", "ddp"), ("nf4", "ddp")}
    assert all(p.fits and p.run_hours > 0 for p in predictions)
    tight, predictions = plan.report(cfg, 2, "NVIDIA H100 80GB HBM3", 1e-5)
    assert "this run will NOT fit" in tight and all(p.fits is False for p in predictions)
    fsdp = [p for p in predictions if p.setting.sharding == "fsdp" and not p.setting.checkpointing][0]
    ddp = [p for p in predictions if p.setting.sharding == "ddp" and p.setting.memory_mode == "fast"
           and not p.setting.checkpointing][0]
    assert fsdp.peak_gib < ddp.peak_gib  # sharding saves memory ...
    assert fsdp.gpu_hours > ddp.gpu_hours  # ... and costs time


def test_train_checks_its_setting_at_start(tiny_model, cache_dir):
    from flux_lora.data import cache

    manifest = cache.load_manifest(cache_dir)
    family = families.of_model(str(tiny_model))
    sizes_of = lambda: sharding.planned_sizes(family, str(tiny_model), "", torch.float32, LoraConfig(rank=4))  # noqa: E731
    for budget, expect in ((1e-6, "needs ~"), (10.0, "")):
        cfg = build_config(flags={"model.path": str(tiny_model), "dist.gpu_memory_gib": budget})
        work = plan.workload_of(manifest, cfg, 1, False)
        line = plan.check_at_start(cfg, torch.device("cpu"), sizes_of, work, "ddp", False)
        assert (expect in line) if expect else line == ""
    assert "flux_lora plan" in plan.check_at_start(
        build_config(flags={"dist.gpu_memory_gib": 1e-6}), torch.device("cpu"), sizes_of, work, "ddp", False)


def test_plan_command_json(tiny_model, cache_dir):
    proc = run_cli("plan", "--model", tiny_model, "--cache-dir", cache_dir, "--steps", "10", "--gpus", "2",
                   "--gpu", "H200", "--gpu-memory-gib", "141", "--json", check=True)
    rows = json.loads(proc.stdout)
    assert rows and all(r["fits"] for r in rows) and {r["setting"]["sharding"] for r in rows} == {"ddp", "fsdp"}


def test_workload_counts_every_resolution():
    """Without a cache, data.resolutions' sizes; with one, every layer's items (the largest bucket
    for memory, the mean for time)."""
    cfg = build_config(flags={"data.resolutions": "512,1024"})
    work = plan.workload_of(None, cfg, 1, False)
    assert (work.image_tokens, work.mean_image_tokens) == (4096, (1024 + 4096) / 2)
    manifest = {"max_sequence_length": 512, "shards": [{}], "items": [[0, 0, 0, 512, 512], [1, 0, 1, 512, 512]],
                "layers": [{"shards": [{}], "items": [[0, 0, 0, 1024, 1024], [1, 0, 1, 1024, 1024]]}]}
    work = plan.workload_of(manifest, cfg, 1, False)
    assert (work.image_tokens, work.mean_image_tokens) == (4096, (1024 + 4096) / 2)


def test_auto_checkpoints_as_few_blocks_as_fit():
    """FLUX.2 [dev] on two GPUs planned for 60 GiB: neither none (~89 GiB) nor all of its 56 blocks
    (~38 GiB) but the fewest that fit, predicted faster than all of them."""
    model = "random:flux2-dev"
    sizes = sharding.planned_sizes(families.of_model(model), model, "", torch.bfloat16, LoraConfig())
    work = plan.Workload(4096, 4096, 512, 1, 1, 2, 100)
    budget = 60 * plan.GIB
    chosen = plan.setting_of(build_config(None, {"model.path": model}), "fsdp", False, sizes, work, budget)
    k = chosen.checkpointed_blocks(sizes.blocks)
    assert 0 < k < sizes.blocks and chosen.label(sizes.blocks) == f"on {k}/{sizes.blocks}"
    fits = [plan.predict(sizes, work, plan.Setting("fast", "fsdp", True, False, n / sizes.blocks), None, budget).fits
            for n in (k - 1, k)]
    assert fits == [False, True]
    tflops = plan.gpu_tflops("NVIDIA H200")
    every = plan.predict(sizes, work, plan.Setting("fast", "fsdp", True, False), tflops)
    assert plan.predict(sizes, work, chosen, tflops).samples_per_s > every.samples_per_s
    forced = build_config(None, {"model.path": model, "train.checkpoint_blocks": 8})
    assert plan.setting_of(forced, "fsdp", False, sizes, work, budget).checkpointed_blocks(sizes.blocks) == 8
