"""Export a diffusers-format LoRA with the key names ComfyUI, Forge and kohya's sd-scripts read:
`lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`.

BFL's checkpoint fuses q/k/v (and, in single blocks, q/k/v + mlp) into one Linear, so their LoRAs
are fused too: down = [A_q; A_k; A_v] (rank k·r), up = block-diagonal of the B's, and alpha is
multiplied by k so that alpha / rank (the scale these tools apply) stays alpha / r. Each fused
member's update is unchanged: up·down restricted to its rows is B_q·A_q.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from flux_lora.errors import FluxLoraError
from flux_lora.outputs import files

DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
_KEY = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_(A|B)\.weight$")


def _out_features(member: str, in_features: int) -> int:
    """Output size of a fused member that was not trained (so has no B to read it from)."""
    return 4 * in_features if member == "proj_mlp" else in_features


def fuse(downs: list[torch.Tensor | None], ups: list[torch.Tensor | None], in_features: int,
         members: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse per-member LoRAs (A [r, in], B [out, r]; None = untrained) into down [k·r, in] and
    block-diagonal up [Σout, k·r]."""
    r = next(d.shape[0] for d in downs if d is not None)
    dtype = next(d.dtype for d in downs if d is not None)
    outs = [u.shape[0] if u is not None else _out_features(m, in_features) for u, m in zip(ups, members)]
    down = torch.cat([d if d is not None else torch.zeros(r, in_features, dtype=dtype) for d in downs])
    up = torch.zeros(sum(outs), r * len(members), dtype=dtype)
    row = 0
    for j, (u, o) in enumerate(zip(ups, outs)):
        if u is not None:
            up[row:row + o, j * r:(j + 1) * r] = u
        row += o
    return down.contiguous(), up.contiguous()


def to_kohya(sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers-format state dict (keys `transformer.…lora_A.weight`) -> kohya/BFL names."""
    modules: dict[tuple[str, int], dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        m = _KEY.match(key)
        if not m:
            raise FluxLoraError(f"cannot export {key} to kohya format (only block layers are supported)")
        kind, idx, module, ab = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        modules.setdefault((kind, idx), {}).setdefault(module, {})[ab] = value
    out: dict[str, torch.Tensor] = {}
    for (kind, idx), trained in sorted(modules.items()):
        table, prefix = (DOUBLE, f"lora_unet_double_blocks_{idx}") if kind == "transformer_blocks" \
            else (SINGLE, f"lora_unet_single_blocks_{idx}")
        used = set()
        for name, members in table.items():
            present = [mem for mem in members if mem in trained]
            if not present:
                continue
            used.update(present)
            downs = [trained[mem]["A"] if mem in trained else None for mem in members]
            ups = [trained[mem]["B"] if mem in trained else None for mem in members]
            in_features = next(d.shape[1] for d in downs if d is not None)
            down, up = fuse(downs, ups, in_features, members) if len(members) > 1 else (downs[0], ups[0])
            out[f"{prefix}_{name}.lora_down.weight"] = down
            out[f"{prefix}_{name}.lora_up.weight"] = up
            out[f"{prefix}_{name}.alpha"] = torch.tensor(float(alpha) * len(members))
        unknown = set(trained) - used
        if unknown:
            raise FluxLoraError(f"cannot export {kind}.{idx}.{sorted(unknown)[0]} to kohya format (no BFL name)")
    return out


_KOHYA_KEY = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def is_kohya(keys) -> bool:
    """Whether every key is a kohya/BFL FLUX block LoRA key (`lora_unet_double_blocks_0_img_attn_qkv...`)."""
    keys = list(keys)
    return bool(keys) and all(_KOHYA_KEY.match(k) for k in keys)


def from_kohya(sd: dict[str, torch.Tensor], out_features) -> dict[str, torch.Tensor]:
    """kohya/BFL-named LoRA tensors (to_kohya's, or a LoRA trained on BFL's fused layers) -> per
    diffusers layer `transformer_blocks.N.attn.to_q.lora_A.weight` / `lora_B.weight`, with each
    layer's alpha/rank folded into B. A fused up is split by `out_features(block, member)`, this
    model's sizes (diffusers' own reader assumes FLUX.1-dev's); a block-diagonal one (to_kohya's)
    gives each member its own slice of the rank, a dense one the whole down. Untrained members
    (zero rows) are left out, so they keep a fresh init."""
    groups: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _KOHYA_KEY.match(key)
        groups.setdefault((m.group(1), int(m.group(2)), m.group(3)), {})[m.group(4)] = value
    out = {}
    for (kind, idx, name), parts in sorted(groups.items()):
        table, block = (DOUBLE, f"transformer_blocks.{idx}") if kind == "double" else (SINGLE, f"single_transformer_blocks.{idx}")
        if name not in table or {"lora_down.weight", "lora_up.weight"} - parts.keys():
            raise FluxLoraError(f"lora_unet_{kind}_blocks_{idx}_{name}: not a FLUX.1 layer with lora_down and lora_up")
        members = table[name]
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        dims = [out_features(block, member) for member in members]
        if sum(dims) != up.shape[0]:
            raise FluxLoraError(f"lora_unet_{kind}_blocks_{idx}_{name} has {up.shape[0]} outputs, this model's "
                                f"{'+'.join(map(str, dims))}; was it trained on another model?")
        rows, k = torch.split(up, dims), len(members)
        width = rank // k if k > 1 and rank % k == 0 else rank
        diagonal = width < rank and all(not r[:, :j * width].any() and not r[:, (j + 1) * width:].any()
                                        for j, r in enumerate(rows))
        for j, (member, b) in enumerate(zip(members, rows)):
            a = down[j * width:(j + 1) * width] if diagonal else down
            b = b[:, j * width:(j + 1) * width] if diagonal else b
            if a.any() or b.any():
                out[f"{block}.{member}.lora_A.weight"] = a.contiguous()
                out[f"{block}.{member}.lora_B.weight"] = (b * scale).contiguous()
    return out


def read_kohya_for(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A kohya/BFL-named LoRA file as from_kohya gives it, split by `model`'s own layer sizes (a
    peft-wrapped layer's base); None for a file of another format. safetensors' own error for a
    file that is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if not is_kohya(f.keys()):
            return None
        sd = {k: f.get_tensor(k) for k in f.keys()}

    def out_features(block: str, member: str) -> int:
        layer = model.get_submodule(f"{block}.{member}")
        return getattr(layer, "base_layer", layer).out_features

    return from_kohya(sd, out_features)


def export_file(src: Path, dst: Path, export_format: str = "kohya") -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    if export_format != "kohya":
        raise FluxLoraError(f"unknown export format {export_format!r}; use kohya")
    if not Path(src).is_file():
        raise FluxLoraError(f"LoRA file {src} does not exist")
    try:
        with safe_open(str(src), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise FluxLoraError(f"{src} is not a readable .safetensors file ({type(e).__name__}); "
                            "export reads the lora.safetensors a flux_lora run writes") from None
    if not any(_KEY.match(k) for k in sd):
        example = next(iter(sd), "no tensors at all")
        raise FluxLoraError(f"{src} is not a diffusers-format FLUX LoRA (no transformer.…lora_A/B.weight keys; it "
                            f"holds e.g. {example}); export converts the lora.safetensors a flux_lora run writes")
    r = meta.get("transformer.r")
    alpha = meta.get("transformer.lora_alpha", r)
    if alpha is None:  # no metadata: diffusers then assumes alpha = rank
        alpha = next(v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight"))
    kohya = to_kohya(sd, alpha)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(r), "ss_network_alpha": str(alpha)}
    files.write_file_from(dst, lambda path: save_file(kohya, str(path), metadata=meta), every_rank=True)
    return dst
