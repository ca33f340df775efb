"""Inference with the model family's diffusers pipeline: preview grids during training (prompts
encoded by preprocess, so no text encoder is loaded) and the `flux_lora sample` command."""

from __future__ import annotations

import contextlib
import math
import textwrap
from pathlib import Path

import torch

from flux_lora.fast import graphed_inference
from flux_lora.fast.compiled_blocks import eager_stance
from flux_lora.models import families, loading
from flux_lora.outputs import files
from flux_lora.parallel import fsdp, session



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


class Previewer:
    """Draws the cached sample prompts with the current LoRA. Prompts are split over the ranks and
    the images gathered on rank 0, so no rank idles long enough to hit a collective timeout. A
    rank's prompts go through the pipeline as one batch (each with its own seeded noise, as alone),
    and on a GPU the transformer's calls replay a CUDA graph (fast/graphed_inference.py). An
    editing family draws prompt i on the control image of cached item i (mod the items), in one
    batch per control size."""

    def __init__(self, cfg, di, manifest: dict, model, samples: dict, reporter, family=None, dataset=None,
                 batched: bool = True, graphed: bool = True):
        self.family = family or families.of_model(cfg.model.path, cfg.model.revision)
        dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
        self.vae = self.family.load_vae(cfg.model.path, dtype, cfg.model.revision, di.device).to(di.device).eval()
        self.scheduler = self.family.load_scheduler(cfg.model.path, cfg.model.revision)
        self.model, self.samples, self.reporter, self.di, self.dtype = model, samples, reporter, di, dtype
        self.size, self.steps, self.seed = manifest["resolution"], cfg.train.sample_steps, cfg.train.seed
        self.dataset = dataset
        self.out_dir = Path(cfg.output.dir) / "samples"
        self.batched = batched
        # measured in the fast mode (bench --compare-previews); fp8 / nf4 weights keep the eager path
        self.graphed = graphed and cfg.train.memory_mode == "fast" and graphed_inference.can_graph(model, di.device)

    def _inputs(self, prompts: list[int]) -> dict:
        """Pipeline arguments of these prompts: their cached embeddings (and control, size)."""
        device = self.di.device
        keys = self.samples.get("text_keys", ["t5", "clip"])
        text = {k: self.samples[k][prompts].to(device, self.dtype) for k in keys}
        negative = self.samples.get("negative")
        if negative:  # one negative prompt for the batch
            negative = {k: v.to(device, self.dtype).expand(len(prompts), *v.shape[1:]) for k, v in negative.items()}
        control, height, width = None, self.size, self.size
        if self.family.paired and self.dataset is not None and len(self.dataset):
            control = torch.stack([self._control(i) for i in prompts]).to(device, self.dtype)
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's pixels per latent pixel
            height, width = (s * scale for s in control.shape[-2:])
        return {**self.family.preview_kwargs(text, negative, control), **self.family.size_kwargs(height, width)}

    def _control(self, prompt: int) -> torch.Tensor:
        return self.dataset[prompt % len(self.dataset)]["control"]

    def _groups(self, prompts: list[int]) -> list[list[int]]:
        """These prompts' pipeline calls: one batch, or per control size; one call each unbatched."""
        if not self.batched:
            return [[i] for i in prompts]
        if not (self.family.paired and self.dataset is not None and len(self.dataset)):
            return [prompts] if prompts else []
        by_size: dict[tuple, list[int]] = {}
        for i in prompts:
            by_size.setdefault(tuple(self._control(i).shape), []).append(i)
        return list(by_size.values())

    def _draw(self, pipe, prompts: list[int]) -> list:
        generators = [torch.Generator(device=self.di.device).manual_seed(self.seed + i) for i in prompts]
        return pipe(**self._inputs(prompts), num_inference_steps=self.steps, guidance_scale=self.family.preview_guidance,
                    generator=generators if len(generators) > 1 else generators[0]).images

    @torch.no_grad()
    def images(self) -> dict:
        """{prompt number: PIL image} of this rank's prompts."""
        prompts = self.samples["prompts"]
        world = self.di.world_size
        groups = self._groups(session.shard_indices(len(prompts), self.di.rank, world))
        # the busiest rank's calls (FSDP2's lock step): every rank can count every rank's
        calls = max(len(self._groups(session.shard_indices(len(prompts), r, world))) for r in range(world))
        was_training = self.model.training
        self.model.eval()
        pipe = self.family.inference_pipeline(self.model, self.vae, self.scheduler)
        images = {}
        # graphed: the blocks' training graphs give way to an inference compile; else they run eagerly
        stance = contextlib.nullcontext() if self.graphed else eager_stance(self.model)
        with stance, self._autocast(), graphed_inference.graphed_forward(self.model, self.graphed) as graphed:
            for group in groups:
                images.update(zip(group, self._draw(pipe, group)))
            for _ in range(fsdp.lockstep_extra(self.model, len(groups), calls * world, world)):
                self._draw(pipe, [0])  # under FSDP2 every rank joins as many forwards as the busiest
        if graphed is not None and graphed.failure:
            self.graphed = False  # the next previews run eagerly from the start
            if self.reporter is not None:
                self.reporter.warning(f"previews run eagerly: their CUDA graph could not be recorded ({graphed.failure})")
        self.model.train(was_training)
        fsdp.reshard(self.model)
        return images

    def _autocast(self):
        """As training computes: the fp32 LoRA in the compute dtype (eagerly, without it, every
        LoRA layer ran fp32 matmuls on cast copies: a third of a preview's GPU time at 512 px).
        No cast cache: a recorded graph repeats its casts, so it sees the LoRA's updates."""
        if self.di.device.type != "cuda" or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)

    def __call__(self, step: int) -> None:
        prompts = self.samples["prompts"]
        gathered = {k: v for part in session.gather_objects(self.images()) for k, v in part.items()}
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
                   guidance: float | None, size: int, max_sequence_length: int, image: Path | None = None,
                   transformer_file: str = "") -> Path:
    """`flux_lora sample`: the family's pipeline from_pretrained + load_lora_weights, one image per
    prompt; `image` is the control (input) image of an editing model (required for Kontext);
    `transformer_file` (--model-transformer) replaces the pipeline's transformer weights."""
    from flux_lora.errors import ConfigError, FluxLoraError

    check_sample_options(size, steps, 0.0 if guidance is None else guidance, max_sequence_length)  # before loading
    loading.quiet_libraries()
    loading.check_model_path(model)
    family = families.of_model(model)
    control = _control_image(image, family)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = loading.resolve_dtype("auto", device)
    replaced = {"transformer": family.load_transformer(model, dtype, file=transformer_file)} if transformer_file else {}
    with loading.load_errors(model, "the pipeline"):
        pipe = family.diffusers_class(family.pipeline_class).from_pretrained(
            model, dtype=dtype, **replaced, **loading.weights_kwargs(model)).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        if not Path(lora).is_file():
            raise FluxLoraError(f"LoRA file {lora} does not exist")
        _load_lora(pipe, Path(lora), family)
        if not pipe.get_list_adapters().get("transformer"):
            raise FluxLoraError(f"{lora} loaded no LoRA weights into the transformer; is it a {family.title} LoRA?")
    if control is None and image is not None:
        raise ConfigError(f"--image is for editing models; {model} is {family.title}")
    height = width = size
    extra = {}
    if control is not None:  # as in training: the control has the output's size, about size² pixels
        width, height = _area_size(control.width, control.height, size)
        extra = {"image": control.resize((width, height), resample=3)}
    images = []
    for i, p in enumerate(prompts):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        images.append(pipe(prompt=p, **family.size_kwargs(height, width), num_inference_steps=steps,
                           guidance_scale=family.preview_guidance if guidance is None else guidance,
                           generator=gen, max_sequence_length=max_sequence_length, **extra).images[0])
    result = images[0] if len(images) == 1 else make_grid(images, prompts)
    files.write_atomic(out, lambda f: result.save(f, format="PNG"))
    return out


def _load_lora(pipe, lora: Path, family) -> None:
    """pipe.load_lora_weights(lora), its failures as one line (diffusers' own log of a mismatch,
    a line per tensor, is held back: the line here says it). kohya/BFL-named files of FLUX.1 are
    split by the model's own layer sizes first (export.read_kohya_for), as --init-lora reads them."""
    import logging

    from flux_lora.errors import FluxLoraError
    from flux_lora.outputs import export

    try:
        from safetensors import safe_open

        with safe_open(str(lora), framework="pt"):
            pass
    except Exception as e:  # safetensors' own error type is not an OSError
        raise FluxLoraError(f"{lora} is not a readable .safetensors file ({type(e).__name__}: {str(e)[:120]}); "
                            "pass the lora.safetensors (or lora-kohya.safetensors) a train run wrote") from None
    diffusers_log = logging.getLogger("diffusers")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.CRITICAL)
    try:
        converted = export.read_kohya_for(lora, pipe.transformer) if family.kohya_export else None
        source = {f"transformer.{k}": v for k, v in converted.items()} if converted is not None else str(lora)
        pipe.load_lora_weights(source, adapter_name="trained")
    except (ValueError, KeyError, RuntimeError, OSError, AttributeError, FluxLoraError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = next((line for line in lines if "mismatch" in line or line.startswith(("Missing", "Unexpected"))), lines[0])
        raise FluxLoraError(f"{lora} does not load into this {family.title} model ({type(e).__name__}: "
                            f"{detail[:200]}); was it trained on another model?") from None
    finally:
        diffusers_log.setLevel(level)


def _area_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) of about side² pixels with the image's aspect ratio, multiples of 16."""
    scale = (side * side / (width * height)) ** 0.5
    return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)


def _control_image(image: Path | None, family):
    """The control image for an editing family (required there), as an RGB PIL image (EXIF
    orientation applied); None otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from flux_lora.errors import ConfigError

    if not family.paired:
        return None
    if image is None:
        raise ConfigError(f"{family.title} edits an input image: pass --image CONTROL.png")
    if not Path(image).is_file():
        raise ConfigError(f"--image {image} does not exist")
    try:
        with Image.open(image) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"--image {image} is not a readable image ({type(e).__name__})") from None
