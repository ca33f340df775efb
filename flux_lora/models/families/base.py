"""What a model family is: everything that differs between FLUX.1, Kontext and FLUX.2 behind one
interface (loading, the encoders preprocess runs, the latent space and packing, the transformer
call, LoRA targets, the inference pipeline). Cache, sampler, DDP, resume, events and checkpoints
never look past it; a new family is one subclass in its own module plus one line in the registry."""

from __future__ import annotations

import contextlib
import threading

import torch

from flux_lora.errors import ModelError
from flux_lora.models import synthetic
from flux_lora.models.loading import check_model_path, load_errors, revision_kwargs, weights_kwargs


_queued = threading.local()  # inside host_copies_queued: to_host does not wait for its copies


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU. From a GPU through pinned memory (the caching host allocator reuses it):
    several times .cpu()'s pageable copy rate, which preprocess's ~4 MB of text embeddings an
    image at 1024 px otherwise wait on (2.5 ms an image on an H200). The result is complete when
    it returns, except inside `host_copies_queued`."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=getattr(_queued, "on", False))
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`. From the host to a GPU through pinned memory, queued: a pageable copy (what
    `.to(device)` makes of a fresh CPU tensor) first waits for everything queued on the GPU."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


@contextlib.contextmanager
def host_copies_queued(device: torch.device):
    """Inside, to_host queues its copies on the device's stream and returns at once: read no
    result before the stream is synchronized. Preprocess waits once a chunk instead of once a
    batch, so the GPU's queue is not drained while the host prepares the next batch."""
    _queued.on = device.type == "cuda"
    try:
        yield
    finally:
        _queued.on = False


class Family:
    name = ""  # how people and the cache name it, e.g. "flux1"
    title = ""  # e.g. "FLUX.1"
    pipelines: tuple[str, ...] = ()  # model_index.json `_class_name`s of this family
    pipeline_class = ""  # diffusers pipeline for previews, `sample` and the LoRA file format
    transformer_class = ""
    vae_class = ""
    text_parts: tuple[str, ...] = ()  # text encoder folders the cache fingerprint covers
    text_keys: tuple[str, ...] = ()  # cache entries of one encoded prompt
    paired = False  # trains on (control, target) image pairs
    kohya_export = False  # the kohya/ComfyUI key names of outputs/export.py fit its blocks
    fuses_qkv = False  # fast/fused_qkv.py understands its attention layers
    lora_presets: dict[str, str] = {}
    preview_guidance = 3.5
    preview_negative: str | None = None  # a prompt cached for previews' true CFG (None: not used)
    synthetic: dict[str, dict] = {}  # random:NAME -> full-size transformer config (scripts/bench.py)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    @staticmethod
    def diffusers_class(name: str):
        import diffusers

        return getattr(diffusers, name)

    # ------------------------------------------------------------ loading

    def load_transformer(self, model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None,
                         file: str = ""):
        """from_pretrained of model's transformer/, or with `file` (--model-transformer) its weights
        from that one .safetensors (models/single_file.py), or random weights for random:NAME."""
        if file:
            from flux_lora.models import single_file

            check_model_path(model)
            return single_file.load(self, file, model, revision, dtype, device)
        if synthetic.is_synthetic(model):
            return synthetic.build(self.diffusers_class(self.transformer_class), self.synthetic[model], dtype,
                                   device or torch.device("cpu"))
        check_model_path(model)
        # straight onto the GPU: eight ranks each staging 24 GB in host memory would not fit
        placement = {"device_map": {"": device}} if device is not None and device.type == "cuda" else {}
        with load_errors(model, "the transformer"):
            return self.diffusers_class(self.transformer_class).from_pretrained(
                model, subfolder="transformer", dtype=dtype, **placement, **weights_kwargs(model, revision, "transformer"))

    def transformer_config(self, model: str, revision: str = "") -> dict:
        """The transformer's config (no weights read): what the memory plan needs."""
        if synthetic.is_synthetic(model):
            return dict(self.synthetic[model])
        with load_errors(model, "the transformer's config"):
            return dict(self.diffusers_class(self.transformer_class).load_config(
                model, subfolder="transformer", **revision_kwargs(revision)))

    def load_vae(self, model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
        self._needs_files(model, "a VAE")
        with load_errors(model, "the VAE"):
            return self.diffusers_class(self.vae_class).from_pretrained(model, subfolder="vae", dtype=dtype,
                                                                         **weights_kwargs(model, revision, "vae"))

    def load_text_pipeline(self, model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
        """The family's pipeline holding only its text encoder(s) and tokenizer(s), so prompts are
        encoded as diffusers' own `encode_prompt` encodes them at inference (tests compare them)."""
        self._needs_files(model, "text encoders")
        with load_errors(model, "the text encoders"):
            return self.diffusers_class(self.pipeline_class).from_pretrained(
                model, transformer=None, vae=None, dtype=dtype, **weights_kwargs(model, revision))

    def load_scheduler(self, model: str, revision: str = ""):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if synthetic.is_synthetic(model):
            return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        with load_errors(model, "the scheduler"):
            return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", **revision_kwargs(revision))

    def _needs_files(self, model: str, what: str) -> None:
        if synthetic.is_synthetic(model):
            raise ModelError(f"{model} is a random transformer for scripts/bench.py train and has no {what}; "
                             "preprocess and previews need a real model folder or hub id")
        check_model_path(model)

    # ------------------------------------------------------------ preprocess

    @torch.no_grad()
    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> the latents the transformer is trained on (float32, CPU)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, text_pipe, prompts: list[str], max_sequence_length: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
        """{key: [B, ...]} for each of `text_keys`, equal to the pipeline's encode_prompt (CPU)."""
        raise NotImplementedError

    # ------------------------------------------------------------ training

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] cached latents -> [B, tokens, channels], the transformer's image tokens."""
        raise NotImplementedError

    def image_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Image tokens of one cached latent [C, h, w] (the sequence length the time shift uses)."""
        raise NotImplementedError

    def cache_shapes(self, config, height: int, width: int, text_len: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one cached item of a height×width image for a transformer of this config
        (scripts/bench.py feeds random data of these shapes; a full-size VAE compresses 8×)."""
        raise NotImplementedError

    def transformer_kwargs(self, batch: dict, h: int, w: int, device: torch.device, dtype: torch.dtype) -> dict:
        """Text inputs and position ids of a micro-batch (and any tokens appended after the image's)."""
        raise NotImplementedError

    def predict(self, model, xt: torch.Tensor, t: torch.Tensor, batch: dict, guidance: float | None,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The velocity the transformer predicts for the noisy latents xt [B, C, h, w] at t [B],
        packed like `pack(xt)`: the target image's tokens only (appended condition tokens are cut)."""
        tokens = self.pack(xt)
        kwargs = self.transformer_kwargs(batch, xt.shape[-2], xt.shape[-1], device, dtype)
        extra = kwargs.pop("extra_tokens", None)
        hidden = tokens if extra is None else torch.cat([tokens, extra], dim=1)
        g = torch.full((xt.shape[0],), guidance, device=device) if guidance is not None else None
        out = model(hidden_states=hidden.to(dtype), timestep=t.to(dtype), guidance=g, return_dict=False, **kwargs)[0]
        return out[:, :tokens.shape[1]]

    # ------------------------------------------------------------ inference

    def inference_pipeline(self, transformer, vae, scheduler):
        """The family's pipeline around the training transformer, without text encoders (previews)."""
        raise NotImplementedError

    def preview_kwargs(self, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None,
                       control: torch.Tensor | None) -> dict:
        """Pipeline call arguments for one cached prompt (tensors [1, ...] on the device)."""
        raise NotImplementedError

    def size_kwargs(self, height: int, width: int) -> dict:
        """Pipeline call arguments that fix the output size."""
        return {"height": height, "width": width}

    # ------------------------------------------------------------ tiny model

    def build_tiny(self, seed: int = 0):
        """A toy pipeline of this family built in code (tests, CI, `make-tiny --family`)."""
        raise NotImplementedError
