"""Inference forwards replayed from CUDA graphs (preview images during training).

A denoising loop calls the transformer 20-50 times on inputs of one shape. Eagerly, each call is
thousands of kernel launches (the LoRA's beside every base layer), and the host, not the GPU,
sets the pace. Under `graphed_forward(model)` the first call of a shape runs eagerly (warming up
cuBLAS and the allocator), the second records it into a CUDA graph, and later calls copy their
inputs into the recorded ones and replay it. The graphs read the weights where they lie, so they
see the LoRA as trained so far; they are dropped when the context ends (their memory with them).
"""

from __future__ import annotations

import contextlib

import torch


class GraphedForward:
    """Stands in for model.forward: eager for the first call of each shape, then one graph per shape."""

    def __init__(self, forward):
        self.forward = forward
        self.warm: set = set()
        self.graphs: dict = {}  # key -> (graph, static inputs, static outputs)
        self.failure: str | None = None  # why recording failed (then every call runs eagerly)

    @staticmethod
    def key(kwargs: dict):
        """The call's shapes, dtypes and other arguments, or None where a graph cannot stand in
        (an argument that is neither a tensor nor plain values, or a dict/ModelOutput result).
        Plain values include a dict of them: FluxPipeline passes joint_attention_kwargs={}."""
        def plain(value) -> bool:
            if isinstance(value, dict):
                return all(isinstance(k, str) and plain(v) for k, v in value.items())
            return value is None or isinstance(value, (bool, int, float, str))

        parts = []
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                parts.append((name, tuple(value.shape), value.dtype, value.device))
            elif plain(value):
                parts.append((name, repr(sorted(value.items())) if isinstance(value, dict) else value))
            else:
                return None
        return tuple(parts) if kwargs.get("return_dict") is False else None

    def __call__(self, *args, **kwargs):
        key = None if args or self.failure else self.key(kwargs)
        if key is None:
            return self.forward(*args, **kwargs)
        if key not in self.warm:  # first of its shape: eager, on a side stream as graph capture wants
            self.warm.add(key)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.forward(**kwargs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if key not in self.graphs:
            static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    outputs = self.forward(**static)
            except RuntimeError as e:  # something in the forward cannot be recorded: eager from now on
                self.failure = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
                torch.cuda.synchronize()
                return self.forward(**kwargs)
            self.graphs[key] = (graph, static, outputs)
        graph, static, outputs = self.graphs[key]
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value)
        graph.replay()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)


def can_graph(model, device: torch.device) -> bool:
    """CUDA, and weights that stay where they are between calls: not FSDP2's (gathered into new
    memory each forward), not bitsandbytes' 4-bit ones (their kernels are not checked under capture)."""
    from flux_lora.parallel import fsdp

    if device.type != "cuda" or fsdp.is_sharded(model):
        return False
    return not any(type(p).__name__ == "Params4bit" for p in model.parameters())


@contextlib.contextmanager
def graphed_forward(model, enabled: bool = True):
    """model.forward replaced by a GraphedForward (yielded; None when not enabled) until the
    context ends; blocks compiled with CUDA graph trees of their own run a plain compile of their
    forward meanwhile (those graphs are for the training step; a capture cannot contain them).
    Under autocast, its cast cache must be off (`cache_enabled=False`): a graph replays the casts
    it recorded."""
    if not enabled:
        yield None
        return
    from flux_lora.fast.compiled_blocks import inference_blocks

    own = model.__dict__.get("forward")  # a forward set on the instance (a hook's), kept
    graphed = model.forward = GraphedForward(model.forward)
    try:
        with inference_blocks(model):
            yield graphed
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
        torch.cuda.synchronize()
