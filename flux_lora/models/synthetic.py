"""Full-size models with random weights, built in code: `--model random:flux1-dev` (every part of
FLUX.1-dev), and a transformer alone for the other families (`random:flux2-dev`, ...; their
configs live in their family modules).

Weights cannot be downloaded on the benchmark machines, and random weights cost exactly what the
real ones cost, so scripts/bench.py and the scaling runs drive the real `preprocess` and `train`
commands with these model ids. Tokenizers are the small code-built ones of flux_lora.tiny
(token ids stay far below the real vocabularies), and every rank builds identical weights (seeded).
"""

from __future__ import annotations

import contextlib

import torch

PREFIX = "random:"

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
          layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def check(model: str) -> None:
    from flux_lora.models import families

    families.of_model(model)  # raises for an unknown name, listing the known ones


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Allocate and initialise directly on the device in the target dtype (12 B params in ~1 s on a GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(previous)


def build(cls, config: dict, dtype: torch.dtype, device: torch.device):
    """A model of class cls with this config, random (seeded) weights, built in place on the device.
    One for the host (a run that stages its base on the CPU: FSDP2, a quantized base on a small
    card) is drawn on the GPU when there is one, a layer at a time: the CPU's own init of 12-32 B
    parameters takes minutes, and a whole build on the GPU would put the base there at once, which
    is what staging on the host avoids (FLUX.2 [dev]: 61 GiB before FSDP2 sharded it)."""
    if device.type == "cpu" and torch.cuda.is_available():
        return drawn_layer_by_layer(cls, config, dtype, torch.device("cuda", torch.cuda.current_device()))
    with _building(dtype, device):
        return cls(**config)


def drawn_layer_by_layer(cls, config: dict, dtype: torch.dtype, draw_on: torch.device):
    """cls(**config) on the CPU, built on the meta device and each layer then allocated and
    initialised (its own reset_parameters) on `draw_on` and moved to the CPU: at most one layer
    on `draw_on` at a time. Models whose parameters or buffers are not all held by such layers
    are built on the CPU directly."""
    with _building(dtype, torch.device("meta")):
        model = cls(**config)
    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if next(model.buffers(), None) is not None or any(
            not hasattr(m, "reset_parameters") or next(m.children(), None) is not None for m in owners):
        with _building(dtype, torch.device("cpu")):
            return cls(**config)
    with _building(dtype, draw_on):
        for layer in owners:
            layer.to_empty(device=draw_on, recurse=False)
            layer.reset_parameters()
            layer.to("cpu")
    return model


def transformer(dtype: torch.dtype, device: torch.device):
    from diffusers import FluxTransformer2DModel

    return build(FluxTransformer2DModel, TRANSFORMER, dtype, device)


def vae(dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    with _building(dtype, device, seed=1):
        return AutoencoderKL(**VAE)


def text_pipeline(dtype: torch.dtype, device: torch.device):
    from diffusers import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_lora.models.tiny import clip_tokenizer, t5_tokenizer

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    with _building(dtype, device, seed=2):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
        t5 = T5EncoderModel(T5Config(**T5))
    return FluxPipeline(scheduler=scheduler(), vae=None, text_encoder=clip.eval(), tokenizer=tok,
                        text_encoder_2=t5.eval(), tokenizer_2=tok2, transformer=None)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
