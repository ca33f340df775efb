"""LoRA injection, saving in diffusers format, loading back, and the kohya export.
    pytest -q tests/test_lora.py"""

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from flux_lora.training import lora
from flux_lora.errors import ConfigError
from flux_lora.outputs.export import export_file, fuse
from helpers import as_rank


def _lora_model(tiny_model, targets="attention-mlp", rank=4, alpha=16.0, seed=0):
    t = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    n = lora.add_lora(t, rank, alpha, targets, 0.0, seed)
    return t, n


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, p in lora.lora_parameters(model):
        p.data = torch.randn(p.shape, generator=g) * 0.3


def test_only_lora_trainable_fp32_and_final_proj_out_untouched(tiny_model):
    t, n = _lora_model(tiny_model)
    trainable = lora.lora_parameters(t)
    assert n == sum(p.numel() for _, p in trainable) > 0
    assert all("lora_" in name for name, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert not any(name.startswith("proj_out.lora") for name, _ in trainable)
    names = {name.rsplit(".lora_", 1)[0] for name, _ in trainable}
    assert "single_transformer_blocks.0.proj_out" in names and "transformer_blocks.0.ff.net.2" in names
    assert "single_transformer_blocks.0.proj_mlp" in names and "transformer_blocks.0.attn.to_add_out" in names


def test_presets_and_explicit_targets(tiny_model):
    base = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    att = set(lora.matched_modules(base, lora.PRESETS["attention"]))
    mlp = set(lora.matched_modules(base, lora.PRESETS["attention-mlp"]))
    every = set(lora.matched_modules(base, lora.PRESETS["all-linear"]))
    assert att < mlp < every and "proj_out" not in every
    assert lora.unmatched_targets(base, "attn.to_q,nonexistent_layer") == ["nonexistent_layer"]
    with pytest.raises(ConfigError, match="matches no Linear"):
        lora.add_lora(base, 4, 4, "nonexistent_layer", 0.0, 0)


def test_init_identical_for_same_seed_and_different_for_another(tiny_model):
    """Every rank builds the same LoRA from the seed (DDP starts from identical weights); another
    seed gives other A matrices (B starts at zero, so the model's output is unchanged either way)."""
    sa = lora.lora_state_dict(_lora_model(tiny_model, seed=5)[0])
    sb = lora.lora_state_dict(_lora_model(tiny_model, seed=5)[0])
    sc = lora.lora_state_dict(_lora_model(tiny_model, seed=6)[0])
    assert sa.keys() == sb.keys() == sc.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a_keys = [k for k in sa if "lora_A" in k]
    assert a_keys and all(not torch.equal(sa[k], sc[k]) for k in a_keys)
    assert all(not sa[k].any() for k in sa if "lora_B" in k)


def _generate(pipe, seed=0):
    out = pipe("a photo", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
               generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return out


def test_saved_lora_loads_in_diffusers_with_alpha(tiny_model, tmp_path):
    """The exported file (bf16 by default, half the size of fp32) loads in diffusers with its alpha
    and changes the images as the fp32 file does, up to bf16's rounding of the weights."""
    t, _ = _lora_model(tiny_model, rank=4, alpha=16.0)
    _randomize(t)
    path = lora.export_lora(tmp_path / "lora.safetensors", t)
    full = lora.export_lora(tmp_path / "lora-fp32.safetensors", t, save_dtype="fp32")
    with as_rank(1):
        assert lora.export_lora(tmp_path / "other.safetensors", t) is None  # only rank 0 writes
    assert not (tmp_path / "other.safetensors").exists()
    assert path.stat().st_size < 0.6 * full.stat().st_size
    trained = lora.lora_state_dict(t)
    images = {}
    for name, file, dtype in (("bf16", path, torch.bfloat16), ("fp32", full, torch.float32)):
        pipe = FluxPipeline.from_pretrained(tiny_model)
        pipe.set_progress_bar_config(disable=True)
        base = _generate(pipe)
        pipe.load_lora_weights(str(file), adapter_name="x")
        assert pipe.get_list_adapters()["transformer"] == ["x"]
        assert pipe.transformer.peft_config["x"].lora_alpha == 16.0 and pipe.transformer.peft_config["x"].r == 4
        images[name] = _generate(pipe)
        assert (images[name] - base).abs().max() > 1e-3
        # the loaded weights are the trained ones, rounded to the file's dtype
        loaded = {k.replace(".x.", "."): v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
        assert all(torch.equal(loaded[k].to(dtype), trained[k].to(dtype)) for k in trained)
    change = (images["fp32"] - base).abs().max()
    assert (images["bf16"] - images["fp32"]).abs().max() < 0.05 * change


def test_fuse_keeps_each_member_update():
    a = [torch.randn(2, 6) for _ in range(3)]
    b = [torch.randn(6, 2) for _ in range(3)]
    b[1] = None  # an untrained member contributes nothing
    down, up = fuse(a, b, 6, ["attn.to_q", "attn.to_k", "attn.to_v"])
    assert down.shape == (6, 6) and up.shape == (18, 6)
    delta = up @ down
    torch.testing.assert_close(delta[:6], b[0] @ a[0])
    torch.testing.assert_close(delta[12:], b[2] @ a[2])
    assert torch.equal(delta[6:12], torch.zeros(6, 6))
    d4, u4 = fuse([torch.randn(2, 6)] * 4, [torch.randn(6, 2)] * 3 + [torch.randn(24, 2)], 6,
                  ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"])
    assert u4.shape == (42, 8) and d4.shape == (8, 6)


def test_kohya_export_gives_same_pipeline_output(tiny_model, tmp_path):
    # diffusers' kohya reader hard-codes FLUX.1's single-block linear1 widths (3072/12288), so on the
    # tiny model the round trip covers every double-block layer and the single blocks' linear2
    targets = ("transformer_blocks.0.attn.to_q,transformer_blocks.0.attn.to_k,transformer_blocks.0.attn.to_v,"
               "attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out,"
               "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,single_transformer_blocks.0.proj_out")
    t, _ = _lora_model(tiny_model, targets=targets, rank=4, alpha=8.0)
    _randomize(t)
    path = lora.export_lora(tmp_path / "lora.safetensors", t, export_format="kohya")
    kohya = tmp_path / "lora-kohya.safetensors"
    assert kohya.is_file()
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as f:
        keys = set(f.keys())
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape[0] == 12
        assert float(f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")) == 24.0
        assert "lora_unet_single_blocks_0_linear2.lora_up.weight" in keys
    outs = []
    for file in (path, kohya):
        pipe = FluxPipeline.from_pretrained(tiny_model)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(file))
        assert pipe.get_list_adapters()["transformer"]
        outs.append(_generate(pipe))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    # and the export command writes the same file
    export_file(path, tmp_path / "again.safetensors")
    from safetensors.torch import load_file

    again, first = load_file(tmp_path / "again.safetensors"), load_file(kohya)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in again)
