"""Caption handling: trigger words, and a batched auto-captioner for images without a .txt.

The captioner's kind comes from its config's model_type, which decides how it is prompted and how
its output is read; nothing is found out by trying:
    blip                      BLIP (the default, Salesforce/blip-image-captioning-large): no prompt
    florence2                 Florence-2: a task prompt, <MORE_DETAILED_CAPTION> unless --caption-prompt
    qwen2_vl, qwen2_5_vl,     Qwen-VL: a chat turn with the image and --caption-prompt, through the
    qwen3_vl                  tokenizer's chat template and the image processor (no video processor)
    llava, llava_next, ...    LLaVA-style chat models, JoyCaption among them: the processor's chat template
All run natively in transformers: no remote code unless --trust-remote-code.
"""

from __future__ import annotations

import re

import torch

from flux_lora.errors import ModelError

TRIGGER_PLACEHOLDER = "[trigger]"
KINDS = {"blip": "blip", "florence2": "florence2", "qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen",
         "qwen3_vl_moe": "qwen", "llava": "chat", "llava_next": "chat", "llava_onevision": "chat"}
SUPPORTED = ("blip (BLIP), florence2 (Florence-2), qwen2_vl / qwen2_5_vl / qwen3_vl (Qwen-VL), "
             "llava / llava_next / llava_onevision (LLaVA, JoyCaption)")
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
CHAT_PROMPT = ("Write a one-paragraph caption for this image for training an image model: the subject, "
               "setting, lighting and style. Caption only, no preamble.")
CAPTIONER_SYSTEM = "You are a helpful image captioner."  # JoyCaption's own system turn


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


def captioner_kind(model_type: str, model_id: str) -> str:
    """blip, florence2, qwen or chat, from the config's model_type; one line naming the supported kinds otherwise."""
    kind = KINDS.get(model_type)
    if kind is None:
        raise ModelError(f"captioner {model_id} is a {model_type!r} model, which flux_lora cannot prompt; supported "
                         f"kinds: {SUPPORTED}; or --captioner none with --default-caption")
    return kind


def caption_prompt(kind: str, prompt: str) -> str:
    """The prompt a kind is given: Florence-2 a task token, chat models an instruction, BLIP none."""
    if kind == "florence2":
        prompt = prompt or "<MORE_DETAILED_CAPTION>"
        if prompt not in FLORENCE_TASKS:
            raise ModelError(f"Florence-2 takes a task prompt as --caption-prompt: one of {', '.join(FLORENCE_TASKS)}, "
                             f"not {prompt[:60]!r}")
        return prompt
    return (prompt or CHAT_PROMPT) if kind in ("qwen", "chat") else ""


def processor_chat_template(model_id: str) -> str | None:
    """The chat template a processor folder keeps beside the tokenizer (chat_template.jinja, or
    chat_template.json's), read as a file: Qwen-VL's processor class itself needs torchvision."""
    import json
    from pathlib import Path

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(model_id, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:  # not a folder nor a valid hub id
            return None
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


class Captioner:
    """Loads an image-to-text model once and captions PIL images in batches."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                 max_new_tokens: int = 0, prompt: str = ""):
        from transformers import AutoConfig

        self.device, self.dtype = device, dtype
        try:
            config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            self.kind = captioner_kind(config.model_type, model_id)
            self.prompt = caption_prompt(self.kind, prompt)
            self.max_new_tokens = max_new_tokens or (40 if self.kind == "blip" else 160)
            self._load(model_id, config, trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ModelError(f"cannot load captioner {model_id}: {first}; pass --captioner PATH of a "
                             "downloaded image-to-text model, or --captioner none with --default-caption") from None
        # make-tiny's captioner is random: what it writes is noise, and a user should hear so
        self.random_weights = bool(getattr(self.model.config, "flux_lora_random_weights", False))

    def _load(self, model_id: str, config, trust_remote_code: bool) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.kind == "qwen":  # tokenizer + image processor: Qwen's processor class also wants a video processor (torchvision)
            from transformers import AutoImageProcessor, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            self.images = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            self.tokenizer.chat_template = self.tokenizer.chat_template or processor_chat_template(model_id)
            if not self.tokenizer.chat_template:
                raise ModelError(f"captioner {model_id} has no chat template (chat_template.jinja/.json or in its "
                                 "tokenizer_config.json); pass a complete Qwen-VL folder or hub id")
        else:
            self.processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.kind in ("qwen", "chat"):
            self.tokenizer.padding_side = "left"  # a batch of prompts generates from aligned ends
        if self.kind == "blip":
            from transformers import BlipForConditionalGeneration

            model = BlipForConditionalGeneration.from_pretrained(model_id, dtype=self.dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=self.dtype,
                                                                trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()

    def _inputs(self, images: list) -> dict:
        """The model's inputs for a batch of images, as its kind is prompted."""
        n = len(images)
        if self.kind == "blip":
            return self.processor(images=images, return_tensors="pt")
        if self.kind == "florence2":
            return self.processor(text=[self.prompt] * n, images=images, return_tensors="pt")
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}
        messages = [{"role": "system", "content": CAPTIONER_SYSTEM}, user] if self.kind == "chat" else [user]
        if self.kind == "chat":
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return self.processor(text=[text] * n, images=images, padding=True, return_tensors="pt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        vision = self.images(images=images, return_tensors="pt")
        pad, merge = "<|image_pad|>", getattr(self.images, "merge_size", 2)
        texts = [text.replace(pad, pad * (int(grid.prod()) // merge**2), 1) for grid in vision["image_grid_thw"]]
        return {**self.tokenizer(texts, padding=True, return_tensors="pt"), **vision}

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        inputs = {k: v.to(self.device) for k, v in self._inputs(images).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if self.kind in ("qwen", "chat"):  # decoder-only: the output starts with the prompt
            out = out[:, inputs["input_ids"].shape[1]:]
        decode = self.processor.batch_decode if self.kind in ("blip", "florence2") else self.tokenizer.batch_decode
        return [" ".join(t.split()) for t in decode(out, skip_special_tokens=True)]

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
