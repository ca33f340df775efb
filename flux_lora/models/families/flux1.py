"""FLUX.1 text-to-image (`FluxPipeline`): CLIP pooled + T5 sequence text, a 16-channel VAE with
shift/scale normalisation, 2×2-packed latents with (0, row, col) ids, a guidance embedding.

Latents use the posterior mean, then `(mean - shift_factor) * scaling_factor`, the inverse of what
`FluxPipeline` does before decoding. The mean (not a sample) keeps the cache deterministic; the
VAE's posterior std is tiny next to the training noise.
"""

from __future__ import annotations

import torch

from flux_lora.models import synthetic
from flux_lora.models.families.base import Family, to_device, to_host

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_MLP = r"(ff|ff_context)\.net\.(0\.proj|2)"
_SINGLE_ATTN = r"attn\.(to_q|to_k|to_v)"
_SINGLE_MLP = r"(proj_mlp|proj_out)"

# Qualified patterns (peft full-matches a string target against module names), so the final
# top-level proj_out is never wrapped.
PRESETS = {
    "attention": rf"({_DOUBLE}{_DOUBLE_ATTN}|{_SINGLE}{_SINGLE_ATTN})",
    "attention-mlp": rf"({_DOUBLE}({_DOUBLE_ATTN}|{_DOUBLE_MLP})|{_SINGLE}({_SINGLE_ATTN}|{_SINGLE_MLP}))",
    "all-linear": rf"({_DOUBLE}|{_SINGLE}).*",
}

DEV_TRANSFORMER = synthetic.TRANSFORMER


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] with h, w in latent pixels (inverse of pack_latents)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32, first: float = 0.0) -> torch.Tensor:
    """[(h/2)(w/2), 3] ids (first, row, col) for a latent of h×w, as FluxPipeline._prepare_latent_image_ids
    (first = 1 marks Kontext's control image)."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.full_like(rows, first), rows, cols], dim=-1).reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[L, 3] zeros: FLUX gives every text token the same position (0, 0, 0) at inference."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


class Flux1(Family):
    name, title = "flux1", "FLUX.1"
    pipelines = ("FluxPipeline",)
    pipeline_class, transformer_class, vae_class = "FluxPipeline", "FluxTransformer2DModel", "AutoencoderKL"
    text_parts = ("text_encoder", "text_encoder_2")
    text_keys = ("t5", "clip")
    kohya_export = True
    fuses_qkv = True
    lora_presets = PRESETS
    synthetic = {"random:flux1-dev": DEV_TRANSFORMER}

    def load_vae(self, model, dtype, revision="", device=None):
        if synthetic.is_synthetic(model):
            return synthetic.vae(dtype, device or torch.device("cpu"))
        return super().load_vae(model, dtype, revision, device)

    def load_text_pipeline(self, model, dtype, revision="", device=None):
        if synthetic.is_synthetic(model):
            return synthetic.text_pipeline(dtype, device or torch.device("cpu"))
        return super().load_text_pipeline(model, dtype, revision, device)

    @torch.no_grad()
    def encode_latents(self, vae, pixels):
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        mean = vae.encode(x).latent_dist.mean
        shift = vae.config.shift_factor or 0.0
        return to_host((mean.float() - shift) * vae.config.scaling_factor)

    @torch.no_grad()
    def encode_prompts(self, text_pipe, prompts, max_sequence_length, device):
        """CLIP pooled [B, 768] and T5 sequence [B, L, 4096], as FluxPipeline.encode_prompt computes
        them; its token ids go to the GPU by waiting copies, which would drain preprocess's queue."""
        def ids(tokenizer, length):
            return to_device(tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                       return_tensors="pt").input_ids, device)

        clip, t5 = text_pipe.text_encoder, text_pipe.text_encoder_2
        pooled = clip(ids(text_pipe.tokenizer, text_pipe.tokenizer_max_length), output_hidden_states=False).pooler_output
        sequence = t5(ids(text_pipe.tokenizer_2, max_sequence_length), output_hidden_states=False)[0]
        return {"t5": to_host(sequence.to(t5.dtype)), "clip": to_host(pooled.to(clip.dtype))}

    def pack(self, latents):
        return pack_latents(latents)

    def image_tokens(self, latent_shape):
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    def cache_shapes(self, config, height, width, text_len):
        return {"latents": (config.in_channels // 4, height // 8, width // 8), "t5": (text_len, config.joint_attention_dim),
                "clip": (config.pooled_projection_dim,)}

    def transformer_kwargs(self, batch, h, w, device, dtype):
        t5 = batch["t5"].to(device, dtype, non_blocking=True)
        return {"encoder_hidden_states": t5, "pooled_projections": batch["clip"].to(device, dtype, non_blocking=True),
                "txt_ids": text_ids(t5.shape[1], device), "img_ids": image_ids(h, w, device)}

    def inference_pipeline(self, transformer, vae, scheduler):
        pipe = self.diffusers_class(self.pipeline_class)(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def preview_kwargs(self, text, negative, control):
        return {"prompt_embeds": text["t5"], "pooled_prompt_embeds": text["clip"]}

    def build_tiny(self, seed=0):
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        from flux_lora.models import tiny

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            norm_num_groups=4, layers_per_block=1, shift_factor=0.0609, scaling_factor=1.5035,
            use_quant_conv=False, use_post_quant_conv=False)
        clip, clip_tok, t5, t5_tok = tiny.clip_and_t5()
        return self.diffusers_class(self.pipeline_class)(
            scheduler=tiny.flux1_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
            tokenizer_2=t5_tok, transformer=transformer)


FAMILY = Flux1()
