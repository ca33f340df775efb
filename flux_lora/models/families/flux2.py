"""FLUX.2 (`Flux2Pipeline`, [dev], 32 B, Mistral Small 3.1 text encoder) and FLUX.2 [klein]
(`Flux2KleinPipeline`, 4 B / 9 B, Qwen3 text encoder).

What differs from FLUX.1, as the pipelines and diffusers' train_dreambooth_lora_flux2*.py do it:
- text: one sequence, the encoder's hidden states at three layers stacked per token
  ([dev] layers 10/20/30 through Mistral's chat template with BFL's system message; [klein]
  layers 9/18/27 through Qwen3's chat template without thinking); no pooled embedding;
- latents: the VAE's 32 channels (posterior mode) patchified 2×2 to 128 channels at 1/16 of the
  image, then normalised by the VAE's batch-norm running statistics;
- packing is a plain flatten of that grid, with 4-axis ids (t, row, col, layer) = (0, r, c, 0) for
  the image and (0, 0, 0, l) for text tokens;
- [dev] has a guidance embedding; [klein] has none (its base models use true CFG at inference).
"""

from __future__ import annotations

import torch

from flux_lora.models.families.base import Family, to_host
from flux_lora.models.loading import load_errors, revision_kwargs, weights_kwargs

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_MLP = r"(ff|ff_context)\.(linear_in|linear_out)"
_SINGLE_ALL = r"attn\.(to_qkv_mlp_proj|to_out)"  # a single block's attention and MLP share these two layers

# diffusers' flux2 scripts train to_q/k/v/to_out.0 and the single blocks' fused layers by default
PRESETS = {
    "attention": rf"({_DOUBLE}{_DOUBLE_ATTN}|{_SINGLE}{_SINGLE_ALL})",
    "attention-mlp": rf"({_DOUBLE}({_DOUBLE_ATTN}|{_DOUBLE_MLP})|{_SINGLE}{_SINGLE_ALL})",
    "all-linear": rf"({_DOUBLE}|{_SINGLE}).*",
}

_COMMON = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000)
DEV_TRANSFORMER = dict(_COMMON, num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                       guidance_embeds=True)
KLEIN_4B = dict(_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                guidance_embeds=False)
KLEIN_9B = dict(_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                guidance_embeds=False)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], as Flux2Pipeline._patchify_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h·w, C], as Flux2Pipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def image_ids(h: int, w: int, device=None, time: int = 0) -> torch.Tensor:
    """[h·w, 4] ids (time, row, col, 0), as Flux2Pipeline._prepare_latent_ids (time 10, 20, ...
    marks reference images in _prepare_image_ids)."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    return torch.stack([torch.full_like(rows, time), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)


def text_ids(length: int, device=None) -> torch.Tensor:
    """[L, 4] ids (0, 0, 0, l), as Flux2Pipeline._prepare_text_ids."""
    ids = torch.zeros(length, 4, dtype=torch.int64, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent normalisation: batch-norm running mean and std over the patchified channels."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
    return mean, std


class Flux2(Family):
    name, title = "flux2", "FLUX.2 [dev]"
    pipelines = ("Flux2Pipeline",)
    pipeline_class, transformer_class, vae_class = "Flux2Pipeline", "Flux2Transformer2DModel", "AutoencoderKLFlux2"
    text_parts = ("text_encoder",)
    text_keys = ("text",)
    lora_presets = PRESETS
    preview_guidance = 4.0  # Flux2Pipeline's default (embedded guidance)
    synthetic = {"random:flux2-dev": DEV_TRANSFORMER}

    def load_text_pipeline(self, model, dtype, revision="", device=None):
        """As the base, but [dev]'s tokenizer is a PixtralProcessor, which needs torchvision for
        its image half; prompts only need its tokenizer and chat template, so without torchvision
        those are loaded alone (same token ids)."""
        try:
            return super().load_text_pipeline(model, dtype, revision, device)
        except (ImportError, ModuleNotFoundError) as e:
            if "torchvision" not in str(e).lower():
                raise
        from transformers import AutoTokenizer

        with load_errors(model, "the tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", **revision_kwargs(revision))
            if tokenizer.chat_template is None:
                tokenizer.chat_template = _processor_chat_template(model, revision)
            return self.diffusers_class(self.pipeline_class).from_pretrained(
                model, transformer=None, vae=None, tokenizer=tokenizer, dtype=dtype, **weights_kwargs(model, revision))

    @torch.no_grad()
    def encode_latents(self, vae, pixels):
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        mode = vae.encode(x).latent_dist.mode()
        mean, std = bn_stats(vae)
        return to_host((patchify(mode.float()) - mean.to(mode.device)) / std.to(mode.device))

    @torch.no_grad()
    def encode_prompts(self, text_pipe, prompts, max_sequence_length, device):
        embeds, _ = text_pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                            max_sequence_length=max_sequence_length)
        return {"text": to_host(embeds)}

    def pack(self, latents):
        return pack_latents(latents)

    def image_tokens(self, latent_shape):
        return latent_shape[-2] * latent_shape[-1]

    def cache_shapes(self, config, height, width, text_len):
        return {"latents": (config.in_channels, height // 16, width // 16), "text": (text_len, config.joint_attention_dim)}

    def transformer_kwargs(self, batch, h, w, device, dtype):
        text = batch["text"].to(device, dtype, non_blocking=True)
        return {"encoder_hidden_states": text, "txt_ids": text_ids(text.shape[1], device),
                "img_ids": image_ids(h, w, device)}

    def inference_pipeline(self, transformer, vae, scheduler):
        pipe = self.diffusers_class(self.pipeline_class)(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                                         transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def preview_kwargs(self, text, negative, control):
        return {"prompt_embeds": text["text"]}

    def _tiny_parts(self, seed: int, text_hidden: int, guidance: bool):
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * text_hidden, timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance)
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, sample_size=64)
        # non-trivial statistics, so a missing normalisation shows in tests
        vae.bn.running_mean.copy_(torch.linspace(-0.4, 0.4, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        return transformer, vae, scheduler

    def build_tiny(self, seed=0):
        from flux_lora.models import tiny

        transformer, vae, scheduler = self._tiny_parts(seed, tiny.TEXT_HIDDEN, guidance=True)
        text_encoder, tokenizer = tiny.mistral3(seed)
        return self.diffusers_class(self.pipeline_class)(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                                         tokenizer=tokenizer, transformer=transformer)


class Flux2Klein(Flux2):
    name, title = "flux2-klein", "FLUX.2 [klein]"
    pipelines = ("Flux2KleinPipeline",)
    pipeline_class = "Flux2KleinPipeline"
    preview_guidance = 4.0  # true CFG for the base models; distilled ones ignore it
    preview_negative = ""  # the pipeline's negative prompt for true CFG
    synthetic = {"random:flux2-klein-4b": KLEIN_4B, "random:flux2-klein-9b": KLEIN_9B}

    load_text_pipeline = Family.load_text_pipeline  # Qwen3's tokenizer loads anywhere

    def preview_kwargs(self, text, negative, control):
        out = {"prompt_embeds": text["text"]}
        if negative is not None:
            out["negative_prompt_embeds"] = negative["text"]
        return out

    def build_tiny(self, seed=0):
        from flux_lora.models import tiny

        transformer, vae, scheduler = self._tiny_parts(seed, tiny.TEXT_HIDDEN, guidance=False)
        text_encoder, tokenizer = tiny.qwen3(seed)
        return self.diffusers_class(self.pipeline_class)(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                                         tokenizer=tokenizer, transformer=transformer, is_distilled=False)


def _processor_chat_template(model: str, revision: str) -> str | None:
    """The chat template a processor folder keeps beside its tokenizer (chat_template.jinja/.json)."""
    import json
    from pathlib import Path

    for name in ("chat_template.jinja", "chat_template.json"):
        local = Path(model) / "tokenizer" / name
        if local.is_file():
            text = local.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


DEV = Flux2()
KLEIN = Flux2Klein()
