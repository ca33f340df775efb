"""FLUX.1 single blocks with q, k, v and proj_mlp as one projection (flux_lora.fast.single_block):
the same loss and LoRA gradients as diffusers' block (RoPE on), over bf16, fp8 and the one-addmm
LoRA-up, the same keys, one graph under torch.compile, and diffusers' forward where the group
does not apply.
    pytest -q tests/test_single_block.py"""

import copy
import io

import pytest
import torch

from flux_lora.fast import fp8, fused_qkv, lora_up, single_block
from flux_lora.training import lora
from helpers import _loss_and_grads, _small_flux


def _assert_same_training(model, ref, atol=1e-5):
    want_loss, want = _loss_and_grads(ref)
    got_loss, got = _loss_and_grads(model)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0), (got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=atol), name


@pytest.mark.parametrize("up_add", [False, True])
def test_grouped_blocks_train_like_diffusers_blocks(up_add):
    ref = _small_flux()
    model = copy.deepcopy(ref)
    if up_add:
        lora_up.install(model)
    assert single_block.group(model, up_add=up_add) == 3
    assert fused_qkv.fuse_attention(model, up_add=up_add) == 4  # the double blocks' image and text q/k/v
    block = model.single_transformer_blocks[0]
    assert type(block).__name__ == "GroupedFluxSingleTransformerBlock" and not block.attn.fused_projections
    group = block.to_qkv_mlp
    assert group.split_sizes == [32, 32, 32, 128]
    assert block.proj_mlp.base_layer.weight.data_ptr() == group.weight[96:].data_ptr()  # a view: no second copy
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    assert lora.lora_state_dict(model).keys() == lora.lora_state_dict(ref).keys()
    _assert_same_training(model, ref)


@pytest.mark.skipif(not fp8.matmul_works("cpu"), reason="this torch has no CPU fp8 matmul")
def test_fp8_group_matches_separate_fp8_layers():
    ref = _small_flux().to(torch.bfloat16)
    fp8.convert_frozen_linears(list(ref.transformer_blocks) + list(ref.single_transformer_blocks), torch.device("cpu"))
    model = copy.deepcopy(ref)
    assert single_block.group(model) == 3 and model.single_transformer_blocks[0].to_qkv_mlp.use_fp8
    assert fp8.keep_transposed(model) > 0 and model.single_transformer_blocks[0].to_qkv_mlp.weight_t is not None
    with torch.autocast("cpu", torch.bfloat16):  # as training runs it
        want_loss, want = _loss_and_grads(ref)
        got_loss, got = _loss_and_grads(model)
    assert torch.equal(got_loss, want_loss)  # the forward quantizes the same input rows the same way
    for name in want:
        # the backward quantizes the four members' incoming gradients with one scale per row
        rel = ((got[name].float() - want[name].float()).norm() / want[name].float().norm()).item()
        assert rel < 0.1, (name, rel)


def test_one_graph_under_compile():
    model = _small_flux()
    single_block.group(model)
    block = model.single_transformer_blocks[0]
    block.forward = torch.compile(block.forward, backend="aot_eager", fullgraph=True)  # a graph break fails
    ref = _small_flux()
    _assert_same_training(model, ref)


def test_unusual_blocks_keep_diffusers_forward():
    ref = _small_flux()
    mixed = _small_flux()
    for block in mixed.single_transformer_blocks:  # no LoRA on proj_mlp: the group would mix LoRA and none
        block.proj_mlp = block.proj_mlp.base_layer
    assert single_block.group(mixed) == 0
    assert fused_qkv.fuse_attention(mixed) == 4 + 3  # q/k/v still grouped in the single blocks' attention

    other = _small_flux()
    from diffusers.models.attention_processor import AttnProcessor2_0

    other.single_transformer_blocks[0].attn.processor = AttnProcessor2_0()
    assert single_block.group(other) == 2  # another processor: that block stays as it is

    model = copy.deepcopy(ref)
    single_block.group(model)
    block, plain = model.single_transformer_blocks[0], ref.single_transformer_blocks[0]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 32, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g))
    with torch.no_grad():  # joint_attention_kwargs go to the processor: diffusers' own forward runs
        got = block(*args, joint_attention_kwargs={"attention_mask": None})
        want = plain(*args, joint_attention_kwargs={"attention_mask": None})
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_a_pickled_grouped_model_loads():
    model = _small_flux()
    single_block.group(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded.single_transformer_blocks[0]) is type(model.single_transformer_blocks[0])
