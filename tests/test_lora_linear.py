"""A LoRA layer over a plain base as one op (flux_lora.fast.lora_linear): its values and gradients
against the three matmuls it replaces, its FLOPs, whole models (plain layers and q/k/v groups, with
and without autocast) against peft's forward, where it does not apply, and on CUDA the Triton path
against the addmm one."""

import copy

import pytest
import torch

from flux_lora.fast import fp8, fused_qkv as fused, lora_kernels, lora_linear, lora_up
from helpers import _inputs, _model, _run, assert_trains_like


def _operands(dtype=torch.float64, device="cpu", bias=True):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=dtype, device=device, generator=g, requires_grad=True)
    w = torch.randn(7, 6, dtype=dtype, device=device, generator=g)
    b0 = torch.randn(7, dtype=dtype, device=device, generator=g) if bias else None
    a = torch.randn(3, 6, dtype=dtype, device=device, generator=g, requires_grad=True)
    b = torch.randn(7, 3, dtype=dtype, device=device, generator=g, requires_grad=True)
    return x, w, b0, a, b


@pytest.mark.parametrize("bias", [True, False])
def test_op_values_gradients_and_registration(bias):
    x, w, b0, a, b = _operands(bias=bias)
    want = x @ w.t() + 0.5 * (x @ a.t()) @ b.t() + (b0 if bias else 0)
    assert torch.allclose(lora_linear.lora_linear(x, w, b0, a, b, 0.5, False, torch.float64), want)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear.lora_linear(x, w, b0, a, b, 0.5, False, torch.float64),
                                    (x, a, b))
    f = (lambda t: None if t is None else t.detach().float())
    torch.library.opcheck(lora_linear._forward, (f(x), f(w), f(b0), f(a), f(b), 2.0, False))
    for need_dx in (True, False):
        torch.library.opcheck(lora_linear._backward_op,
                              (torch.randn(2, 5, 7), f(x), torch.randn(2, 5, 3), f(w), f(a), f(b), 2.0, True, need_dx))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # bench.py's MFU: the base twice, the LoRA's matmuls thrice
        lora_linear.lora_linear(x, w, b0, a, b, 0.5, False, torch.float64).sum().backward()
    m, k, n, r = 10, 6, 7, 3
    assert counter.get_total_flops() == 2 * (2 * m * k * n) + 3 * (2 * m * k * r + 2 * m * r * n)


def test_input_without_gradient_skips_dx():
    """The first block's q/k/v read inputs that need no gradient: the backward leaves out dx's two
    matmuls and gives the LoRA the same gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b0, a, b = _operands()
    grads = {}
    for needs in (True, False):
        xi = x.detach().requires_grad_(needs)
        a.grad = b.grad = None
        with FlopCounterMode(display=False) as counter:
            lora_linear.lora_linear(xi, w, b0, a, b, 0.5, False, torch.float64).sum().backward()
        grads[needs] = (a.grad.clone(), b.grad.clone(), counter.get_total_flops())
        assert (xi.grad is not None) == needs
    m, k, n, r = 10, 6, 7, 3
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])
    assert grads[True][2] - grads[False][2] == 2 * m * n * k + 2 * m * r * k


def _counting(monkeypatch):
    calls = []
    real = lora_linear.lora_linear
    monkeypatch.setattr(lora_linear, "lora_linear", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


@pytest.mark.parametrize("group_qkv", [False, True])
def test_model_takes_the_op_and_trains_like_peft(tiny_model, monkeypatch, group_qkv):
    ref = _model(tiny_model)
    model = copy.deepcopy(ref)
    n = lora_up.install(model)
    groups = fused.fuse_attention(model, up_add=True) if group_qkv else 0
    calls = _counting(monkeypatch)
    assert_trains_like(model, ref)
    assert len(calls) == n - 2 * groups  # every layer once (three members a group), in fp32
    monkeypatch.setattr(lora_linear, "ENABLED", False)  # bench.py's toggle: lora_up's path, same result
    calls.clear()
    assert_trains_like(model, ref)
    assert not calls


def test_autocast_runs_the_op_in_the_bases_dtype(tiny_model, monkeypatch):
    ref = _model(tiny_model, torch.bfloat16)  # bf16 base, fp32 LoRA: the training step's setting
    model = copy.deepcopy(ref)
    lora_up.install(model)
    fused.fuse_attention(model, up_add=True)
    calls = _counting(monkeypatch)
    inputs = _inputs(model.config, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out, want_grads = _run(ref, inputs)
        got_out, got_grads = _run(model, inputs)
    assert calls and set(calls) == {torch.bfloat16}
    assert ((got_out.float() - want_out.float()).norm() / want_out.float().norm()).item() < 0.01
    for name, want in want_grads.items():
        assert got_grads[name].dtype == torch.float32  # the LoRA's own dtype, as peft's
        rel = ((got_grads[name] - want).norm() / want.norm()).item()
        assert rel < 0.03, (name, rel)


def test_other_bases_keep_their_path(tiny_model, monkeypatch):
    calls = _counting(monkeypatch)
    mixed = _model(tiny_model, torch.bfloat16)  # bf16 base, fp32 LoRA, no autocast: peft's casts
    lora_up.install(mixed)
    mixed(**_inputs(mixed.config, torch.bfloat16))
    assert not calls
    if fp8.matmul_works("cpu"):  # an fp8 base: torch._scaled_mm cannot add a matrix
        model = _model(tiny_model, torch.bfloat16)
        fp8.convert_frozen_linears(list(model.transformer_blocks) + list(model.single_transformer_blocks), torch.device("cpu"))
        lora_up.install(model)
        fused.fuse_attention(model, up_add=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**_inputs(model.config, torch.bfloat16))
        assert any(isinstance(m, fp8.Fp8Linear) for m in model.modules()) and not calls


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and lora_kernels.available(torch.zeros(1, device="cuda", dtype=torch.bfloat16))),
                          reason="needs CUDA and triton")


@cuda
@pytest.mark.parametrize("bias", [True, False])
def test_triton_path_matches_addmm_path_and_fp32(bias):
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 700, 384, **bf, requires_grad=True)
    w, b0 = torch.randn(1024, 384, **bf) / 20, (torch.randn(1024, **bf) if bias else None)
    a = (torch.randn(16, 384, **bf) / 20).requires_grad_()
    b = torch.randn(1024, 16, **bf, requires_grad=True)
    results = {}
    for triton in (False, True):
        y = lora_linear.lora_linear(x, w, b0, a, b, 0.5, triton, torch.bfloat16)
        y.float().square().mean().backward()
        results[triton] = [y.detach().float()] + [t.grad.float() for t in (x, a, b)]
        x.grad = a.grad = b.grad = None
        assert torch.equal(lora_linear.lora_linear(x, w, b0, a, b, 0.5, triton, torch.bfloat16).float(), results[triton][0])
    xf, wf, af, bf_ = (t.detach().double() for t in (x, w, a, b))
    want = xf @ wf.t() + 0.5 * (xf @ af.t()) @ bf_.t() + (b0.double() if bias else 0)
    assert ((results[True][0] - want).norm() / want.norm()).item() < 1e-2
    for got, ref in zip(results[True], results[False]):
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2
