"""The one-addmm LoRA up-projection (flux_lora.fast.lora_up): the op's values and gradients, the same
outputs, gradients and keys as peft's forward on a whole model (alone, in q/k/v groups, over an
fp8 base), one graph under torch.compile, and peft's path where the shortcut does not apply."""

import copy
import io

import pytest
import torch

from flux_lora.fast import fp8, fused_qkv as fused, lora_linear, lora_up
from flux_lora.training import lora
from helpers import _inputs, _model, _run, assert_trains_like


def test_op_values_gradients_and_registration():
    g = torch.Generator().manual_seed(0)
    y, h, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 5, 7), (2, 5, 3), (7, 3)))
    out = lora_up.lora_up_add(y, h, b, 0.5)
    assert torch.allclose(out, y + 0.5 * h @ b.t())
    assert torch.autograd.gradcheck(lambda *t: lora_up.lora_up_add(*t, 0.5), (y, h, b))
    torch.library.opcheck(lora_up.lora_up_add, (y.detach().float(), h.detach().float(), b.detach().float(), 2.0))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # bench.py's MFU counts it like the matmul it is
        lora_up.lora_up_add(y.detach(), h.detach(), b.detach(), 0.5)
    assert counter.get_total_flops() == 2 * 2 * 5 * 3 * 7


def _layers(model):
    return [m for m in model.modules() if isinstance(m, lora_up._peft_linear())]


@pytest.mark.parametrize("group_qkv", [False, True])
def test_model_matches_peft_forward(tiny_model, group_qkv):
    ref = _model(tiny_model)
    model = copy.deepcopy(ref)
    n = lora_up.install(model)
    assert n == len(_layers(ref)) > 0 and all(type(m).__name__.startswith("UpAdd") for m in _layers(model))
    if group_qkv:
        assert fused.fuse_attention(model, up_add=True) == 3
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    assert lora.lora_state_dict(model).keys() == lora.lora_state_dict(ref).keys()
    if not group_qkv:  # torch.save of the whole model finds the layer class by name
        buffer = io.BytesIO()
        torch.save(model, buffer)
        assert type(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).transformer_blocks[0].attn.to_q) \
            is type(model.transformer_blocks[0].attn.to_q)
    assert_trains_like(model, ref)


def test_shortcut_is_taken_and_dropout_keeps_pefts_path(tiny_model, monkeypatch):
    calls = []
    real_up_add, real_linear = lora_up.up_add, lora_linear.lora_linear
    monkeypatch.setattr(lora_up, "up_add", lambda *a: calls.append(1) or real_up_add(*a))
    monkeypatch.setattr(lora_linear, "lora_linear", lambda *a: calls.append(1) or real_linear(*a))
    model = _model(tiny_model)
    lora_up.install(model)
    model(**_inputs(model.config))
    assert len(calls) == len(_layers(model))
    calls.clear()
    ref = _model(tiny_model, dropout=0.1)
    with_dropout = copy.deepcopy(ref)
    lora_up.install(with_dropout)
    ref.eval(), with_dropout.eval()
    inputs = _inputs(ref.config)
    assert torch.allclose(with_dropout(**inputs)[0], ref(**inputs)[0], atol=1e-6) and not calls


def test_one_graph_under_compile(tiny_model):
    model = _model(tiny_model)
    lora_up.install(model)
    fused.fuse_attention(model, up_add=True)
    block = model.single_transformer_blocks[0]
    want = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    g = torch.Generator().manual_seed(2)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    args = (torch.randn(2, 24, dim, generator=g), torch.randn(2, 8, dim, generator=g), torch.randn(2, dim, generator=g))
    rope = model.pos_embed(torch.zeros(32, 3))
    kwargs = dict(hidden_states=args[0], encoder_hidden_states=args[1], temb=args[2], image_rotary_emb=rope)
    got = compiled(**kwargs)
    ref = want(**kwargs)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-5)
    sum(t.square().sum() for t in got).backward()
    sum(t.square().sum() for t in ref).backward()
    for (name, p), q in zip(block.named_parameters(), want.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


@pytest.mark.skipif(not fp8.matmul_works("cpu"), reason="this torch has no CPU fp8 matmul")
def test_fp8_base(tiny_model):
    ref = _model(tiny_model, torch.bfloat16)
    fp8.convert_frozen_linears(list(ref.transformer_blocks) + list(ref.single_transformer_blocks), torch.device("cpu"))
    model = copy.deepcopy(ref)
    lora_up.install(model)
    fused.fuse_attention(model, up_add=True)
    inputs = _inputs(model.config, torch.bfloat16)
    want_out, want_grads = _run(ref, inputs)
    got_out, got_grads = _run(model, inputs)
    # peft sums in fp32 (fp32 LoRA, no autocast on the CPU); the op sums in fp32 too: one rounding
    assert ((got_out.float() - want_out.float()).norm() / want_out.float().norm()).item() < 0.02
    for name, want in want_grads.items():
        rel = ((got_grads[name].float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 0.1, (name, rel)
