"""Caption handling: trigger words, and a batched auto-captioner for images without a .txt.

The default captioner is BLIP large (`Salesforce/blip-image-captioning-large`, ~1.9 GB), which
transformers loads natively, so no remote code runs. Any image-to-text model that
`AutoModelForImageTextToText` (or BLIP's class) loads works via --captioner ID_OR_PATH.
"""

from __future__ import annotations

import re

import torch

from flux_lora.errors import ModelError

TRIGGER_PLACEHOLDER = "[trigger]"


def replace_trigger(caption: str, trigger: str, word: str) -> str:
    """The caption with every whole-word occurrence of the trigger replaced by `word` (the class
    word of preservation: "sks, a photo of sks" -> "person, a photo of person")."""
    return re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", word, caption) if trigger else caption


def apply_trigger(caption: str, trigger: str) -> str:
    """Replace a [trigger] placeholder, else prepend the trigger once unless already present."""
    caption = caption.strip()
    if not trigger:
        return caption.replace(TRIGGER_PLACEHOLDER, "").strip()
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger).strip()
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


class Captioner:
    """Loads an image-to-text model once and captions PIL images in batches."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool = False, max_new_tokens: int = 40):
        from transformers import AutoProcessor

        self.device, self.dtype, self.max_new_tokens = device, dtype, max_new_tokens
        try:
            self.processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            self.model = self._load_model(model_id, dtype, trust_remote_code).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ModelError(f"cannot load captioner {model_id}: {first}; pass --captioner PATH of a "
                             "downloaded image-to-text model, or --captioner none with --default-caption") from None
        self.is_blip = type(self.model).__name__.startswith("Blip")
        # make-tiny's captioner is random: what it writes is noise, and a user should hear so
        self.random_weights = bool(getattr(self.model.config, "flux_lora_random_weights", False))

    @staticmethod
    def _load_model(model_id: str, dtype: torch.dtype, trust_remote_code: bool):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        if config.model_type == "blip":
            from transformers import BlipForConditionalGeneration

            return BlipForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code)

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        kwargs = {} if self.is_blip else {"text": ["<MORE_DETAILED_CAPTION>"] * len(images)}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if not self.is_blip and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
