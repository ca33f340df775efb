"""`--model-transformer FILE` (models/single_file.py): a BFL / ComfyUI single-file transformer,
bf16 or fp8 e4m3 (plain or ComfyUI's scaled fp8), loads to the same weights as the diffusers folder;
our width-generic FLUX.1 mapping gives what diffusers' own converter gives at FLUX.1's width;
the checkpoint identity covers the file.   pytest -q tests/test_single_file.py"""

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli, train_args
from flux_lora.errors import ModelError
from flux_lora.models import families, fingerprint, single_file


def _to_bfl(sd: dict, config: dict) -> dict:
    """diffusers' FluxTransformer2DModel keys -> BFL's (the inverse of single_file.flux1_from_bfl)."""
    out, back = {}, {}
    for table, kind in ((single_file.DOUBLE, "double"), (single_file.SINGLE, "single")):
        back[kind] = {v: k for k, v in table.items()}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            kind = "double" if parts[0] == "transformer_blocks" else "single"
            name = ".".join(parts[2:])
            prefix = f"{kind}_blocks.{parts[1]}."
            module, param = name.rsplit(".", 1)
            fused = {t: (m, i) for m, ts in single_file.DOUBLE_QKV.items() for i, t in enumerate(ts)} if kind == "double" \
                else {t: ("linear1", i) for i, t in enumerate(single_file.SINGLE_FUSED)}
            if module in fused:
                target, index = fused[module]
                out.setdefault(f"{prefix}{target}.{param}", {})[index] = value
            elif name in back[kind]:  # norms: BFL's `.scale`
                out[prefix + back[kind][name]] = value
            else:
                out[f"{prefix}{back[kind][module]}.{param}"] = value
            continue
        module, param = key.rsplit(".", 1)
        if module == single_file.FINAL_MODULATION[1]:
            scale, shift = value.chunk(2)
            out[f"{single_file.FINAL_MODULATION[0]}.{param}"] = torch.cat([shift, scale])
        else:
            out[f"{ {v: k for k, v in single_file.TOP.items()}[module]}.{param}"] = value
    return {k: torch.cat([v[i] for i in sorted(v)]) if isinstance(v, dict) else v for k, v in out.items()}


def _reference(tiny_model):
    return families.by_name("flux1").load_transformer(str(tiny_model), torch.float32)


def test_a_comfyui_file_loads_to_the_same_weights(tiny_model, tmp_path):
    reference = _reference(tiny_model)
    sd = reference.state_dict()
    bfl = _to_bfl(sd, dict(reference.config))
    assert "single_blocks.0.linear1.weight" in bfl and "double_blocks.0.img_attn.qkv.weight" in bfl
    save_file({f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in bfl.items()}, tmp_path / "comfy.safetensors")
    loaded = families.by_name("flux1").load_transformer(str(tiny_model), torch.float32, file=str(tmp_path / "comfy.safetensors"))
    got = loaded.state_dict()
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k].to(torch.bfloat16).float()) for k in sd)
    # a diffusers-layout single file loads as it is
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "diffusers.safetensors")
    again = families.by_name("flux1").load_transformer(str(tiny_model), torch.float32, file=str(tmp_path / "diffusers.safetensors"))
    assert all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)


def test_fp8_files_plain_and_scaled(tiny_model, tmp_path):
    sd = _reference(tiny_model).state_dict()
    bfl = _to_bfl(sd, {})
    fp8 = torch.float8_e4m3fn
    save_file({k: v.to(fp8) for k, v in bfl.items()}, tmp_path / "fp8.safetensors")
    plain = single_file.read_state_dict(tmp_path / "fp8.safetensors", torch.float32)
    assert all(torch.equal(plain[k], bfl[k].to(fp8).float()) for k in bfl)
    # ComfyUI's scaled fp8: weight / scale stored in fp8, scale_weight beside it
    scaled, scales = {}, {}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.dim() == 2:
            scales[k] = v.abs().max() / 448.0
            scaled[k], scaled[k[:-len("weight")] + "scale_weight"] = (v / scales[k]).to(fp8), scales[k].reshape(1)
        else:
            scaled[k] = v
    save_file({"scaled_fp8": torch.zeros(0, dtype=fp8), **{f"model.diffusion_model.{k}": v for k, v in scaled.items()}},
              tmp_path / "scaled.safetensors")
    read = single_file.read_state_dict(tmp_path / "scaled.safetensors", torch.float32)
    assert read.keys() == bfl.keys()
    for k in scales:
        assert torch.equal(read[k], (bfl[k] / scales[k]).to(fp8).float() * scales[k])
        assert torch.allclose(read[k], bfl[k], rtol=0.07, atol=1e-3 * float(bfl[k].abs().max()))
    model = families.by_name("flux1").load_transformer(str(tiny_model), torch.float32, file=str(tmp_path / "scaled.safetensors"))
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in sd.values())


def test_our_flux1_mapping_is_diffusers_at_flux1_width():
    """diffusers' converter hard-codes FLUX.1's width 3072; at that width (one input column per
    tensor, so it stays small) both give the same tensors under the same names."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    g = torch.Generator().manual_seed(0)
    inner, rows = 3072, {"qkv": 3 * 3072, "linear1": 3 * 3072 + 4 * 3072, "adaLN_modulation": 2 * 5}
    keys = [f"double_blocks.0.{m}.{p}" for m in list(single_file.DOUBLE) + list(single_file.DOUBLE_QKV)
            if not m.endswith(".scale") for p in ("weight", "bias")]
    keys += [f"double_blocks.0.{m}" for m in single_file.DOUBLE if m.endswith(".scale")]
    keys += [f"single_blocks.0.{m}.{p}" for m in list(single_file.SINGLE) + ["linear1"] if not m.endswith(".scale")
             for p in ("weight", "bias")]
    keys += [f"single_blocks.0.{m}" for m in single_file.SINGLE if m.endswith(".scale")]
    keys += [f"{m}.{p}" for m in list(single_file.TOP) + [single_file.FINAL_MODULATION[0]] for p in ("weight", "bias")]
    bfl = {k: torch.randn(next((n for part, n in rows.items() if part in k), 6), 1, generator=g) for k in keys}
    ours = single_file.flux1_from_bfl(dict(bfl), {"num_attention_heads": 24, "attention_head_dim": inner // 24})
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_file_of_another_model_is_one_line(tiny_model, tmp_path):
    sd = _to_bfl(_reference(tiny_model).state_dict(), {})
    sd["img_in.weight"] = torch.zeros(5, 5)
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match=r"does not fit the FLUX.1 transformer .* it holds x_embedder.weight as \(5, 5\)"):
        families.by_name("flux1").load_transformer(str(tiny_model), torch.float32, file=str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a readable .safetensors file"):
        single_file.read_state_dict(tmp_path / "junk.safetensors", torch.float32)
    with pytest.raises(ModelError, match="no such file"):
        fingerprint.transformer_identity(str(tiny_model), "", str(tmp_path / "missing.safetensors"))


def test_train_on_a_single_file_and_its_identity(tiny_model, cache_dir, tmp_path):
    reference = _reference(tiny_model)
    bfl = _to_bfl(reference.state_dict(), {})
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, tmp_path / "a.safetensors")
    save_file({f"model.diffusion_model.{k}": v * 1.01 for k, v in bfl.items()}, tmp_path / "b.safetensors")
    folder = fingerprint.transformer_identity(str(tiny_model))
    a = fingerprint.transformer_identity(str(tiny_model), "", str(tmp_path / "a.safetensors"))
    b = fingerprint.transformer_identity(str(tiny_model), "", str(tmp_path / "b.safetensors"))
    assert len({folder, a, b}) == 3  # a checkpoint of one is not resumed onto another

    out = tmp_path / "out"  # a cache preprocessed without a file serves any
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "2", "--model-transformer", tmp_path / "a.safetensors"),
            check=True)
    assert (out / "lora.safetensors").is_file()


def test_a_cache_built_for_a_file_serves_that_file(tiny_model, images, tmp_path):
    from conftest import preprocess_args

    bfl = _to_bfl(_reference(tiny_model).state_dict(), {})
    save_file(bfl, tmp_path / "a.safetensors")
    save_file({k: v * 1.01 for k, v in bfl.items()}, tmp_path / "b.safetensors")
    cache = tmp_path / "cache"
    run_cli(*preprocess_args(tiny_model, images, cache, "--model-transformer", tmp_path / "a.safetensors"), check=True)
    proc = run_cli(*train_args(tiny_model, cache, tmp_path / "out", "--steps", "1",
                               "--model-transformer", tmp_path / "b.safetensors"))
    assert proc.returncode == 2 and "was built for --model-transformer" in proc.stderr and "a.safetensors" in proc.stderr
