"""q/k/v groups (flux_lora.fast.fused_qkv): same outputs and LoRA gradients as peft's separate layers, the
same parameters and keys, no second copy of the base, and the fallbacks."""

import copy

import pytest
import torch

from flux_lora.fast import fp8, fused_qkv as fused
from flux_lora.models import loading
from flux_lora.training import lora
from helpers import _inputs, _model, _run, assert_trains_like


def test_groups_match_separate_layers(tiny_model):
    ref = _model(tiny_model)
    model = copy.deepcopy(ref)
    assert fused.fuse_attention(model) == 3  # double block: image and text q/k/v; single block: q/k/v
    attn = model.transformer_blocks[0].attn
    assert attn.fused_projections and isinstance(attn.to_qkv, fused.FusedProjection)
    assert attn.to_k.base_layer.weight.data_ptr() == attn.to_qkv.weight[attn.to_q.base_layer.out_features:].data_ptr()
    assert sorted(model.state_dict()) == sorted(ref.state_dict())  # no new keys, no duplicates
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert_trains_like(model, ref)


@pytest.mark.skipif(not fp8.matmul_works("cpu"), reason="this torch has no CPU fp8 matmul")
def test_fp8_group_matches_separate_fp8_layers(tiny_model):
    ref = _model(tiny_model, torch.bfloat16)
    fp8.convert_frozen_linears(list(ref.transformer_blocks) + list(ref.single_transformer_blocks), torch.device("cpu"))
    model = copy.deepcopy(ref)
    assert fused.fuse_attention(model) == 3 and model.transformer_blocks[0].attn.to_qkv.use_fp8
    cast = copy.deepcopy(model).to(torch.float32)  # a dtype cast keeps the fp8 weights and their scales
    assert cast.transformer_blocks[0].attn.to_qkv.weight.dtype == fp8.E4M3
    assert cast.transformer_blocks[0].attn.to_qkv.scale_out.dtype == torch.float32
    inputs = _inputs(model.config, torch.bfloat16)
    want_out, want_grads = _run(ref, inputs)
    got_out, got_grads = _run(model, inputs)
    assert torch.equal(got_out, want_out)  # the forward is the same maths
    for name, want in want_grads.items():
        # the backward quantizes q/k/v's incoming gradients with one scale per row for all three
        rel = ((got_grads[name].float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 0.1, (name, rel)


def test_unusual_lora_falls_back_to_the_layers_own_forward(tiny_model):
    ref = _model(tiny_model, dropout=0.1)  # dropout: peft draws a mask per layer
    model = copy.deepcopy(ref)
    assert fused.fuse_attention(model) == 3
    ref.eval(), model.eval()
    inputs = _inputs(model.config)
    assert torch.allclose(model(**inputs)[0], ref(**inputs)[0], atol=1e-5)


def test_mixed_lora_targets_are_left_alone(tiny_model):
    torch.manual_seed(0)
    model = loading.load_transformer(str(tiny_model), torch.float32)
    lora.add_lora(model, 4, 4, "to_q", 0.0, 0)  # LoRA on q only: k and v have none
    assert fused.fuse_attention(model) == 0
    assert not model.transformer_blocks[0].attn.fused_projections


@pytest.mark.skipif(not fp8.matmul_works("cpu"), reason="this torch has no CPU fp8 matmul")
def test_kept_transposed_fp8_weights_change_nothing_but_memory(tiny_model):
    """fp8.keep_transposed (train.fp8_transposed): the backward reads a kept Wᵀ instead of making
    it each call; outputs and LoRA gradients are bit-identical, and a q/k/v group's members (views
    of the group's weight, not what runs) get no copy of their own."""
    ref = _model(tiny_model, torch.bfloat16)
    fp8.convert_frozen_linears(list(ref.transformer_blocks) + list(ref.single_transformer_blocks), torch.device("cpu"))
    fused.fuse_attention(ref)
    model = copy.deepcopy(ref)
    fp8_params = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, (fp8.Fp8Linear, fused.FusedProjection)) and m.weight.untyped_storage().nbytes() == m.weight.numel())
    members = sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "base_layer")
                  and isinstance(m.base_layer, fp8.Fp8Linear) and m.base_layer.weight.untyped_storage().nbytes() > m.base_layer.weight.numel())
    assert members > 0  # the q/k/v members are views
    assert fp8.transposed_bytes(model) == fp8_params > 0
    assert fp8.keep_transposed(model) == fp8_params and fp8.transposed_bytes(model) == 0  # a second call adds nothing
    group = model.transformer_blocks[0].attn.to_qkv
    assert torch.equal(group.weight_t, group.weight.t()) and group.weight_t.is_contiguous()
    assert model.transformer_blocks[0].attn.to_q.base_layer.weight_t is None
    assert "weight_t" not in str(sorted(model.state_dict()))  # not saved, not exported
    inputs = _inputs(model.config, torch.bfloat16)
    want_out, want_grads = _run(ref, inputs)
    got_out, got_grads = _run(model, inputs)
    assert torch.equal(got_out, want_out)
    for name, want in want_grads.items():
        assert torch.equal(got_grads[name], want), name
