"""Inference with diffusers' FluxPipeline: preview grids during training (prompts encoded by
preprocess, so no text encoder is loaded) and the `flux_lora sample` command."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from flux_lora.fast.compiled_blocks import eager_stance
from flux_lora.models import loading
from flux_lora.outputs import files
from flux_lora.parallel import session

PREVIEW_GUIDANCE = 3.5


def make_grid(images: list, captions: list[str]):
    """Images side by side with their prompt written under each."""
    from PIL import Image, ImageDraw

    w = max(im.width for im in images)
    h = max(im.height for im in images)
    label_h = 14 * 3 + 6
    grid = Image.new("RGB", (w * len(images), h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, text) in enumerate(zip(images, captions)):
        grid.paste(im, (i * w, 0))
        lines = textwrap.wrap(text, max(8, w // 7))[:3]
        draw.multiline_text((i * w + 3, h + 3), "\n".join(lines), fill="black")
    return grid


def _pipeline(transformer, vae, scheduler):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Previewer:
    """Draws the cached sample prompts with the current LoRA. Prompts are split over the ranks and
    the images gathered on rank 0, so no rank idles long enough to hit a collective timeout."""

    def __init__(self, cfg, di, manifest: dict, model, samples: dict, reporter):
        dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
        self.vae = loading.load_vae(cfg.model.path, dtype, cfg.model.revision, di.device).to(di.device).eval()
        self.scheduler = loading.load_scheduler(cfg.model.path, cfg.model.revision)
        self.model, self.samples, self.reporter, self.di, self.dtype = model, samples, reporter, di, dtype
        self.size, self.steps, self.seed = manifest["resolution"], cfg.train.sample_steps, cfg.train.seed
        self.out_dir = Path(cfg.output.dir) / "samples"

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        prompts = self.samples["prompts"]
        mine = session.shard_indices(len(prompts), self.di.rank, self.di.world_size)
        was_training = self.model.training
        self.model.eval()
        pipe = _pipeline(self.model, self.vae, self.scheduler)
        images = {}
        with eager_stance(self.model):
            for i in mine:
                gen = torch.Generator(device=self.di.device).manual_seed(self.seed + i)
                images[i] = pipe(prompt_embeds=self.samples["t5"][i:i + 1].to(self.di.device, self.dtype),
                                 pooled_prompt_embeds=self.samples["clip"][i:i + 1].to(self.di.device, self.dtype),
                                 height=self.size, width=self.size, num_inference_steps=self.steps,
                                 guidance_scale=PREVIEW_GUIDANCE, generator=gen).images[0]
        self.model.train(was_training)
        gathered = {k: v for part in session.gather_objects(images) for k, v in part.items()}
        path = self.out_dir / f"step-{step:06d}.png"
        if files.writes_here():
            grid = make_grid([gathered[i] for i in range(len(prompts))], prompts)
            files.write_atomic(path, lambda f: grid.save(f, format="PNG"))
            self.reporter.emit("sample", step=step, path=str(path), prompts=prompts)


def check_sample_options(size: int, steps: int, guidance: float, max_sequence_length: int) -> None:
    from flux_lora.errors import ConfigError

    if size <= 0 or size % 16:
        raise ConfigError(f"--size {size} must be a positive multiple of 16, e.g. 512 or 1024")
    if steps < 1:
        raise ConfigError(f"--steps {steps} must be at least 1, e.g. 28")
    if not math.isfinite(guidance) or guidance < 0:
        raise ConfigError(f"--guidance {guidance} must be a finite number >= 0, e.g. 3.5")
    if max_sequence_length < 1:
        raise ConfigError(f"--max-sequence-length {max_sequence_length} must be at least 1, e.g. 512")


def sample_command(model: str, lora: Path | None, prompts: list[str], out: Path, seed: int, steps: int,
                   guidance: float, size: int, max_sequence_length: int) -> Path:
    """`flux_lora sample`: FluxPipeline.from_pretrained + load_lora_weights, one image per prompt."""
    from diffusers import FluxPipeline

    from flux_lora.errors import FluxLoraError

    check_sample_options(size, steps, guidance, max_sequence_length)  # before seconds of loading
    loading.quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = loading.resolve_dtype("auto", device)
    loading.check_model_path(model)
    with loading.load_errors(model, "the pipeline"):
        pipe = FluxPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        if not Path(lora).is_file():
            raise FluxLoraError(f"LoRA file {lora} does not exist")
        pipe.load_lora_weights(str(lora), adapter_name="trained")
        if not pipe.get_list_adapters().get("transformer"):
            raise FluxLoraError(f"{lora} loaded no LoRA weights into the transformer; is it a FLUX LoRA?")
    images = []
    for i, p in enumerate(prompts):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        images.append(pipe(p, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=gen, max_sequence_length=max_sequence_length).images[0])
    image = images[0] if len(images) == 1 else make_grid(images, prompts)
    files.write_atomic(out, lambda f: image.save(f, format="PNG"))
    return out
