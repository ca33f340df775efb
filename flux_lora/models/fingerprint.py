"""Identities of a model's parts: the fingerprint that ties a cache to the encoders that built it
(VAE with its shift/scale, text encoders), and the transformer's identity that ties a checkpoint
to its base. By config and a sample of the weights (local folders) or the hub commit."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from flux_lora.models import synthetic
from flux_lora.models.loading import load_errors, revision_kwargs


def _config_dict(model: str, subfolder: str, revision: str) -> dict:
    with load_errors(model, f"{subfolder}/config.json"):
        local = Path(model) / subfolder / "config.json"
        commit = None
        if local.is_file():
            cfg = json.loads(local.read_text())
        else:
            from huggingface_hub import hf_hub_download

            downloaded = Path(hf_hub_download(model, "config.json", subfolder=subfolder, **revision_kwargs(revision)))
            cfg = json.loads(downloaded.read_text())
            commit = downloaded.parent.parent.name  # .../snapshots/COMMIT/SUBFOLDER/config.json: the weights' version
    out = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return {**out, "hub_commit": commit} if commit else out


def _weights_sample(folder: Path) -> list:
    """Size and a hash of 1 MiB from the middle of each weight file: tells two random-weight models
    with the same config apart without reading gigabytes."""
    return [_file_sample(f) for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))]


def family(model: str, revision: str = "") -> str:
    """The pipeline class the model declares in its model_index.json (e.g. FluxPipeline); for a
    folder holding only transformer/, the pipeline its transformer class belongs to."""
    if synthetic.is_synthetic(model):
        return "FluxPipeline"
    with load_errors(model, "model_index.json"):
        local = Path(model) / "model_index.json"
        if local.is_file():
            index = json.loads(local.read_text())
        elif Path(model, "transformer", "config.json").is_file():
            return _pipeline_of_transformer(json.loads(Path(model, "transformer", "config.json").read_text()))
        else:
            index = _hub_index(model, revision)
    return str(index.get("_class_name", "unknown"))


@functools.lru_cache(maxsize=8)
def _hub_index(model: str, revision: str) -> dict:
    """A hub model's model_index.json, fetched once per process (the family is asked for by the
    cache check, the checkpoint identity and the model build)."""
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model, "model_index.json", **revision_kwargs(revision))).read_text())


def _pipeline_of_transformer(config: dict) -> str:
    name = config.get("_class_name", "unknown")
    if name == "Flux2Transformer2DModel":
        return "Flux2Pipeline" if config.get("guidance_embeds", True) else "Flux2KleinPipeline"
    return {"FluxTransformer2DModel": "FluxPipeline"}.get(name, name)


def _existing(transformer_file: str) -> Path:
    if not Path(transformer_file).is_file():
        from flux_lora.errors import ModelError

        raise ModelError(f"--model-transformer {transformer_file}: no such file; pass a .safetensors file of a FLUX transformer")
    return Path(transformer_file)


def _file_sample(path: Path) -> list:
    """Size and a hash of 1 MiB from the middle of one weight file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size // 2 - 2**19))
        return [path.name, size, hashlib.sha256(fh.read(2**20)).hexdigest()[:16]]


def transformer_identity(model: str, revision: str = "", transformer_file: str = "") -> str:
    """What a checkpoint's LoRA was trained on: the pipeline family, the transformer's config and
    a sample of its weights (or, from the hub, the commit; or the single file of
    --model-transformer). A resume onto another base is refused."""
    if synthetic.is_synthetic(model):
        return hashlib.sha256(model.encode()).hexdigest()[:32]
    parts = {"family": family(model, revision), "transformer": _config_dict(model, "transformer", revision)}
    if transformer_file:
        parts["weights"] = [_file_sample(_existing(transformer_file))]
    elif Path(model, "transformer").is_dir():
        parts["weights"] = _weights_sample(Path(model, "transformer"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint(model: str, max_sequence_length: int, revision: str = "", transformer_file: str = "") -> str:
    """Identity of what the cache depends on: the family, its VAE (incl. normalisation) and text
    encoders, and the --model-transformer file when preprocess was given one. (FLUX.1's identity
    leaves the family out: caches built before there were families keep theirs.)"""
    from flux_lora.models import families

    parts = {"max_sequence_length": max_sequence_length}
    if synthetic.is_synthetic(model):
        return hashlib.sha256(f"{model}:{max_sequence_length}".encode()).hexdigest()[:32]
    fam = families.of_model(model, revision)
    if fam.name != "flux1":
        parts["family"] = fam.name
    if transformer_file:
        parts["transformer_file"] = _file_sample(_existing(transformer_file))
    for sub in ("vae", *fam.text_parts):
        parts[sub] = _config_dict(model, sub, revision)
        if Path(model, sub).is_dir():
            parts[sub + "_weights"] = _weights_sample(Path(model, sub))
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
