"""Helpers shared by test files: small FLUX transformers with a LoRA that counts, and comparing a
model's training (output and LoRA gradients) with a reference model's."""

import contextlib

import torch

from flux_lora.models import loading
from flux_lora.parallel import session
from flux_lora.training import lora


def _inputs(conf, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = dict(hidden_states=torch.randn(2, 16, conf.in_channels, generator=g),
             encoder_hidden_states=torch.randn(2, 8, conf.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(2, conf.pooled_projection_dim, generator=g), timestep=torch.tensor([0.5, 0.7]))
    x = {k: v.to(dtype) for k, v in x.items()}
    x.update(img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    if conf.guidance_embeds:
        x["guidance"] = torch.tensor([1.0, 1.0], dtype=dtype)
    return x


def _model(tiny_model, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    model = loading.load_transformer(str(tiny_model), dtype)
    lora.add_lora(model, 4, 4, "attention-mlp", dropout, 0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: make the LoRA branch count
    return model


def _run(model, inputs):
    out = model(**inputs)[0]
    out.float().square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_trains_like(model, ref):
    """Same output and LoRA gradients (fp32) on the same inputs."""
    inputs = _inputs(model.config)
    want_out, want_grads = _run(ref, inputs)
    got_out, got_grads = _run(model, inputs)
    assert torch.allclose(got_out, want_out, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-4), name


def _small_flux(single_layers: int = 3):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=single_layers,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a LoRA that changes the output, so its gradients are checked
    return model

def _loss_and_grads(model, h: int = 8, w: int = 8):
    from flux_lora.training import flow

    g = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")
    pred = model(hidden_states=torch.randn(2, (h // 2) * (w // 2), 16, generator=g), timestep=torch.rand(2, generator=g),
                 guidance=torch.ones(2), pooled_projections=torch.randn(2, 32, generator=g),
                 encoder_hidden_states=torch.randn(2, 8, 32, generator=g), txt_ids=flow.text_ids(8, cpu),
                 img_ids=flow.image_ids(h, w, cpu), return_dict=False)[0]
    loss = pred.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora.lora_parameters(model)}

def _compile_on_cpu_quickly(monkeypatch, backend="aot_eager"):
    """compile_blocks' own dynamic setting, with aot_eager (dynamo's guards and graphs are what
    is tested; inductor's C++ codegen would take a minute on the CPU)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, dynamic=kw["dynamic"]))


@contextlib.contextmanager
def as_rank(rank: int, world: int = 2):
    """Code inside runs as if it were rank `rank` of a `world`-rank job (no process group)."""
    previous = session._INFO
    session._INFO = session.DistInfo(rank, world, rank, torch.device("cpu"), world)
    try:
        yield
    finally:
        session._INFO = previous
