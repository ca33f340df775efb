"""DDP over the LoRA parameters: bucket choice, and compiled blocks kept whole under DDP.
    pytest -q tests/test_ddp.py"""

import gc

import pytest
import torch

from flux_lora.errors import ConfigError
from flux_lora.fast import compiled_blocks
from flux_lora.parallel import ddp
from flux_lora.parallel.session import DistInfo
from helpers import _compile_on_cpu_quickly, _loss_and_grads, _small_flux


def test_ddp_bucket_auto_is_one_bucket_on_one_host_and_overlapping_across_hosts():
    lora_bytes = 65_372_160 * 4
    assert ddp.ddp_bucket_mb(0, lora_bytes, one_host=True) * 2**20 > lora_bytes  # everything in one bucket
    assert ddp.ddp_bucket_mb(0, lora_bytes, one_host=False) == ddp.OVERLAP_BUCKET_MB
    assert ddp.ddp_bucket_mb(100, lora_bytes, one_host=True) == 100
    with pytest.raises(ConfigError, match="bucket_mb"):
        from flux_lora.config import DistConfig
        DistConfig(bucket_mb=-1)

def test_blocks_under_ddp_compile_whole_not_split_at_buckets(monkeypatch, tmp_path):
    """Inside DDP's forward dynamo would cut each block's graph where DDP's 1 MiB first bucket
    fills (FLUX.1's blocks hold 3-5 MB of LoRA each; a tiny first bucket plays that here):
    every block kind must still compile as one graph."""
    import torch.distributed as dist
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def counting(gm, example_inputs, **kw):
        graphs.append(gm)
        return aot_eager(gm, example_inputs, **kw)

    _compile_on_cpu_quickly(monkeypatch, backend=counting)
    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 64)
    torch._dynamo.reset()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    wrapped = None
    try:
        with torch._dynamo.config.patch(optimize_ddp=True):  # dynamo's default, whatever ran before
            model = _small_flux()
            compiled_blocks.compile_blocks(model)
            wrapped = ddp.wrap_ddp(model, DistInfo(0, 2, 0, torch.device("cpu"), 2), average_per_bucket=False)
            for _ in range(2):
                wrapped.zero_grad(set_to_none=True)
                _loss_and_grads(wrapped)
    finally:
        # DDP's reducer holds the group: free it (and dynamo's graphs, which hold the module) while
        # the group is whole. Freed after destroy_process_group, its gloo destructor hung a full run once.
        wrapped = model = None
        torch._dynamo.reset()
        gc.collect()
        dist.destroy_process_group()
    assert len(graphs) == 2, f"{len(graphs)} graphs (one per block kind): the blocks were split at DDP's buckets"


@pytest.mark.parametrize("max_norm", [0.5, 1e9, float("inf")])
def test_gradient_clipping_is_torchs_bit_for_bit(max_norm):
    """fsdp.clip_grad_norm_ (the update's clipping, DDP and one rank): torch's clip_grad_norm_
    maths without its per-call grouping; the same norm and the same clipped gradients, bit for bit."""
    from flux_lora.parallel import fsdp

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (16, 300, 7, 64) * 20]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    ours = [p.grad.clone() for p in params]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(theirs, ours):
        p.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    got = fsdp.clip_grad_norm_(params, max_norm)
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, theirs))
    assert (max_norm >= want) or not torch.equal(params[0].grad, ours[0])  # clipped when over
