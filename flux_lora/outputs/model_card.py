"""The output folder's README.md as a Hugging Face model card: base model, trigger word, training
settings, the latest preview grid, and how to load the LoRA in diffusers and ComfyUI, so
`huggingface-cli upload REPO OUTPUT` publishes the run as it is. A README.md that flux_lora did not
write is never replaced: the card then goes to model-card.md beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flux_lora.outputs import files

MARK = "<!-- model card written by flux_lora; rewritten at the end of every run -->"


@dataclass
class CardInfo:
    base_model: str
    family_title: str
    pipeline_class: str
    trigger_word: str
    settings: dict  # what a reader wants to know about the training, in order
    preview: str | None  # path of the latest preview grid, relative to the output folder
    files: list[str]  # LoRA files in the output folder
    kohya: bool  # lora-kohya.safetensors is among them (ComfyUI's own key names)
    paired: bool = False  # an editing model: the pipeline takes the input image


def is_hub_id(model: str) -> bool:
    """owner/name that is not a local folder: what the Hub's base_model field takes."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).exists()


def card_text(info: CardInfo) -> str:
    """The card: YAML front matter (as the Hub reads it) and a body for people."""
    hub = is_hub_id(info.base_model)
    meta = {"base_model": info.base_model if hub else None, "library_name": "diffusers", "instance_prompt": info.trigger_word or None,
            "tags": ["lora", "diffusers", "text-to-image", "flux_lora", "template:sd-lora"]}
    if info.preview:
        meta["widget"] = [{"text": info.trigger_word or "", "output": {"url": info.preview}}]
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items() if v is not None)  # JSON values are YAML
    trigger = f"`{info.trigger_word}`" if info.trigger_word else "none (the captions as they are)"
    prompt = f"{info.trigger_word}, " if info.trigger_word else ""
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.settings.items())
    comfy = ("`lora-kohya.safetensors` (ComfyUI's own key names) in `ComfyUI/models/loras`, applied with a "
             "LoraLoaderModelOnly node" if info.kohya else
             "`lora.safetensors` in `ComfyUI/models/loras`, applied with a LoraLoaderModelOnly node (diffusers key names)")
    preview = f"\n![previews]({info.preview})\n" if info.preview else ""
    base = f"[{info.base_model}](https://huggingface.co/{info.base_model})" if hub else f"`{info.base_model}`"
    call = (f'pipe(image=load_image("input.png"), prompt="{prompt}your instruction")' if info.paired
            else f'pipe("{prompt}your prompt")')
    imports = "from diffusers.utils import load_image\n" if info.paired else ""
    return f"""---
{front}
---
{MARK}
# {info.family_title} LoRA

A LoRA for {base} trained with flux_lora.
Trigger word: {trigger}. Files: {", ".join(f"`{f}`" for f in info.files)}.
{preview}
## Use it

diffusers:
```python
import torch
from diffusers import {info.pipeline_class}
{imports}
pipe = {info.pipeline_class}.from_pretrained("{info.base_model}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("PATH_OR_REPO", weight_name="lora.safetensors")
image = {call}.images[0]
```

ComfyUI: {comfy}.

## Training

| setting | value |
|---|---|
{rows}
"""


def card_path(out: Path) -> Path:
    """README.md, unless one that flux_lora did not write is there (then model-card.md)."""
    readme = Path(out) / "README.md"
    if readme.is_file():
        try:
            ours = MARK in readme.read_text(errors="replace")
        except OSError:
            ours = False
        if not ours:
            return readme.with_name("model-card.md")
    return readme


PUBLISHED = ["README.md", "lora.safetensors", "lora-kohya.safetensors", "best.safetensors", "samples/*.png", "loss.png"]


def push_to_hub(out: Path, repo: str, api=None) -> str:
    """Upload the card, the LoRA files and the previews of a finished run to a model repo
    (created private if missing). Returns the repo's URL; raises OSError with the reason."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out), allow_patterns=PUBLISHED, repo_type="model",
                          commit_message="flux_lora: LoRA, model card and previews")
    except Exception as e:  # noqa: BLE001 - network, auth and Hub errors all end in one line
        raise OSError(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
    return str(url)


def write_model_card(out: Path, info: CardInfo) -> Path | None:
    """Rank 0 writes the card (atomically); other ranks return None."""
    return files.write_atomic(card_path(out), card_text(info)) if files.writes_here() else None
