"""The small FLUX.1-architecture model of the shapes world (data/shapes.py): its untrained parts
and where the pretrained copy lives. scripts/pretrain_shapes.py trains the VAE and the transformer
on one GPU in minutes; the result is saved in the diffusers layout in models/flux-shapes/ (a few MB)
and loads with FluxPipeline.from_pretrained like any FLUX.1 model. Text encoders stay random and
fixed (seeded): they only have to tell the captions apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flux_lora.models.tiny import clip_tokenizer, t5_tokenizer

PRETRAINED = Path(__file__).resolve().parents[2] / "models" / "flux-shapes"
TEXT_TOKENS = 48  # T5 tokens of a caption ("a yellow triangle on a white background" is 44 characters)

TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
                   axes_dims_rope=(8, 12, 12))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=16, use_quant_conv=False, use_post_quant_conv=False)


def build_pipeline(seed: int = 0):
    """The untrained pipeline: random transformer and VAE, the fixed random text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=max(len(tok2), 128), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=AutoencoderKL(**VAE), text_encoder=clip.eval(), tokenizer=tok,
                        text_encoder_2=t5.eval(), tokenizer_2=tok2, transformer=FluxTransformer2DModel(**TRANSFORMER))


def load_pipeline(path: str | Path = PRETRAINED, device: torch.device | str = "cpu"):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path), dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, batch: int = 16) -> list:
    """One 64×64 image per (prompt, seed), each from its own seeded generator (batch-independent)."""
    device = pipe.transformer.device
    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(zip(prompts[start:start + batch], seeds[start:start + batch]))
        gens = [torch.Generator(device=device).manual_seed(s) for _, s in chunk]
        out = pipe([p for p, _ in chunk], height=64, width=64, num_inference_steps=steps, guidance_scale=1.0,
                   generator=gens, max_sequence_length=TEXT_TOKENS, output_type="pil")
        images += out.images
    return images
