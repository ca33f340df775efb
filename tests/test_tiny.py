"""The tiny model is a real FLUX.1 pipeline in diffusers layout.   pytest -q tests/test_tiny.py"""

import torch


def test_tiny_pipeline_loads_and_generates(tiny_model):
    from diffusers import FluxPipeline

    size = sum(f.stat().st_size for f in tiny_model.rglob("*") if f.is_file())
    assert size < 2 * 2**20
    pipe = FluxPipeline.from_pretrained(tiny_model)
    assert pipe.transformer.config.guidance_embeds
    assert len(pipe.transformer.transformer_blocks) == 1 and len(pipe.transformer.single_transformer_blocks) == 1
    assert pipe.vae.config.shift_factor not in (None, 0.0) and pipe.vae.config.scaling_factor != 1.0
    image = pipe("a photo of a cat", height=48, width=80, num_inference_steps=2, max_sequence_length=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (80, 48)


def test_tiny_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from flux_lora.models.tiny import make_tiny

    a, b = make_tiny(tmp_path / "a"), make_tiny(tmp_path / "b")
    wa = load_file(a / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "transformer" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
