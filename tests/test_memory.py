"""The step-memory estimate behind gradient_checkpointing=auto, checked against the peaks measured
on H100 in bench/results, and the token counts it is fed.   pytest -q tests/test_memory.py"""

import pytest
import torch

from flux_lora.config import TrainConfig
from flux_lora.fast import fp8, memory

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
    from flux_lora.errors import ConfigError

    assert memory.use_checkpointing(TrainConfig())[0] == 0
    assert memory.use_checkpointing(TrainConfig(memory_mode="fp8"))[0] == memory.ALL_BLOCKS
    assert memory.use_checkpointing(TrainConfig(memory_mode="nf4", gradient_checkpointing="off"))[0] == 0
    assert memory.use_checkpointing(TrainConfig(gradient_checkpointing="on"))[0] == memory.ALL_BLOCKS
    assert memory.use_checkpointing(TrainConfig(checkpoint_blocks=20))[0] == 20
    with pytest.raises(ConfigError, match="train.checkpoint_blocks=20 .*gradient_checkpointing=off"):
        TrainConfig(checkpoint_blocks=20, gradient_checkpointing="off")


def test_partly_checkpointed_activations_lie_between_none_and_all():
    none, every = (memory.activation_bytes(4608, 57, 3072, c) for c in (False, True))
    assert memory.activation_bytes(4608, 57, 3072, 57) == every and memory.activation_bytes(4608, 57, 3072, 0) == none
    parts = [memory.activation_bytes(4608, 57, 3072, k) for k in range(1, 57)]
    assert parts == sorted(parts, reverse=True) and parts[0] < none
    # all of them: the last block's input kept too, and its full activations while recomputed
    assert every - parts[-1] == 4608 * 3072 * memory.CHECKPOINTED_BYTES_PER_TOKEN_BLOCK_DIM

def test_checkpointing_auto_turns_on_when_the_step_would_not_fit(tiny_model):
    from flux_lora.models import loading
    from flux_lora.training import lora

    model = loading.load_transformer(str(tiny_model), torch.float32, "", torch.device("cpu"))
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    weights, trainable, blocks, hidden = memory.model_sizes(model)
    assert trainable > 0 and blocks == 2 and hidden == 32 and weights > 0
    tokens = 4096
    need = memory.step_memory_bytes(weights, trainable, tokens, blocks, hidden)
    count, why = memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=int(need / memory.HEADROOM) - 1)
    assert count == 1 and "GiB with these" in why  # one of the two blocks is enough
    one = memory.step_memory_bytes(weights, trainable, tokens, blocks, hidden, 1)
    assert memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=int(one / memory.HEADROOM) - 1)[0] \
        == memory.ALL_BLOCKS
    assert memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=2 * need)[0] == 0
    assert memory.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=0)[0] == 0  # CPU: no limit known


@pytest.mark.parametrize("count", [2, memory.ALL_BLOCKS])
def test_checkpointing_some_blocks_recomputes_only_those_and_learns_the_same(count):
    """The first `count` blocks run their forward twice a step (again in the backward), the rest
    once; output and LoRA gradients are the plain model's."""
    from helpers import _loss_and_grads, _small_flux

    from flux_lora.models.loading import transformer_blocks

    plain_loss, plain_grads = _loss_and_grads(_small_flux())
    model = _small_flux()
    blocks = transformer_blocks(model)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):  # (forward hooks do not fire in checkpoint's recompute)
        def counted(*args, forward=block.forward, i=i, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)
        block.forward = counted
    k = memory.enable_checkpointing(model, count)
    assert k == (len(blocks) if count == memory.ALL_BLOCKS else count)
    assert memory.checkpointed_share(model) == k / len(blocks)
    loss, grads = _loss_and_grads(model)
    assert calls == [2] * k + [1] * (len(blocks) - k)
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=1e-7)
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name

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
    """fp8 and nf4 (the small-card modes) and a run given a memory budget turn on expandable
    segments before the model loads; the fast mode on the whole card, the CPU and a
    PYTORCH_CUDA_ALLOC_CONF of the user's own are left alone."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for mode, device in (("fp8", cuda), ("nf4", cuda), ("fast", cuda), ("nf4", cpu)):
        memory.grow_segments_for_small_cards(SimpleNamespace(memory_mode=mode), device)
    assert calls == ["expandable_segments:True"] * 2
    memory.grow_segments_for_small_cards(SimpleNamespace(memory_mode="fast"), cuda, budget_gib=60)
    assert len(calls) == 3
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    memory.grow_segments_for_small_cards(SimpleNamespace(memory_mode="nf4"), cuda)
    assert len(calls) == 3


@pytest.mark.skipif(not fp8.matmul_works("cpu"), reason="this torch has no CPU fp8 matmul")
def test_fp8_transposed_copies_kept_only_where_the_step_leaves_room(tiny_model):
    """train.fp8_transposed=auto keeps the +1 byte/parameter copies in the fast mode when the step
    fits without checkpointing with them, never with checkpointing or in the memory-first modes."""
    import dataclasses

    from flux_lora.models import loading
    from flux_lora.training import lora
    from flux_lora.training.model import keeps_fp8_transposed

    model = loading.load_transformer(str(tiny_model), torch.bfloat16, "", torch.device("cpu"))
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    fp8.convert_frozen_linears(list(model.transformer_blocks) + list(model.single_transformer_blocks), torch.device("cpu"))
    extra = fp8.transposed_bytes(model)
    tokens = 4096
    weights, trainable, blocks, hidden = memory.model_sizes(model)
    need = memory.step_memory_bytes(weights, trainable, tokens, blocks, hidden)
    room, no_room = int((need + extra) / memory.HEADROOM) + 1, int((need + extra // 2) / memory.HEADROOM)
    auto = TrainConfig()
    assert extra > 0 and auto.fp8_transposed == "auto"
    assert keeps_fp8_transposed(auto, model, 0, tokens, room)
    assert not keeps_fp8_transposed(auto, model, 0, tokens, no_room)  # the step fits, the copies do not
    assert not keeps_fp8_transposed(auto, model, 1, tokens, room)  # checkpointing: memory comes first
    assert not keeps_fp8_transposed(dataclasses.replace(auto, memory_mode="fp8"), model, 0, tokens, room)
    assert not keeps_fp8_transposed(auto, model, 0, tokens, 0)  # no GPU size known
    assert keeps_fp8_transposed(dataclasses.replace(auto, fp8_transposed="on"), model, 1, tokens, no_room)
    assert not keeps_fp8_transposed(dataclasses.replace(auto, fp8_transposed="off"), model, 0, tokens, room)
