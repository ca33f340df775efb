"""LoRA on the transformer with peft: target presets (the family's), freezing, fp32 trainables, and
saving in diffusers' format through the family's pipeline (keys `transformer.…lora_A/lora_B`,
alpha kept in the adapter metadata)."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import torch

from flux_lora.errors import ConfigError, FluxLoraError
from flux_lora.models.families.base import Family
from flux_lora.models.families.flux1 import FAMILY as FLUX1
from flux_lora.outputs import files

PRESETS = FLUX1.lora_presets  # FLUX.1's, the default where no family is given

def target_pattern(targets: str, presets: dict[str, str] = PRESETS) -> str:
    if targets in presets:
        return presets[targets]
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"lora.targets={targets!r} is empty; use attention, attention-mlp, all-linear or module names")
    return r"(.*\.)?(" + "|".join(re.escape(n) for n in names) + ")"


def matched_modules(model: torch.nn.Module, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(name)]


def unmatched_targets(model: torch.nn.Module, targets: str, presets: dict[str, str] = PRESETS) -> list[str]:
    """Entries of an explicit target list that match no Linear layer (for a warning)."""
    if targets in presets:
        return [] if matched_modules(model, presets[targets]) else [targets]
    return [t.strip() for t in targets.split(",") if t.strip() and not matched_modules(model, target_pattern(t.strip()))]


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: str, dropout: float, seed: int,
             presets: dict[str, str] = PRESETS, dora: bool = False) -> int:
    """Freeze the base, inject LoRA (or DoRA) in place (clean keys, no `base_model.model.` prefix),
    make the LoRA params fp32. The seed makes the initial LoRA identical on every rank. Returns #params."""
    from peft import LoraConfig

    matched = matched_modules(model, target_pattern(targets, presets))
    if not matched:
        raise ConfigError(f"lora.targets={targets!r} matches no Linear layer of this transformer; "
                          "use attention, attention-mlp, all-linear or names such as attn.to_q")
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                     target_modules=matched, init_lora_weights=True, use_dora=dora))
    count = 0
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            count += p.numel()
    return count


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Inside, the model computes as its base: every LoRA layer off (peft's switch, which the fused
    LoRA kernels honour by falling back to peft's forward)."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`transformer_blocks.0.attn.to_q.lora_A.weight` -> tensor (fp32, CPU, contiguous)."""
    from peft.utils import get_peft_model_state_dict

    from flux_lora.parallel.fsdp import full

    sd = get_peft_model_state_dict(model)  # under FSDP2 each rank's shards: gathered (every rank calls this)
    return {k: full(v.detach()).float().cpu().contiguous() for k, v in sd.items()}


def peft_key(name: str) -> str:
    """A LoRA parameter's name in the model (`…to_q.lora_A.default.weight`) as peft's state dict
    and the LoRA file name it (`…to_q.lora_A.weight`)."""
    return re.sub(r"\.(lora_[A-Za-z_]+)\.default\.", r".\1.", name)


def load_lora_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, sd)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"checkpoint LoRA does not fit this model ({len(missing)} missing keys, e.g. {missing[0]})")


def initial_weights(path: str | Path, model: torch.nn.Module, rank: int, alpha: float,
                    family: Family = FLUX1) -> tuple[dict[str, torch.Tensor], int]:
    """A LoRA file to start from (--init-lora: diffusers/peft keys, kohya/ComfyUI, or the other
    formats the family's pipeline reads) in this model's key names and at this run's scale: B is
    rescaled so that B·A·alpha/rank, the update the file's layers make, stays what it was.
    Returns (state dict for load_initial, layers it covers)."""
    if not Path(path).is_file():
        raise ConfigError(f"--init-lora {path} does not exist")
    sd, meta = _read_lora_file(Path(path), model, family)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.startswith(("text_encoder", "te_"))}
    ours = {peft_key(name): p for name, p in lora_parameters(model)}
    outside = [k for k in sd if k not in ours]
    if outside:
        raise ConfigError(f"--init-lora {path} has layers this run does not train (e.g. {outside[0]}); "
                          "set --targets to cover them, or use the file's rank and targets")
    file_alpha = meta.get("transformer.lora_alpha")  # None: kohya-style files come with alpha folded in
    out = {}
    for key, tensor in sd.items():
        if tensor.shape != ours[key].shape:
            found = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1]
            raise ConfigError(f"--init-lora {path} has rank {found} at {key}, this run {rank}; "
                              f"pass --lora-rank {found}" if found != rank else
                              f"--init-lora {path} does not fit this model ({key}: {tuple(tensor.shape)} vs "
                              f"{tuple(ours[key].shape)}); was it trained on another model?")
        if ".lora_B." in key:
            file_scale = (file_alpha / rank) if file_alpha else 1.0
            tensor = tensor.float() * (file_scale / (alpha / rank))
        out[key] = tensor.float()
    return out, len({k.split(".lora_")[0] for k in out})


def _read_lora_file(path: Path, model: torch.nn.Module, family: Family) -> tuple[dict, dict]:
    """(state dict, metadata) of a LoRA file: kohya/BFL names split by this model's layer sizes
    (outputs/export.read_kohya_for), any other format through the family pipeline's reader."""
    from flux_lora.outputs import export

    try:
        converted = export.read_kohya_for(path, model) if family.kohya_export else None
    except (FluxLoraError, AttributeError) as e:
        raise ConfigError(f"--init-lora {path} does not fit this model ({e})") from None
    except Exception:  # noqa: BLE001 - not safetensors: the pipeline's reader says what it is
        converted = None
    if converted is not None:
        return converted, {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read = family.diffusers_class(family.pipeline_class).lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as e:  # noqa: BLE001 - whatever the readers raise on a foreign file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"--init-lora {path} is not a {family.title} LoRA diffusers can read "
                          f"({type(e).__name__}{': ' + first if first else ''})") from None
    return read[0], (read[-1] or {})


def load_initial(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load initial_weights' state dict; the LoRA layers it does not cover keep their fresh init."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, sd)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ConfigError(f"initial LoRA keys not in this model (e.g. {unexpected[0]})")


def adapter_metadata(model: torch.nn.Module) -> dict:
    cfg = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def save_lora(path: Path, sd: dict[str, torch.Tensor], metadata: dict, family: Family = FLUX1) -> Path | None:
    """Write a diffusers-format LoRA file atomically through the family pipeline's own writer (rank 0)."""
    pipeline = family.diffusers_class(family.pipeline_class)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline.save_lora_weights(tmp.parent, transformer_lora_layers=sd, weight_name=tmp.name,
                                           transformer_lora_adapter_metadata=metadata)

    return files.write_file_from(path, write)


def verify_saved(path: Path, sd: dict[str, torch.Tensor], metadata: dict) -> None:
    """Self-check: every trained tensor and rank/alpha round-trip through the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for k, v in sd.items():
            key = f"transformer.{k}"
            if key not in keys or not torch.equal(f.get_tensor(key), v):
                raise RuntimeError(f"self-check failed: {key} did not round-trip through {path}")
        stored = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    if stored.get("transformer.lora_alpha") != metadata["lora_alpha"] or stored.get("transformer.r") != metadata["r"]:
        raise RuntimeError(f"self-check failed: rank/alpha metadata was not stored in {path}")


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_lora(path: Path, model: torch.nn.Module, export_format: str = "diffusers",
                family: Family = FLUX1, save_dtype: str = "bf16") -> Path | None:
    """Write the LoRA (diffusers format, in save_dtype) on rank 0, check it round-trips, and
    optionally write the kohya/ComfyUI version beside it. Every rank calls it; other ranks return
    None. Only the exported file is rounded: training and checkpoints stay fp32."""
    if export_format == "kohya" and not family.kohya_export:
        raise FluxLoraError(f"output.export_format=kohya covers FLUX.1 and Kontext, not {family.title}; "
                            "use diffusers (ComfyUI reads that file through its diffusers key mapping)")
    sd = {k: v.to(SAVE_DTYPES[save_dtype]) for k, v in lora_state_dict(model).items()}
    meta = adapter_metadata(model)
    written = save_lora(path, sd, meta, family)
    if written is None:
        return None
    verify_saved(written, sd, meta)
    if export_format == "kohya":
        from flux_lora.outputs.export import export_file

        export_file(written, written.with_name(written.stem + "-kohya.safetensors"), "kohya")
    return written


def digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over the LoRA tensors: equal on every rank if DDP kept them in sync."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    return h.hexdigest()
