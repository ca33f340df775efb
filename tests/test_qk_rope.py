"""FLUX's q/k RMSNorm + rotary embedding as one op (flux_lora.fast.qk_rope): values and gradients
against diffusers' two steps (torch's RMSNorm, apply_rotary_emb), where it applies, that FLUX.1's
grouped single block takes it, and on CUDA the Triton forward against the torch one."""

import pickle

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from flux_lora.fast import lora_kernels, qk_rope


def _case(dtype=torch.float64, device="cpu", b=2, s=6, h=3, d=8, strided=True):
    g = torch.Generator(device).manual_seed(0)
    wide = torch.randn(b, s, 2 * h * d, dtype=dtype, device=device, generator=g)
    x = (wide[..., h * d:] if strided else wide[..., :h * d].contiguous()).unflatten(-1, (h, d))  # a slice, as of a projection
    norm = torch.nn.RMSNorm(d, eps=1e-6, device=device, dtype=dtype).requires_grad_(False)
    norm.weight.copy_(torch.rand(d, dtype=dtype, device=device, generator=g) + 0.5)
    angles = torch.rand(s, d // 2, dtype=torch.float64, device=device, generator=g) * 6
    rotary = (angles.cos().repeat_interleave(2, -1).float(), angles.sin().repeat_interleave(2, -1).float())
    return x, norm, rotary


def _diffusers(norm, x, rotary):
    return apply_rotary_emb(norm(x), rotary, sequence_dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_diffusers_values_and_gradients(dtype):
    x, norm, rotary = _case(dtype)
    x = x.detach().requires_grad_()
    got = qk_rope.norm_rope(norm, x, rotary)
    assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype  # attention's layout
    want = _diffusers(norm, x, rotary)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    upstream = torch.randn(x.shape, dtype=dtype)
    grad_got, = torch.autograd.grad(got, x, upstream)
    grad_want, = torch.autograd.grad(want, x, upstream)
    assert torch.allclose(grad_got.float(), grad_want.float(), atol=tol * 10, rtol=tol * 10)


def test_gradcheck_and_registration():
    x, norm, rotary = _case(torch.float64)
    rotary = tuple(r.double() for r in rotary)
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: qk_rope._forward(t, norm.weight, None, None, 1e-6, *rotary)[0], (x,))
    text, image = x[:, :2].detach().requires_grad_(), x[:, 2:].detach().requires_grad_()
    weight2 = norm.weight.flip(0)
    assert torch.autograd.gradcheck(lambda t, i: qk_rope._forward(t, norm.weight, i, weight2, 1e-6, *rotary)[0], (text, image))
    f = (lambda t: t.detach().float())
    torch.library.opcheck(qk_rope._forward, (f(x), f(norm.weight), None, None, 1e-6, *map(f, rotary)))
    torch.library.opcheck(qk_rope._forward, (f(text), f(norm.weight), f(image), f(weight2), 1e-6, *map(f, rotary)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_parts_match_diffusers_double_block_order(dtype):
    """A double block norms the text's and the image's q with their own weights, joins them (text
    first) and rotates the joined sequence."""
    x, norm, rotary = _case(dtype)
    text, image = x[:, :2].detach().requires_grad_(), x[:, 2:].detach().requires_grad_()
    norm_text = torch.nn.RMSNorm(x.shape[-1], eps=1e-6, dtype=dtype).requires_grad_(False)
    norm_text.weight.copy_(norm.weight.flip(0))
    got = qk_rope.norm_rope(norm_text, text, rotary, norm, image)
    want = apply_rotary_emb(torch.cat([norm_text(text), norm(image)], dim=1), rotary, sequence_dim=1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    upstream = torch.randn(want.shape, dtype=dtype)
    for a, b in zip(torch.autograd.grad(got, (text, image), upstream), torch.autograd.grad(want, (text, image), upstream)):
        assert torch.allclose(a.float(), b.float(), atol=tol * 10, rtol=tol * 10)


def test_applies_only_where_it_computes_diffusers_maths():
    x, norm, rotary = _case(torch.float32)
    assert qk_rope.applies(norm, x, rotary)
    assert not qk_rope.applies(torch.nn.RMSNorm(8, elementwise_affine=False), x, rotary)  # no weight
    assert not qk_rope.applies(torch.nn.RMSNorm(8), x, rotary)  # a weight that trains
    assert not qk_rope.applies(norm, x, (rotary[0][:-1], rotary[1][:-1]))  # another sequence
    assert not qk_rope.applies(norm, x, None)


def test_grouped_single_block_takes_the_op(monkeypatch):
    from flux_lora.fast import single_block
    from helpers import _small_flux

    calls = []
    real = qk_rope.norm_rope
    monkeypatch.setattr(qk_rope, "norm_rope", lambda *a: calls.append(1) or real(*a))
    model = _small_flux(single_layers=1)
    assert single_block.group(model) == 1
    block = model.single_transformer_blocks[0]
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(2)
    block(torch.randn(2, 24, dim, generator=g), torch.randn(2, 8, dim, generator=g), torch.randn(2, dim, generator=g),
          image_rotary_emb=model.pos_embed(torch.zeros(32, 3)))
    assert len(calls) == 2  # q and k


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and lora_kernels.available(torch.zeros(1, device="cuda", dtype=torch.bfloat16))),
                          reason="needs CUDA and triton")


@cuda
@pytest.mark.parametrize("shape", [(2, 6, 3, 128), (4, 1536, 24, 128), (1, 77, 5, 64)])
def test_triton_forward_matches_torch_and_repeats(shape):
    b, s, h, d = shape
    x, norm, rotary = _case(torch.bfloat16, "cuda", b, s, h, d)
    got, rstd = qk_rope._forward(x, norm.weight, None, None, 1e-6, *rotary)
    want = _diffusers(norm, x, rotary)
    assert got.is_contiguous() and got.dtype == torch.bfloat16
    assert torch.allclose(rstd, torch.rsqrt(x.float().square().mean(-1) + 1e-6), rtol=1e-5)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2
    assert torch.equal(qk_rope._forward(x, norm.weight, None, None, 1e-6, *rotary)[0], got)
    text, image = x[:, : s // 3], x[:, s // 3:]
    two = qk_rope._forward(text, norm.weight, image, norm.weight.flip(0), 1e-6, *rotary)[0]
    assert torch.equal(two[:, : s // 3], got[:, : s // 3])  # the text's rows: the same maths, the same bits
    norm.weight.copy_(norm.weight.flip(0))
    assert torch.equal(two[:, s // 3:], qk_rope._forward(x, norm.weight, None, None, 1e-6, *rotary)[0][:, s // 3:])


def test_double_blocks_processor_matches_diffusers(monkeypatch):
    import copy

    from helpers import _loss_and_grads, _small_flux

    ref = _small_flux()
    model = copy.deepcopy(ref)
    assert qk_rope.install(model) == len(model.transformer_blocks)
    calls = []
    real = qk_rope.norm_rope
    monkeypatch.setattr(qk_rope, "norm_rope", lambda *a: calls.append(1) or real(*a))
    loss, grads = _loss_and_grads(model)
    want_loss, want_grads = _loss_and_grads(ref)
    assert len(calls) == 2 * len(model.transformer_blocks)  # q and k of each double block
    assert torch.allclose(loss, want_loss, rtol=1e-5)
    for name, grad in want_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
    assert type(pickle.loads(pickle.dumps(model.transformer_blocks[0].attn.processor))).__name__.startswith("JointNormRope")


def test_double_block_with_the_processor_is_one_graph_under_compile():
    from flux_lora.fast import fused_qkv
    from helpers import _small_flux

    model = _small_flux()
    fused_qkv.fuse_attention(model)
    qk_rope.install(model)
    block = model.transformer_blocks[0]
    g = torch.Generator().manual_seed(3)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    kwargs = dict(hidden_states=torch.randn(2, 16, dim, generator=g), encoder_hidden_states=torch.randn(2, 8, dim, generator=g),
                  temb=torch.randn(2, dim, generator=g), image_rotary_emb=model.pos_embed(torch.zeros(24, 3)))
    want = block(**kwargs)
    torch._dynamo.reset()
    got = torch.compile(block, backend="aot_eager", fullgraph=True)(**kwargs)  # fullgraph: a break would raise
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
