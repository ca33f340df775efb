"""The fused attention op (flux_lora.attention): values and gradients against SDPA, its fake
implementation under torch.compile, and routing a FLUX transformer's attention through it.
On the CPU the op runs ATen's flash kernel; on CUDA (when present) the same tests reach cuDNN."""

import pytest
import torch

from flux_lora.fast import attention
from flux_lora.models import loading as models

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and
                     attention.supported(128, torch.bfloat16, torch.device("cuda")) else [])


def _qkv(device, shape=(2, 3, 40, 16), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3)]


@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_sdpa_values_and_gradients(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = (2, 3, 40, 16) if device == "cpu" else (2, 4, 320, 128)
    q, k, v = _qkv(device, shape, dtype)
    out, lse = attention.attention(q, k, v)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    tol = 1e-5 if device == "cpu" else 2e-2
    assert (out.float() - ref).abs().max() < tol
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-3 * max(1.0, lse.abs().max().item())
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a.float() - b).abs().max() < tol * 10


def _token_rows(device, shape=(2, 3, 40, 16), dtype=torch.float32):
    """q, k as diffusers' [B, S, H, D] viewed as [B, H, S, D]; v a view into a wider projection
    output (its tokens' rows farther apart), as FLUX's grouped single block passes it."""
    b, h, s, d = shape
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(b, s, h, d, generator=g).to(device, dtype).transpose(1, 2) for _ in range(2))
    wide = torch.randn(b, s, 3 * h * d, generator=g).to(device, dtype)
    v = wide[..., h * d: 2 * h * d].unflatten(-1, (h, d)).transpose(1, 2)
    return [t.detach().requires_grad_(True) for t in (q, k, v)]


@pytest.mark.parametrize("device", DEVICES)
def test_op_takes_token_rows_without_copies_and_answers_in_them(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = (2, 3, 40, 16) if device == "cpu" else (2, 4, 320, 128)
    q, k, v = _token_rows(device, shape, dtype)
    assert all(attention._token_rows(t) for t in (q, k, v)) and not v.transpose(1, 2).is_contiguous()
    assert all(attention._in_layout(t, True) is t for t in (q, k, v))  # handed to the kernels as they are
    out, lse = attention.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # the blocks read it as [B, S, H, D] without a copy
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    tol = 1e-5 if device == "cpu" else 2e-2
    assert (out.float() - ref).abs().max() < tol
    g = torch.randn(out.shape, dtype=dtype, device=device)  # [B, H, S, D] memory: not the output's layout
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a.float() - b).abs().max() < tol * 10
    assert all(t.transpose(1, 2).is_contiguous() for t in torch.ops.flux_lora.attention_backward(g, q, k, v, out, lse))
    # the same gradient handed in the output's own layout: the same gradients (the same bits on the
    # CPU; cuDNN's backward sums dq in no fixed order)
    again = torch.autograd.grad(attention.attention(q, k, v)[0], (q, k, v), g.transpose(1, 2).contiguous().transpose(1, 2))
    for a, b in zip(got, again):
        assert torch.equal(a, b) if device == "cpu" else (a.float() - b.float()).abs().max() < tol


def test_op_registration_is_consistent():
    # real and fake implementations agree on shapes, strides and dtypes, and autograd is wired
    torch.library.opcheck(attention.attention, tuple(_qkv("cpu")))
    torch.library.opcheck(attention.attention, tuple(_token_rows("cpu")))
    q, k, v = (t.detach() for t in _token_rows("cpu"))
    out, lse = attention.attention(q, k, v)
    torch.library.opcheck(attention.attention_backward, (torch.randn(out.shape), q, k, v, out, lse))


def test_op_compiles_without_graph_breaks_and_backpropagates():
    q, k, v = _qkv("cpu", (2, 40, 3, 16))  # diffusers' [B, S, H, D]
    fn = torch.compile(lambda q, k, v: attention._diffusers_backend(q, k, v), backend="aot_eager", fullgraph=True)
    out = fn(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_unsupported_calls_fall_back_to_sdpa():
    q, k, v = (t.detach().transpose(1, 2) for t in _qkv("cpu"))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, :20] = True
    out = attention._diffusers_backend(q, k, v, attn_mask=mask)  # the op has no mask: SDPA takes it
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                           attn_mask=mask[:, None, None, :]).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)


def test_transformer_attention_runs_through_the_op(tiny_model):
    torch.manual_seed(0)
    model = models.load_transformer(str(tiny_model), torch.float32)
    conf = model.config
    inputs = dict(hidden_states=torch.randn(1, 16, conf.in_channels), encoder_hidden_states=torch.randn(1, 8, conf.joint_attention_dim),
                  pooled_projections=torch.randn(1, conf.pooled_projection_dim), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    if conf.guidance_embeds:
        inputs["guidance"] = torch.tensor([1.0])
    before = model(**inputs)[0]
    assert not attention.in_use(model)
    # auto never picks the op on the CPU; cudnn asks for it (the op's CPU kernel here)
    assert attention.choose_backend("auto", model, torch.float32, torch.device("cpu")) == "flash"
    assert attention.choose_backend("cudnn", model, torch.float32, torch.device("cpu")) == "cudnn"
    assert attention.in_use(model)
    calls = []
    original = attention.attention

    def counting(*a):
        calls.append(1)
        return original(*a)

    attention.attention = counting
    try:
        after = model(**inputs)[0]
    finally:
        attention.attention = original
    assert len(calls) == conf.num_layers + conf.num_single_layers
    assert torch.allclose(before, after, atol=1e-5)
    other = models.load_transformer(str(tiny_model), torch.float32)
    assert not attention.in_use(other)  # the choice is per model, not global


def test_flop_counter_counts_the_op_like_sdpa():
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn):
        q, k, v = _qkv("cpu")
        with FlopCounterMode(display=False) as counter:
            fn(q, k, v).sum().backward()
        return counter.get_total_flops()

    def explicit(q, k, v):  # the same maths as batched matmuls: 2 forward, 4 backward
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

    b, h, s, d = _qkv("cpu")[0].shape
    ours = count(lambda q, k, v: attention.attention(q, k, v)[0])
    # what FlopCounterMode counts for CUDA SDPA: the backward also recomputes q·kᵀ (a 5th matmul)
    assert ours == count(explicit) + 2 * b * h * s * s * d


def test_vae_wide_head_attention_matches_sdpa_eager_and_compiled(monkeypatch):
    """The VAE mid-block's one head of 512 channels (wider than flash or cuDNN take): preprocess's
    chunked fp32 attention encodes what diffusers' SDPA processor does, in chunks smaller than an
    image, eagerly and inside the compiled encoder; narrow heads keep diffusers' processor."""
    from diffusers import AutoencoderKL

    from flux_lora.fast import wide_attention
    from helpers import _compile_on_cpu_quickly

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(512,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4).eval()
    narrow = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                           up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    assert wide_attention.use_for_wide_heads(narrow.encoder) == 0
    x = torch.rand(2, 3, 12, 20) * 2 - 1  # 240 tokens an image
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean
        assert wide_attention.use_for_wide_heads(vae.encoder) == 1  # the encoder's mid-block
        assert isinstance(vae.decoder.mid_block.attentions[0].processor, wide_attention.AttnProcessor2_0)
        monkeypatch.setattr(wide_attention, "SCORE_ELEMENTS", 100 * 240)  # 3 chunks an image
        calls = []
        real = wide_attention.chunked_attention
        monkeypatch.setattr(wide_attention, "chunked_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, ref, rtol=1e-5, atol=1e-5)
        assert calls == [1]
        _compile_on_cpu_quickly(monkeypatch)
        vae.encoder.forward = torch.compile(vae.encoder.forward, dynamic=None)
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, ref, rtol=1e-5, atol=1e-5)
