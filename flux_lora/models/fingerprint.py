"""The fingerprint that ties a cache to the encoders that built it: VAE (shift/scale included) and
text encoders, by config and a sample of their weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flux_lora.models import synthetic
from flux_lora.models.loading import load_errors, revision_kwargs


def _config_dict(model: str, subfolder: str, revision: str) -> dict:
    with load_errors(model, f"{subfolder}/config.json"):
        local = Path(model) / subfolder / "config.json"
        if local.is_file():
            cfg = json.loads(local.read_text())
        else:
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(model, "config.json", subfolder=subfolder, **revision_kwargs(revision))).read_text())
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
