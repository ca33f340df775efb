"""FLUX.1 Kontext image editing (`FluxKontextPipeline`): FLUX.1's encoders, latents and transformer,
trained on (control, target) pairs. As the pipeline builds its sequence at inference, the control
image's packed latents are appended after the noisy target's tokens with ids (1, row, col), and
the prediction is cut back to the target's tokens, so the loss covers the target only."""

from __future__ import annotations

import torch

from flux_lora.models.families import flux1


class Kontext(flux1.Flux1):
    name, title = "flux1-kontext", "FLUX.1 Kontext"
    pipelines = ("FluxKontextPipeline",)
    pipeline_class = "FluxKontextPipeline"
    paired = True
    preview_guidance = 2.5  # FluxKontextPipeline's default
    synthetic = {"random:flux1-kontext-dev": flux1.DEV_TRANSFORMER}

    def cache_shapes(self, config, height, width, text_len):
        shapes = super().cache_shapes(config, height, width, text_len)
        return {**shapes, "control": shapes["latents"]}

    def transformer_kwargs(self, batch, h, w, device, dtype):
        out = super().transformer_kwargs(batch, h, w, device, dtype)
        control = batch["control"].to(device, non_blocking=True).float()
        ch, cw = control.shape[-2:]
        out["extra_tokens"] = flux1.pack_latents(control)
        out["img_ids"] = torch.cat([out["img_ids"], flux1.image_ids(ch, cw, device, first=1.0)])
        return out

    def preview_kwargs(self, text, negative, control):
        # a tensor with the VAE's latent channels is taken as the control image's latents as they are
        return {**super().preview_kwargs(text, negative, control), "image": control}

    def size_kwargs(self, height, width):
        # FluxKontextPipeline rescales its output to max_area (default 1024²) whatever height/width
        # say, and its control image to a preferred ~1 MP size unless told not to: keep both as
        # trained, where the control has the output's size
        return {"height": height, "width": width, "max_area": height * width, "_auto_resize": False}

    def build_tiny(self, seed=0):
        pipe = super().build_tiny(seed)
        return self.diffusers_class(self.pipeline_class)(**pipe.components)


FAMILY = Kontext()
