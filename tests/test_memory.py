"""The step-memory estimate behind gradient_checkpointing=auto, checked against the peaks measured
on H100 in bench/results, and the token counts it is fed.   pytest -q tests/test_memory.py"""

import pytest
import torch

from flux_lora.config import TrainConfig
from flux_lora.fast import memory

GIB = 2**30
FLUX_BLOCKS, FLUX_HIDDEN, LORA_PARAMS = 57, 3072, 65_372_160


@pytest.mark.parametrize("weights_gib, tokens, measured_gib", [
    (22.2, 4 * (1024 + 512), 59.1),  # 512 px, batch 4, bf16 base
    (11.2, 4 * (1024 + 512), 48.3),  # 512 px, batch 4, fp8 base
    (11.2, 4096 + 512, 39.3),  # 1024 px, batch 1, fp8 base
])
def test_step_memory_estimate_matches_measured_peaks(weights_gib, tokens, measured_gib):
    est = memory.step_memory_bytes(int(weights_gib * GIB), LORA_PARAMS, tokens, FLUX_BLOCKS, FLUX_HIDDEN) / GIB
    assert abs(est - measured_gib) / measured_gib < 0.06

def test_checkpointing_auto_follows_mode_and_explicit_choices():
    assert memory.use_checkpointing(TrainConfig())[0] is False
    assert memory.use_checkpointing(TrainConfig(memory_mode="fp8"))[0] is True
    assert memory.use_checkpointing(TrainConfig(memory_mode="nf4", gradient_checkpointing="off"))[0] is False
    assert memory.use_checkpointing(TrainConfig(gradient_checkpointing="on"))[0] is True

def test_checkpointing_auto_turns_on_when_the_step_would_not_fit(tiny_model):
    from flux_lora.models import loading
    from flux_lora.training import lora

    model = loading.load_transformer(str(tiny_model), torch.float32, "", torch.device("cpu"))
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    weights, trainable, blocks, hidden = memory.model_sizes(model)
    assert trainable > 0 and blocks == 2 and hidden == 32 and weights > 0
    tokens = 4096
    need = memory.step_memory_bytes(weights, trainable, tokens, blocks, hidden)
    on, why = memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=int(need / memory.HEADROOM) - 1)
    assert on and "GiB" in why
    assert memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=2 * need)[0] is False
    assert memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=0)[0] is False  # CPU: no limit known

def test_largest_micro_batch_counts_the_largest_bucket_and_the_text(cache_dir):
    from flux_lora.data import cache
    from flux_lora.training import model

    manifest = cache.load_manifest(cache_dir)
    buckets = {it.bucket for it in cache.CachedDataset(cache_dir, manifest).items}
    largest = max((w // 16) * (h // 16) for w, h in buckets)
    assert model.largest_micro_batch_tokens(buckets, 77, 3) == 3 * (largest + 77)

def test_micro_batch_shapes_merge_buckets_of_equal_area():
    from flux_lora.training import model

    buckets = {(512, 512), (256, 1024), (1024, 256), (496, 528)}
    assert model.micro_batch_shapes(buckets) == 2  # 1024 tokens thrice, 31 × 33 once


def test_memory_first_modes_let_the_allocator_grow_segments(monkeypatch):
    """fp8 and nf4 (the small-card modes) turn on expandable segments before the model loads;
    the fast mode, the CPU and a PYTORCH_CUDA_ALLOC_CONF of the user's own are left alone."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for mode, device in (("fp8", cuda), ("nf4", cuda), ("fast", cuda), ("nf4", cpu)):
        memory.grow_segments_for_small_cards(SimpleNamespace(memory_mode=mode), device)
    assert calls == ["expandable_segments:True"] * 2
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    memory.grow_segments_for_small_cards(SimpleNamespace(memory_mode="nf4"), cuda)
    assert len(calls) == 2
