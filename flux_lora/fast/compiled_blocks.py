"""Regional torch.compile of the transformer's blocks, and the CUDA graphs replayed from them.
Measured with scripts/bench.py; figures in bench/README.md."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from flux_lora.errors import ConfigError
from flux_lora.models.loading import transformer_blocks


def use_compile(train_cfg, device: torch.device) -> bool:
    """auto: on CUDA, except for nf4: compiling through bitsandbytes' 4-bit tensors costs minutes
    before the first step. The fp8 base is plain tensors and compiles like bf16."""
    if train_cfg.compile == "auto":
        return device.type == "cuda" and train_cfg.memory_mode != "nf4"
    return train_cfg.compile == "on"


GRAPHS_MIN_MICRO_STEPS = 1000  # a run shorter than this does not win back the recording


def use_cuda_graphs(train_cfg, device: torch.device, checkpointing: bool, shapes: int = 1) -> bool:
    """auto: on CUDA when the blocks are compiled and not checkpointed (a checkpointed block runs
    its forward again inside the backward, which a recorded graph sequence does not allow), when
    every micro-batch has the same shape (`shapes`: distinct token counts of the dataset's
    buckets: each new shape records every block again), and when the run has at least
    GRAPHS_MIN_MICRO_STEPS forwards and backwards. Recording FLUX.1's blocks costs 5.5-8.8 s
    before the first step on an H200; replays save 0.6-5% of a 0.32 s step (bench/README), so
    recording pays back from ~800 steps at the best saving, later at the others."""
    if train_cfg.cuda_graphs == "auto":
        return (device.type == "cuda" and use_compile(train_cfg, device) and not checkpointing and shapes == 1
                and train_cfg.steps * train_cfg.grad_accum >= GRAPHS_MIN_MICRO_STEPS)
    on = train_cfg.cuda_graphs == "on"
    if on and (device.type != "cuda" or not use_compile(train_cfg, device) or checkpointing):
        raise ConfigError("train.cuda_graphs=on needs CUDA, train.compile on and no gradient checkpointing; "
                          "use train.cuda_graphs=auto")
    return on


def compile_blocks(model, cuda_graphs: bool = False, graphed: list | None = None) -> None:
    """Regional compile: each block is compiled on its own; the 19 (38) identical blocks share
    their graphs, so compile takes seconds, not the minutes of a whole-model compile. The forward
    is compiled, not the module call, so hooks stay outside the graphs.

    Shapes are static until a second one arrives (aspect-ratio buckets have different token
    counts: 22 distinct ones at 512 px); then the dimension that changed becomes symbolic, so a
    mixed dataset costs one more compile, not one per bucket (past dynamo's recompile limit of 8,
    blocks would silently run eager).

    With cuda_graphs, inductor records each block's forward and backward once per shape and then
    replays them (CUDA graph trees, one memory pool): a step costs the host ~120 replays instead
    of ~3,500 kernel launches. A replay writes its outputs, the LoRA gradients included, into the
    pool, where the next replay overwrites them; so the gradients are kept allocated (zeroed, not
    freed) and autograd adds each replay's output into them, under DDP and no_sync alike.
    `graphed` (default: all blocks) limits the graphs to those blocks; the others compile plainly."""
    allow_compile_cache_of_fp8_functions()
    blocks = transformer_blocks(model)
    graphed_ids = {id(b) for b in (blocks if graphed is None else graphed)} if cuda_graphs else set()
    singles = {id(b) for b in model.single_transformer_blocks}
    for block in blocks:
        block.flux_lora_forward = block.forward  # the eager forward, for inference_blocks
        forward = _separate_outputs(block.forward) if id(block) in singles else block.forward
        block.forward = torch.compile(forward, dynamic=None, options=inductor_options(id(block) in graphed_ids))
    cuda_graphs = bool(graphed_ids)
    transformer_blocks(model)[0].register_forward_pre_hook(_inputs_need_grad_like_later_blocks, with_kwargs=True)
    model.flux_lora_cuda_graphs = cuda_graphs
    if cuda_graphs:
        keep_grads(model)
        # The graph trees' loop detector sees the same block graph 38 times on one path, each the
        # child of the previous, and warns of a loop without a step boundary. Per-block graphs
        # are that path by design; the path ends each step when its outputs die (measured: replays).
        warnings.filterwarnings("ignore", message="Unable to hit fast path of CUDAGraphs because of pending")


MULTI_KERNEL = True  # see inductor_options; scripts/bench.py --compare-multi-kernel toggles it


def inductor_options(cuda_graphs: bool) -> dict:
    """What inductor compiles a training block with: CUDA graph trees (`cuda_graphs`; what
    mode="reduce-overhead" sets), and multi-kernel reductions: each reduction kernel built both
    persistent (a row held in registers, read once) and looped, and the faster kept after timing
    both at its first run (+1.2% samples/s at 512 px, batch 4 on an H200; +0.7% with the bf16 base;
    bench/README.md, session 20). The timing picks a summation order, so not under
    train.deterministic (torch's deterministic algorithms on), which keeps inductor's choice by shape."""
    options = {"triton.cudagraphs": cuda_graphs}
    if MULTI_KERNEL and not torch.are_deterministic_algorithms_enabled():
        options["triton.multi_kernel"] = 1
        # torch 2.11 keeps each pick in a file named by its kernels' Triton cache keys, which it
        # cannot read from a kernel loaded from inductor's cache ("'NoneType' object does not
        # support the context manager protocol" at every warm start, measured on an H200). Without
        # that file each process times its picks at their first run (milliseconds).
        os.environ["TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"] = "1"
    return options


def _inputs_need_grad_like_later_blocks(block, args, kwargs):
    """In training, every block but the first receives streams that need a gradient (the LoRA
    before it); the first gets the embedders' outputs, which do not, and dynamo would compile
    the block a second time for that (11 s of a cold start for FLUX.1, bench/README.md).
    Asking for their gradient costs the first block's input-gradient matmuls (~0.3% of a step)."""
    if not torch.is_grad_enabled():
        return None
    return _streams(args, kwargs, _needing_grad)


def _needing_grad(t):
    if not isinstance(t, torch.Tensor) or t.requires_grad or not t.is_floating_point():
        return t
    return t.detach().requires_grad_()


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _streams(args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
    """`change` applied to a block call's two streams: by name, or the first two positional arguments."""
    names = ("hidden_states", "encoder_hidden_states")
    return (tuple(change(a) if i < 2 else a for i, a in enumerate(args)),
            {k: change(v) if k in names else v for k, v in kwargs.items()})


def _separate_outputs(forward):
    """A FLUX.1 single block joins its two streams into one tensor and returns them as two views of
    it. Crossing into the next compiled block as views, their gradients were joined outside the
    graphs, by autograd's eager view backward: a zero-filled copy of the whole stream per view and
    an add, ~4 ms of a 512-px step on an H200 plus ~230 launches between replays. Returned as two
    tensors made inside the graph, they need no such join, and every single block receives the
    layout the first one gets (the double blocks' two tensors): one compile for all of them.
    Going back, the streams' gradients are slices of the joined tensor's; a compiled backward
    takes its incoming gradients contiguous, so they were copied eagerly before each block's
    backward (76 copies a step); made contiguous inside the graph, the copy fuses into the kernel
    that computes them."""
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            args, kwargs = _streams(args, kwargs, _contiguous_grad)
        out = forward(*args, **kwargs)
        if isinstance(out, tuple) and len(out) > 1 and all(isinstance(t, torch.Tensor) for t in out):
            return tuple(t.clone(memory_format=torch.contiguous_format) for t in out)
        return out

    return run


def _contiguous_grad(t):
    return _ContiguousGrad.apply(t) if isinstance(t, torch.Tensor) and t.requires_grad else t


def use_compile_cache(folder: str) -> None:
    """Point torch.compile's on-disk caches at `folder` (created): inductor reads
    TORCHINDUCTOR_CACHE_DIR when it first looks for a cache, after this. Its entries are written
    under temporary names and renamed, so ranks and nodes can share one folder. Triton's own cache
    (flux_lora's hand-written kernels, fast/lora_kernels.py) goes in it too, under triton/."""
    if folder:
        path = Path(folder).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.compile_cache_dir {folder}: cannot create it ({e.strerror or e}); "
                              "pass a writable folder") from None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        os.environ["TRITON_CACHE_DIR"] = str(path / "triton")


def allow_compile_cache_of_fp8_functions() -> None:
    """AOTAutograd's on-disk cache skips graphs holding a custom autograd.Function (the fp8 base's
    matmuls) unless told otherwise; dynamo traces their forward and backward into the graph, so
    the cache key covers them. A warm start then skips re-tracing the joint graphs (~8 s of the
    time to first step on H100/H200; 13.6 -> 6.7 s for a tiny fp8 model on the CPU)."""
    import torch._functorch.config as config

    if hasattr(config, "autograd_cache_allow_custom_autograd_functions"):
        config.autograd_cache_allow_custom_autograd_functions = True


def keep_grads(model) -> None:
    """Allocate every trainable parameter's gradient now: autograd then adds into it instead of
    adopting the backward's output buffer (which a CUDA graph replay reuses) as the gradient."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def uses_cuda_graphs(model) -> bool:
    return getattr(model, "flux_lora_cuda_graphs", False)


def zero_grad(model, opt) -> None:
    """After an update: free the gradients, or zero them in place where CUDA graphs need them kept."""
    opt.zero_grad(set_to_none=not uses_cuda_graphs(model))


@contextlib.contextmanager
def inference_blocks(model):
    """For an inference call that the caller records into a CUDA graph of its own (previews,
    fast/graphed_inference.py): blocks compiled with CUDA graph trees run, instead, a compile of
    their forward without graphs (fused kernels that a capture can record); other blocks stay as
    they are (eager, or compiled without graphs already). The first call compiles (no autograd,
    the preview's shapes: seconds, cached like the training graphs)."""
    blocks = [b for b in transformer_blocks(model) if hasattr(b, "flux_lora_forward")] if uses_cuda_graphs(model) else []
    training = [b.forward for b in blocks]
    for block in blocks:
        if not hasattr(block, "flux_lora_inference_forward"):
            block.flux_lora_inference_forward = torch.compile(block.flux_lora_forward, dynamic=False)
        block.forward = block.flux_lora_inference_forward
    try:
        yield
    finally:
        for block, forward in zip(blocks, training):
            block.forward = forward


def eager_stance(model):
    """Context for inference with the training model (preview images): recorded CUDA graphs are
    for the training step's shapes and autograd; run those blocks eagerly instead."""
    return torch.compiler.set_stance("force_eager") if uses_cuda_graphs(model) else contextlib.nullcontext()
