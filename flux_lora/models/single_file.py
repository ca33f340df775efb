"""`--model-transformer FILE`: the transformer from one .safetensors file, as BFL publishes FLUX
(`flux1-dev.safetensors`) and ComfyUI users hold it (`model.diffusion_model.` prefix, often fp8
e4m3, sometimes ComfyUI's "scaled fp8" with a `scale_weight` per layer), or a diffusers-layout
file. The rest of the pipeline, and the transformer's config, come from --model.

The keys are converted the way diffusers' `from_single_file` converts them: FLUX.2 through
diffusers' own converter; FLUX.1 and Kontext through the same mapping written for any width
(diffusers' FLUX.1 converter assumes FLUX.1's 3072 when it splits a single block's fused
linear1, so it cannot read smaller models; a test checks both give the same tensors at 3072).
fp8 weights are dequantized to the training dtype on load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flux_lora.errors import ModelError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
# BFL name -> diffusers name, inside double_blocks.N / single_blocks.N / at the top level
DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
          "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
          "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
          "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
          "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
          "txt_mlp.2": "ff_context.net.2", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out"}
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm.scale": "attn.norm_q.weight",
          "norm.key_norm.scale": "attn.norm_k.weight", "linear2": "proj_out"}
SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1, split by width
TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
       "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # shift, scale -> scale, shift


def read_state_dict(file: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors without a ComfyUI/BFL prefix, fp8 (scaled or not) dequantized to dtype."""
    from safetensors import safe_open

    path = Path(file)
    if not path.is_file():
        raise ModelError(f"--model-transformer {file}: no such file; pass a .safetensors file of a FLUX transformer")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise ModelError(f"--model-transformer {file} is not a readable .safetensors file ({type(e).__name__}); "
                         "pass a BFL, ComfyUI or diffusers transformer file") from None
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in raw)), "")
    raw = {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}
    out = {}
    for key, value in raw.items():
        if key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8":
            continue  # ComfyUI's scaled-fp8 bookkeeping, applied below
        scale = raw.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        value = value.float() * scale.float() if scale is not None else value
        out[key] = value.to(dtype)
    return out


def is_bfl(sd: dict) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.")) for k in sd)


def _param(key: str) -> tuple[str, str]:
    """`img_attn.qkv.weight` -> (`img_attn.qkv`, `weight`); a norm's `.scale` keeps its full name."""
    return (key, "") if key.endswith(".scale") else tuple(key.rsplit(".", 1))


def flux1_from_bfl(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL's FLUX.1 keys -> FluxTransformer2DModel's, for any width (inner = heads × head dim,
    MLP = 4 × inner)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            kind, index, name = parts[0], parts[1], ".".join(parts[2:])
            prefix = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}."
            module, param = _param(name)
            if kind == "double_blocks" and module in DOUBLE_QKV:
                for target, piece in zip(DOUBLE_QKV[module], value.chunk(3, dim=0)):
                    out[f"{prefix}{target}.{param}"] = piece
            elif kind == "single_blocks" and module == "linear1":
                for target, piece in zip(SINGLE_FUSED, value.split([inner, inner, inner, value.shape[0] - 3 * inner])):
                    out[f"{prefix}{target}.{param}"] = piece
            else:
                table = DOUBLE if kind == "double_blocks" else SINGLE
                if module not in table:
                    raise ModelError(f"unexpected key {key} in a FLUX.1 transformer file")
                out[prefix + table[module] + (f".{param}" if param else "")] = value
            continue
        module, param = _param(key)
        if module == FINAL_MODULATION[0]:
            shift, scale = value.chunk(2, dim=0)
            out[f"{FINAL_MODULATION[1]}.{param}"] = torch.cat([scale, shift])
        elif module in TOP:
            out[f"{TOP[module]}.{param}"] = value
        else:
            raise ModelError(f"unexpected key {key} in a FLUX.1 transformer file")
    return {k: v.contiguous() for k, v in out.items()}


def to_diffusers(family_name: str, sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A file's tensors in the layout of the family's diffusers transformer."""
    if not is_bfl(sd):
        return sd  # already diffusers' names
    if family_name.startswith("flux2"):
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        return convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))
    return flux1_from_bfl(sd, config)


def load(family, file: str, model: str, revision: str, dtype: torch.dtype, device: torch.device | None):
    """The family's transformer built from --model's config, its weights from the file."""
    from accelerate import init_empty_weights

    from flux_lora.models.loading import load_errors, revision_kwargs

    cls = family.diffusers_class(family.transformer_class)
    with load_errors(model, "the transformer's config"):
        config = cls.load_config(model, subfolder="transformer", **revision_kwargs(revision))
    sd = to_diffusers(family.name, read_state_dict(file, dtype), config)
    with init_empty_weights():
        transformer = cls.from_config(config)
    expected = transformer.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        what = (f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model does not" if unexpected
                else f"holds {wrong[0]} as {tuple(sd[wrong[0]].shape)}, the model {tuple(expected[wrong[0]].shape)}")
        raise ModelError(f"--model-transformer {file} does not fit the {family.title} transformer of {model}: it {what}; "
                         "pass the --model (config, VAE, text encoders) the file was made for")
    transformer.load_state_dict(sd, strict=True, assign=True)
    return transformer.to(device or torch.device("cpu"))
