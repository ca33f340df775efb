"""Per-block compile and CUDA graphs, checked on the CPU: graphs counted by dynamo, numbers against
eager, kept gradients under replayed buffers.   pytest -q tests/test_compiled_blocks.py"""

import os

import pytest
import torch

from flux_lora.config import TrainConfig
from flux_lora.errors import ConfigError
from flux_lora.fast import compiled_blocks
from flux_lora.training.lora import lora_parameters
from helpers import _compile_on_cpu_quickly, _loss_and_grads, _small_flux


def test_cuda_graphs_auto_only_for_compiled_uncheckpointed_cuda_steps():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compiled_blocks.use_cuda_graphs(TrainConfig(), cuda, checkpointing=False)
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(), cuda, checkpointing=True)
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(compile="off"), cuda, checkpointing=False)
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(memory_mode="nf4"), cuda, checkpointing=True)
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(), cpu, checkpointing=False)
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(cuda_graphs="off"), cuda, checkpointing=False)
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(), cuda, checkpointing=False, shapes=3)  # mixed buckets
    # a short run does not win back the recording; micro-steps count, not optimizer steps
    assert not compiled_blocks.use_cuda_graphs(TrainConfig(steps=999), cuda, checkpointing=False)
    assert compiled_blocks.use_cuda_graphs(TrainConfig(steps=500, grad_accum=2), cuda, checkpointing=False)
    assert compiled_blocks.use_cuda_graphs(TrainConfig(steps=10, cuda_graphs="on"), cuda, checkpointing=False)
    assert compiled_blocks.use_cuda_graphs(TrainConfig(cuda_graphs="on"), cuda, checkpointing=False, shapes=3)
    with pytest.raises(ConfigError, match="cuda_graphs=on needs"):
        compiled_blocks.use_cuda_graphs(TrainConfig(cuda_graphs="on"), cuda, checkpointing=True)
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        TrainConfig(cuda_graphs="sometimes")


def test_cuda_graphs_only_for_the_blocks_given(monkeypatch):
    """Under FSDP2 only the blocks it leaves whole are recorded (sharded ones are gathered into new
    memory every step); the model says graphs are on, and keeps its gradients, only if one is."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None, options=None: modes.append(
        "reduce-overhead" if options["triton.cudagraphs"] else None) or fn)
    model = _small_flux()
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    compiled_blocks.compile_blocks(model, cuda_graphs=True, graphed=blocks[2:])
    assert modes == [None, None] + ["reduce-overhead"] * (len(blocks) - 2)
    assert compiled_blocks.uses_cuda_graphs(model) and all(p.grad is not None for _, p in lora_parameters(model))
    modes.clear()
    model = _small_flux()
    compiled_blocks.compile_blocks(model, cuda_graphs=True, graphed=[])
    assert modes == [None] * len(blocks) and not compiled_blocks.uses_cuda_graphs(model)
    assert all(p.grad is None for _, p in lora_parameters(model))
    # as train compiles: graphs when FSDP2 left every block whole, none when it sharded any
    from flux_lora.parallel import fsdp
    from flux_lora.training.model import compile_model

    for sharded, want in ((set(), ["reduce-overhead"] * len(blocks)), ({1}, [None] * len(blocks))):
        modes.clear()
        model = _small_flux()
        chosen = [model.transformer_blocks[i] for i in sharded]
        monkeypatch.setattr(fsdp, "is_sharded_module", lambda m: any(m is b for b in chosen))
        compile_model(model, TrainConfig(cuda_graphs="on"), torch.device("cuda"), checkpointing=False)
        assert modes == want


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
        compiled_blocks.keep_grads(model)
    for x in xs:
        _ReplayedLinear.apply(x, w).sum().backward()
    assert torch.allclose(w.grad, expected) is kept
    model.flux_lora_cuda_graphs = kept
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled_blocks.zero_grad(model, opt)
    assert (w.grad is not None and not w.grad.any()) if kept else w.grad is None

def test_compiled_blocks_match_eager_and_compile_each_block_kind_once(monkeypatch):
    """The first single block gets its inputs in the layout the later ones get, and the first double
    block inputs that need a gradient as the later ones do, so each block kind compiles once."""
    from torch._dynamo.utils import counters

    _compile_on_cpu_quickly(monkeypatch)
    eager_loss, eager_grads = _loss_and_grads(_small_flux())
    torch._dynamo.reset()
    counters.clear()
    model = _small_flux()
    compiled_blocks.compile_blocks(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss, grads = _loss_and_grads(model)
    assert counters["stats"]["unique_graphs"] == 2  # double, single
    assert torch._functorch.config.autograd_cache_allow_custom_autograd_functions  # fp8 graphs cached too
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()

def test_single_blocks_hand_on_two_tensors_not_views_of_one(monkeypatch):
    """A FLUX.1 single block's two streams are views of one tensor. Handed on as views, their
    gradients were joined by autograd's eager view backward between the compiled graphs (a
    zero-filled copy of the stream per view, then an add); compiled, each block returns two tensors.
    Going back, the gradients of its two input streams (slices of one) come out contiguous, as the
    block before takes them (not copied eagerly between the graphs)."""
    _compile_on_cpu_quickly(monkeypatch)
    model = _small_flux()
    outputs, grads = [], []

    def keep(m, args, out):
        outputs.extend(out)
        for t in out:
            t.register_hook(grads.append)

    for block in [model.transformer_blocks[-1], *model.single_transformer_blocks[:-1]]:  # the last: text unused
        block.register_forward_hook(keep)
    _loss_and_grads(model)
    assert outputs and all(t._base is not None for t in outputs[2:])  # diffusers' eager single block: views
    assert not all(g.is_contiguous() for g in grads)
    outputs.clear(), grads.clear()
    compiled_blocks.compile_blocks(model)
    _loss_and_grads(model)
    assert len(outputs) == 2 * len(model.single_transformer_blocks)
    assert all(t._base is None and t.is_contiguous() for t in outputs)
    assert len(grads) == len(outputs) and all(g.is_contiguous() for g in grads)
    torch._dynamo.reset()


def test_compiled_and_checkpointed_blocks_match_eager(monkeypatch):
    """Under gradient checkpointing each block's forward runs again in the backward; the first
    block's inputs, made to need a gradient for the compile, do not change what the LoRA learns.
    Three of the five blocks checkpointed: compiled blocks with and without checkpointing mixed."""
    from flux_lora.fast import memory

    _compile_on_cpu_quickly(monkeypatch)
    eager_loss, eager_grads = _loss_and_grads(_small_flux())
    torch._dynamo.reset()
    model = _small_flux()
    assert memory.enable_checkpointing(model, 3) == 3
    compiled_blocks.compile_blocks(model)
    loss, grads = _loss_and_grads(model)
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()


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
    compiled_blocks.compile_blocks(model)
    for h, w in sizes:
        model.zero_grad(set_to_none=True)
        loss, grads = _loss_and_grads(model, h, w)
    assert counters["stats"]["unique_graphs"] <= 4  # static + symbolic, per block kind
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()


def test_the_compile_cache_folder_is_torchs(tmp_path, monkeypatch):
    """train.compile_cache_dir becomes inductor's cache folder (created), for every rank and node
    that names it; an unwritable one is one line."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from flux_lora.errors import ConfigError
    from flux_lora.fast.compiled_blocks import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    use_compile_cache(str(tmp_path / "shared" / "compile"))
    assert cache_dir() == str(tmp_path / "shared" / "compile") and (tmp_path / "shared" / "compile").is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "shared" / "compile" / "triton")  # the LoRA kernel's
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="compile_cache_dir .*cannot create it"):
        use_compile_cache(str(tmp_path / "file" / "sub"))


def test_preprocess_encoders_compile_and_encode_as_eager(tiny_model, monkeypatch):
    """preprocess.compile: the VAE encoder and FLUX.1's T5 stack are compiled (auto: on CUDA from
    1,000 items a rank) and encode what they encode eagerly; a second image size is one more compile, not a failure."""
    from flux_lora.fast import compiled_encoders
    from flux_lora.models import families

    use = compiled_encoders.use_compile
    assert not use("auto", torch.device("cpu"), 5000) and not use("auto", torch.device("cuda"), 999)
    assert use("auto", torch.device("cuda"), 1000) and use("on", torch.device("cpu"), 1) and not use("off", torch.device("cuda"), 5000)
    family = families.of_model(str(tiny_model))
    vae = family.load_vae(str(tiny_model), torch.float32).eval()
    text = family.load_text_pipeline(str(tiny_model), torch.float32)
    pixels = [torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 48, 80) * 2 - 1]  # (aot_eager on the CPU fails a batch of 1 once shapes are symbolic; inductor does not)
    with torch.no_grad():
        eager = [family.encode_latents(vae, x) for x in pixels]
    prompts = family.encode_prompts(text, ["a red circle", "sks"], 32, torch.device("cpu"))
    _compile_on_cpu_quickly(monkeypatch)
    assert compiled_encoders.compile_encoders(vae, text) == ["vae.encoder", "t5.encoder"]
    with torch.no_grad():
        for x, ref in zip(pixels, eager):
            torch.testing.assert_close(family.encode_latents(vae, x), ref, rtol=1e-5, atol=1e-5)
    again = family.encode_prompts(text, ["a red circle", "sks"], 32, torch.device("cpu"))
    torch.testing.assert_close(again["t5"], prompts["t5"], rtol=1e-5, atol=1e-5)


def test_multi_kernel_reductions_unless_deterministic():
    """Inductor's multi-kernel reductions are chosen by timing them, so train.deterministic (torch's
    deterministic algorithms) leaves them out."""
    assert compiled_blocks.inductor_options(True) == {"triton.cudagraphs": True, "triton.multi_kernel": 1}
    try:
        torch.use_deterministic_algorithms(True)
        assert compiled_blocks.inductor_options(False) == {"triton.cudagraphs": False}
    finally:
        torch.use_deterministic_algorithms(False)
