"""Model loading through `from_pretrained` (local diffusers directory or hub id), dtypes,
attention backend, and the fingerprint that ties a cache to the encoders that built it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from flux_lora import synthetic
from flux_lora.errors import ModelError


def quiet_libraries() -> None:
    """Library progress bars and info logs would interleave across ranks: keep them off."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def set_attention_backend(name: str, transformer, dtype: torch.dtype, device: torch.device) -> str:
    """Choose attention kernels deliberately; returns what the transformer's attention runs on.
    auto: the fused cuDNN op (flux_lora.attention) where supported (Hopper, bf16, head dim 64/128),
    else flash; cudnn: the op regardless. SDPA's own cuDNN path stays off: its backward crashes
    inside the compiled FLUX step on H100 with torch 2.11 (2026-11-26); the op calls the same
    kernels without that failure."""
    from flux_lora import attention

    chosen = name
    if name in ("auto", "cudnn"):
        head_dim = getattr(transformer.config, "attention_head_dim", 0)
        chosen = "cudnn" if name == "cudnn" or attention.supported(head_dim, dtype, device) else "flash"
        if chosen == "cudnn":
            attention.use(transformer)
    if torch.cuda.is_available() and name != "default":
        sdpa = "flash" if chosen == "cudnn" else chosen  # what the op's fallbacks and other models use
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(sdpa == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(sdpa in ("flash", "efficient"))
        torch.backends.cuda.enable_math_sdp(True)
    return chosen


def check_model_path(model: str) -> None:
    """Fail early, in one line, for a path that is neither a local pipeline nor a hub id."""
    if not model:
        raise ModelError("no model given; pass --model PATH_OR_HUB_ID (e.g. black-forest-labs/FLUX.1-dev)")
    if synthetic.is_synthetic(model):
        return synthetic.check(model)
    p = Path(model).expanduser()
    looks_local = p.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model path {model} does not exist; pass a diffusers FLUX directory or a hub id")
        if not (p / "model_index.json").is_file() and not (p / "transformer").is_dir():
            raise ModelError(f"{model} is not a diffusers FLUX pipeline (no model_index.json); "
                             "point --model at the folder that holds transformer/, vae/, text_encoder/")


@contextlib.contextmanager
def _load_errors(model: str, part: str):
    try:
        yield
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelError(f"cannot load {part} from {model}{hint}: {first[:300]}; "
                         "check --model (a local diffusers FLUX directory or a downloaded hub id)") from None


def _kw(revision: str) -> dict:
    return {"revision": revision} if revision else {}


def load_transformer(model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
    from diffusers import FluxTransformer2DModel

    check_model_path(model)
    if synthetic.is_synthetic(model):
        return synthetic.transformer(dtype, device or torch.device("cpu"))
    # straight onto the GPU: eight ranks each staging 24 GB in host memory would not fit
    placement = {"device_map": {"": device}} if device is not None and device.type == "cuda" else {}
    with _load_errors(model, "the transformer"):
        return FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", dtype=dtype,
                                                      **placement, **_kw(revision))


def load_vae(model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
    from diffusers import AutoencoderKL

    check_model_path(model)
    if synthetic.is_synthetic(model):
        return synthetic.vae(dtype, device or torch.device("cpu"))
    with _load_errors(model, "the VAE"):
        return AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype, **_kw(revision))


def load_text_pipeline(model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
    """A FluxPipeline holding only the text encoders, so prompts are encoded by diffusers' own
    `encode_prompt`, exactly as at inference."""
    from diffusers import FluxPipeline

    check_model_path(model)
    if synthetic.is_synthetic(model):
        return synthetic.text_pipeline(dtype, device or torch.device("cpu"))
    with _load_errors(model, "the text encoders"):
        return FluxPipeline.from_pretrained(model, transformer=None, vae=None, dtype=dtype, **_kw(revision))


def load_scheduler(model: str, revision: str = ""):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if synthetic.is_synthetic(model):
        return synthetic.scheduler()
    with _load_errors(model, "the scheduler"):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", **_kw(revision))


def _config_dict(model: str, subfolder: str, revision: str) -> dict:
    with _load_errors(model, f"{subfolder}/config.json"):
        local = Path(model) / subfolder / "config.json"
        if local.is_file():
            cfg = json.loads(local.read_text())
        else:
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(model, "config.json", subfolder=subfolder, **_kw(revision))).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}


def _weights_sample(folder: Path) -> list:
    """Size and a hash of 1 MiB from the middle of each weight file: tells two random-weight models
    with the same config apart without reading gigabytes."""
    out = []
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(0, size // 2 - 2**19))
            out.append([f.name, size, hashlib.sha256(fh.read(2**20)).hexdigest()[:16]])
    return out


def fingerprint(model: str, max_sequence_length: int, revision: str = "") -> str:
    """Identity of what the cache depends on: VAE (incl. shift/scale) and both text encoders."""
    parts = {"max_sequence_length": max_sequence_length}
    if synthetic.is_synthetic(model):
        return hashlib.sha256(f"{model}:{max_sequence_length}".encode()).hexdigest()[:32]
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        parts[sub] = _config_dict(model, sub, revision)
        if Path(model, sub).is_dir():
            parts[sub + "_weights"] = _weights_sample(Path(model, sub))
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
