"""Model loading through `from_pretrained` (a local diffusers directory or a hub id), dtypes, and
the checks that turn a wrong --model into one clear line."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from flux_lora.models import synthetic
from flux_lora.errors import ModelError


def uncompiled_bytecode_note(dont_write: bool | None = None, module_file: str = torch.__file__) -> str | None:
    """One line when every start of this Python compiles torch from source: PYTHONDONTWRITEBYTECODE
    set (many container images set it) and torch installed without .pyc files. On the lent H200
    machines' image that was ~10 s of each start (torch, dynamo, sympy, transformers; bench/README,
    session 15), which no cache of flux_lora's can save."""
    if not (sys.flags.dont_write_bytecode if dont_write is None else dont_write):
        return None
    try:
        if os.path.exists(importlib.util.cache_from_source(module_file)):
            return None
    except (NotImplementedError, ValueError):  # no bytecode cache in this Python at all
        return None
    packages = os.path.dirname(os.path.dirname(module_file))
    return ("Python compiles torch from source at every start here (PYTHONDONTWRITEBYTECODE is set and torch has "
            f"no .pyc files), ~10 s of each start-up; compile it once: {sys.executable} -m compileall -q -j 0 {packages}")


def quiet_libraries() -> None:
    """Library progress bars and info logs would interleave across ranks: keep them off."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers' hub-id loads, huggingface_hub 1.x
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    # offline, every load of a cached hub id said "Could not reach the Hub ... Using cached commit hash"
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


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
        _check_components(p)


def _check_components(folder: Path) -> None:
    """Every part model_index.json lists must be there: a copy that lost vae/ gets one line naming
    it, not a message about the Hub from from_pretrained."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # a transformer-only folder, or from_pretrained will say what is wrong
    for name, spec in index.items():
        listed = isinstance(spec, list) and len(spec) == 2 and spec[0] is not None
        if not name.startswith("_") and listed and not (folder / name).is_dir():
            raise ModelError(f"model folder {folder} has no {name}/ although its model_index.json lists it; "
                             "copy the whole pipeline folder, or point --model at a complete one")


@contextlib.contextmanager
def load_errors(model: str, part: str):
    try:
        yield
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelError(f"cannot load {part} from {model}{hint}: {first[:300]}; "
                         "check --model (a local diffusers FLUX directory or a downloaded hub id)") from None


def revision_kwargs(revision: str) -> dict:
    return {"revision": revision} if revision else {}


# Weights files that name a variant (save_pretrained(variant="fp16")): diffusers and transformers
# read them only when given that variant, and a folder holding nothing else fails without it.
_VARIANT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:-\d+-of-\d+)?\.(\w+?)(?:-\d+-of-\d+)?"
                           r"\.(?:safetensors|bin)$"
                           r"|^(?:diffusion_pytorch_model|model|pytorch_model)\.(?:safetensors|bin)\.index\.(\w+)\.json$")
_PLAIN_FILES = {f"{stem}.{ext}{index}" for stem in ("diffusion_pytorch_model", "model", "pytorch_model")
                for ext in ("safetensors", "bin") for index in ("", ".index.json")}


def _local_folder(model: str, revision: str) -> Path | None:
    """model's files on this machine: the folder itself, or a hub id's downloaded snapshot."""
    if synthetic.is_synthetic(model):
        return None
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json", revision=revision or None)
    except Exception:  # not a valid repo id: from_pretrained says what is wrong
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def stored_variant(model: str, revision: str = "", part: str = "") -> str | None:
    """The variant (fp16, bf16, ...) whose files are the only weights of model's `part` folder
    (transformer, vae), or with no part of any of its folders; None where plain files are there
    (or the files are not on this machine)."""
    folder = _local_folder(model, revision)
    if folder is None:
        return None
    found = set()
    for sub in [folder / part] if part else sorted(p for p in folder.iterdir() if p.is_dir()):
        names = {f.name for f in sub.iterdir()} if sub.is_dir() else set()
        if not names & _PLAIN_FILES:
            found |= {next(v for v in m.groups() if v) for m in map(_VARIANT_FILE.match, names) if m}
    if len(found) > 1:
        raise ModelError(f"{folder} stores its weights in several variants ({', '.join(sorted(found))}) and "
                         "no plain files; keep one variant's files")
    return found.pop() if found else None


def weights_kwargs(model: str, revision: str = "", part: str = "") -> dict:
    """from_pretrained's revision and, for weights saved only as a variant, that variant."""
    variant = stored_variant(model, revision, part)
    return {**revision_kwargs(revision), **({"variant": variant} if variant else {})}


def load_transformer(model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
    """The transformer of --model's family (models/families), from_pretrained or random:NAME."""
    from flux_lora.models import families

    return families.of_model(model, revision).load_transformer(model, dtype, revision, device)


def load_vae(model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
    from flux_lora.models import families

    return families.of_model(model, revision).load_vae(model, dtype, revision, device)


def load_text_pipeline(model: str, dtype: torch.dtype, revision: str = "", device: torch.device | None = None):
    """The family's pipeline holding only its text encoders and tokenizers (prompts encoded as its encode_prompt does)."""
    from flux_lora.models import families

    return families.of_model(model, revision).load_text_pipeline(model, dtype, revision, device)


def load_scheduler(model: str, revision: str = ""):
    from flux_lora.models import families

    return families.of_model(model, revision).load_scheduler(model, revision)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The double-stream then single-stream blocks (every FLUX family has both lists): where LoRA,
    compile and quantization act."""
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)
