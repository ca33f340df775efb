"""Speed/memory choices that must hold without a GPU: the step-memory estimate behind
gradient_checkpointing=auto (checked against the peaks measured on H100 in bench/results), and
which base each mode and device gets."""

import dataclasses

import pytest
import torch

from flux_lora import speed
from flux_lora.config import TrainConfig
from flux_lora.errors import ConfigError

GIB = 2**30
FLUX_BLOCKS, FLUX_HIDDEN, LORA_PARAMS = 57, 3072, 65_372_160


@pytest.mark.parametrize("weights_gib, tokens, measured_gib", [
    (22.2, 4 * (1024 + 512), 59.1),  # 512 px, batch 4, bf16 base
    (11.2, 4 * (1024 + 512), 48.3),  # 512 px, batch 4, fp8 base
    (11.2, 4096 + 512, 39.3),  # 1024 px, batch 1, fp8 base
])
def test_step_memory_estimate_matches_measured_peaks(weights_gib, tokens, measured_gib):
    est = speed.step_memory_bytes(int(weights_gib * GIB), LORA_PARAMS, tokens, FLUX_BLOCKS, FLUX_HIDDEN) / GIB
    assert abs(est - measured_gib) / measured_gib < 0.06


def test_checkpointing_auto_follows_mode_and_explicit_choices():
    assert speed.use_checkpointing(TrainConfig())[0] is False
    assert speed.use_checkpointing(TrainConfig(memory_mode="fp8"))[0] is True
    assert speed.use_checkpointing(TrainConfig(memory_mode="nf4", gradient_checkpointing="off"))[0] is False
    assert speed.use_checkpointing(TrainConfig(gradient_checkpointing="on"))[0] is True


def test_fp8_base_choice_by_mode_and_device():
    cpu = torch.device("cpu")
    assert not speed.uses_fp8_base(TrainConfig(), cpu, torch.float32)  # auto: only on fp8 tensor cores
    assert speed.uses_fp8_base(TrainConfig(memory_mode="fp8"), cpu, torch.float32) == speed.fp8.matmul_works("cpu")
    assert not speed.uses_fp8_base(TrainConfig(memory_mode="nf4"), cpu)
    assert not speed.uses_fp8_base(TrainConfig(fp8_compute="off"), cpu)


def test_fp8_compute_accepts_booleans_and_rejects_nf4():
    assert TrainConfig(fp8_compute="true").fp8_compute == "on"
    assert TrainConfig(fp8_compute="False").fp8_compute == "off"
    with pytest.raises(ConfigError, match="nf4"):
        TrainConfig(fp8_compute="on", memory_mode="nf4")
    with pytest.raises(ConfigError, match="fp8_compute"):
        dataclasses.replace(TrainConfig(), fp8_compute="maybe")


def test_checkpointing_auto_turns_on_when_the_step_would_not_fit(tiny_model):
    from flux_lora import lora, models

    model = models.load_transformer(str(tiny_model), torch.float32, "", torch.device("cpu"))
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    weights, trainable, blocks, hidden = speed.model_sizes(model)
    assert trainable > 0 and blocks == 2 and hidden == 32 and weights > 0
    tokens = 4096
    need = speed.step_memory_bytes(weights, trainable, tokens, blocks, hidden)
    on, why = speed.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=int(need / speed.HEADROOM) - 1)
    assert on and "GiB" in why
    assert speed.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=2 * need)[0] is False
    assert speed.use_checkpointing(TrainConfig(), model, tokens, gpu_bytes=0)[0] is False  # CPU: no limit known


def test_max_tokens_counts_the_largest_bucket_and_the_text(cache_dir):
    from flux_lora import cache, train

    manifest = cache.load_manifest(cache_dir)
    dataset = cache.CachedDataset(cache_dir, manifest)
    largest = max((w // 16) * (h // 16) for w, h in {it.bucket for it in dataset.items})
    assert train.max_tokens(dataset, 77, 3) == 3 * (largest + 77)


def test_token_counts_merge_buckets_of_equal_area():
    from types import SimpleNamespace

    from flux_lora import train

    items = [SimpleNamespace(bucket=b) for b in [(512, 512), (256, 1024), (1024, 256), (512, 512), (496, 528)]]
    assert train.token_counts(SimpleNamespace(items=items)) == 2  # 1024 tokens thrice, 31 × 33 once


def test_prefetcher_returns_each_step_in_order_and_surfaces_errors():
    from flux_lora.cache import Prefetcher

    calls = []

    def load(step):
        calls.append(step)
        if step == 3:
            raise ValueError("corrupt shard")
        return step * 10

    p = Prefetcher(load, end_step=4)
    try:
        assert [p.get(s) for s in range(3)] == [0, 10, 20]
        with pytest.raises(ValueError, match="corrupt"):
            p.get(3)
    finally:
        p.close()
    assert sorted(calls) == [0, 1, 2, 3]  # each step loaded once, the next one ahead of time


def test_quantized_base_is_staged_on_the_cpu_for_small_gpus(monkeypatch):
    cuda = torch.device("cuda", 0)
    nf4 = TrainConfig(memory_mode="nf4")
    monkeypatch.setattr(speed, "gpu_bytes", lambda device: 16 * GIB)
    assert speed.load_device(nf4, cuda, torch.bfloat16, synthetic=False).type == "cpu"
    assert speed.load_device(nf4, cuda, torch.bfloat16, synthetic=True) == cuda  # built on the GPU in any case
    assert speed.load_device(TrainConfig(fp8_compute="off"), cuda, torch.bfloat16, synthetic=False) == cuda
    monkeypatch.setattr(speed, "gpu_bytes", lambda device: 80 * GIB)
    assert speed.load_device(nf4, cuda, torch.bfloat16, synthetic=False) == cuda


def test_cuda_graphs_auto_only_for_compiled_uncheckpointed_cuda_steps():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert speed.use_cuda_graphs(TrainConfig(), cuda, checkpointing=False)
    assert not speed.use_cuda_graphs(TrainConfig(), cuda, checkpointing=True)
    assert not speed.use_cuda_graphs(TrainConfig(compile="off"), cuda, checkpointing=False)
    assert not speed.use_cuda_graphs(TrainConfig(memory_mode="nf4"), cuda, checkpointing=True)
    assert not speed.use_cuda_graphs(TrainConfig(), cpu, checkpointing=False)
    assert not speed.use_cuda_graphs(TrainConfig(cuda_graphs="off"), cuda, checkpointing=False)
    assert not speed.use_cuda_graphs(TrainConfig(), cuda, checkpointing=False, shapes=3)  # mixed buckets
    assert speed.use_cuda_graphs(TrainConfig(cuda_graphs="on"), cuda, checkpointing=False, shapes=3)
    with pytest.raises(ConfigError, match="cuda_graphs=on needs"):
        speed.use_cuda_graphs(TrainConfig(cuda_graphs="on"), cuda, checkpointing=True)
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        TrainConfig(cuda_graphs="sometimes")


class _ReplayedLinear(torch.autograd.Function):
    """y = x wᵀ, whose backward writes dw into one reused buffer, as a CUDA graph replay does
    (a fresh tensor over the same storage each time: the pool keeps no tensor alive)."""
    storage = None

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        out = torch.empty(0).set_(_ReplayedLinear.storage, 0, (dy.shape[1], x.shape[1]))
        return None, out.copy_(dy.t() @ x)


@pytest.mark.parametrize("kept", [True, False])
def test_kept_gradients_accumulate_replayed_outputs_correctly(kept):
    """Two micro-batches whose backward reuses one output buffer: with the gradient kept
    allocated, autograd adds into it and the sum is right; adopted (set_to_none) it is the buffer,
    and the second replay overwrites the first micro-batch's gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=False)
    w = model.weight
    _ReplayedLinear.storage = torch.empty(2, 3).untyped_storage()
    xs = [torch.randn(4, 3) for _ in range(2)]
    expected = sum(torch.ones(4, 2).t() @ x for x in xs)
    if kept:
        speed.keep_grads(model)
    for x in xs:
        _ReplayedLinear.apply(x, w).sum().backward()
    assert torch.allclose(w.grad, expected) is kept
    model.flux_lora_cuda_graphs = kept
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    speed.zero_grad(model, opt)
    assert (w.grad is not None and not w.grad.any()) if kept else w.grad is None


def test_ddp_bucket_auto_is_one_bucket_on_one_host_and_overlapping_across_hosts():
    lora_bytes = 65_372_160 * 4
    assert speed.ddp_bucket_mb(0, lora_bytes, one_host=True) * 2**20 > lora_bytes  # everything in one bucket
    assert speed.ddp_bucket_mb(0, lora_bytes, one_host=False) == speed.OVERLAP_BUCKET_MB
    assert speed.ddp_bucket_mb(100, lora_bytes, one_host=True) == 100
    with pytest.raises(ConfigError, match="bucket_mb"):
        from flux_lora.config import DistConfig
        DistConfig(bucket_mb=-1)


def _small_flux(single_layers: int = 3):
    from diffusers import FluxTransformer2DModel

    from flux_lora import lora

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=single_layers,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a LoRA that changes the output, so its gradients are checked
    return model


def _loss_and_grads(model, h: int = 8, w: int = 8):
    from flux_lora import flow, lora

    g = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")
    pred = model(hidden_states=torch.randn(2, (h // 2) * (w // 2), 16, generator=g), timestep=torch.rand(2, generator=g),
                 guidance=torch.ones(2), pooled_projections=torch.randn(2, 32, generator=g),
                 encoder_hidden_states=torch.randn(2, 8, 32, generator=g), txt_ids=flow.text_ids(8, cpu),
                 img_ids=flow.image_ids(h, w, cpu), return_dict=False)[0]
    loss = pred.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora.lora_parameters(model)}


def _compile_on_cpu_quickly(monkeypatch, backend="aot_eager"):
    """compile_blocks' own dynamic setting, with aot_eager (dynamo's guards and graphs are what
    is tested; inductor's C++ codegen would take a minute on the CPU)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, dynamic=kw["dynamic"]))


def test_compiled_blocks_match_eager_and_compile_each_block_kind_once(monkeypatch):
    """The first single block gets its inputs in the layout the later ones get, so the single
    block compiles once (the first double block still compiles apart: its inputs need no grad)."""
    from torch._dynamo.utils import counters

    _compile_on_cpu_quickly(monkeypatch)
    eager_loss, eager_grads = _loss_and_grads(_small_flux())
    torch._dynamo.reset()
    counters.clear()
    model = _small_flux()
    speed.compile_blocks(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss, grads = _loss_and_grads(model)
    assert counters["stats"]["unique_graphs"] == 3  # double (no-grad inputs), double, single
    assert torch._functorch.config.autograd_cache_allow_custom_autograd_functions  # fp8 graphs cached too
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()


def test_blocks_under_ddp_compile_whole_not_split_at_buckets(monkeypatch, tmp_path):
    """Inside DDP's forward dynamo would cut each block's graph where DDP's 1 MiB first bucket
    fills (FLUX.1's blocks hold 3-5 MB of LoRA each; a tiny first bucket plays that here):
    every block kind must still compile as one graph."""
    import torch.distributed as dist
    from torch._dynamo.backends.debugging import aot_eager
    from torch.nn.parallel import DistributedDataParallel as DDP

    graphs = []

    def counting(gm, example_inputs, **kw):
        graphs.append(gm)
        return aot_eager(gm, example_inputs, **kw)

    _compile_on_cpu_quickly(monkeypatch, backend=counting)
    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 64)
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)  # dynamo's default
    torch._dynamo.reset()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _small_flux()
        speed.compile_blocks(model)
        ddp = DDP(model)
        for _ in range(2):
            ddp.zero_grad(set_to_none=True)
            _loss_and_grads(ddp)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert len(graphs) == 3, f"{len(graphs)} graphs: the blocks were split at DDP's buckets"


def test_buckets_of_many_token_counts_compile_a_bounded_number_of_graphs(monkeypatch):
    """Aspect-ratio buckets differ in token count; after the second, the blocks compile with that
    dimension symbolic instead of once per bucket (past the recompile limit they would run eager)."""
    from torch._dynamo.utils import counters

    _compile_on_cpu_quickly(monkeypatch)
    sizes = [(8, 8), (8, 12), (4, 16), (12, 12), (16, 8)]  # 16, 24, 16, 36, 32 image tokens
    eager_loss, eager_grads = _loss_and_grads(_small_flux(), *sizes[-1])
    torch._dynamo.reset()
    counters.clear()
    model = _small_flux()
    speed.compile_blocks(model)
    for h, w in sizes:
        model.zero_grad(set_to_none=True)
        loss, grads = _loss_and_grads(model, h, w)
    assert counters["stats"]["unique_graphs"] <= 6  # static + symbolic, per block kind and input grads
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()
