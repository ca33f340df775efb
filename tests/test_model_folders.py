"""Model folders flux_lora did not write: weights saved only as a variant (`save_pretrained(variant=
"fp16")`, sharded or not, some parts plain), and a hub id read offline from the Hugging Face cache.
   pytest -q tests/test_model_folders.py"""

import shutil

import pytest
import torch

from conftest import preprocess_args, run_cli, train_args
from flux_lora.errors import ModelError
from flux_lora.models import families, loading

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _pipeline_copy(tiny_model, dest):
    shutil.copytree(tiny_model, dest, ignore=shutil.ignore_patterns("captioner"))
    return dest


def _as_variant(folder, part, variant, shards=False):
    """Re-save folder/part as only VARIANT files (sharded into several files with shards)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    cls = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
           "text_encoder_2": T5EncoderModel}[part]
    model = cls.from_pretrained(folder / part)
    shutil.rmtree(folder / part)
    model.save_pretrained(folder / part, variant=variant, **({"max_shard_size": "40KB"} if shards else {}))


def _state(module):
    return {k: v.float() for k, v in module.state_dict().items()}


def _same(a, b):
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_saved_only_as_a_variant_load_as_the_plain_ones(tiny_model, tmp_path):
    folder = _pipeline_copy(tiny_model, tmp_path / "fp16-model")
    _as_variant(folder, "transformer", "fp16", shards=True)
    _as_variant(folder, "vae", "fp16")
    _as_variant(folder, "text_encoder_2", "fp16")  # text_encoder stays plain: a mixed folder
    assert len(list((folder / "transformer").glob("*.fp16-*.safetensors"))) > 1  # diffusers' shard names
    assert [loading.stored_variant(str(folder), part=p) for p in PARTS] == ["fp16", "fp16", None, "fp16"]
    assert loading.stored_variant(str(tiny_model)) is None
    family = families.of_model(str(folder))
    for load in ("load_transformer", "load_vae"):
        assert _same(getattr(family, load)(str(folder), torch.float32), getattr(family, load)(str(tiny_model), torch.float32))
    texts, plain = (family.load_text_pipeline(str(f), torch.float32) for f in (folder, tiny_model))
    assert _same(texts.text_encoder_2, plain.text_encoder_2) and _same(texts.text_encoder, plain.text_encoder)


def test_weights_in_two_variants_and_no_plain_ones_are_one_line(tiny_model, tmp_path):
    folder = _pipeline_copy(tiny_model, tmp_path / "mixed")
    _as_variant(folder, "transformer", "fp16")
    _as_variant(folder, "vae", "bf16")
    with pytest.raises(ModelError, match=r"several variants \(bf16, fp16\) and no plain files; keep one variant's files"):
        loading.stored_variant(str(folder))


def test_a_hub_id_trains_offline_from_the_hub_cache_with_variant_weights(tiny_model, images, tmp_path):
    """--model ORG/NAME with HF_HUB_OFFLINE=1: from_pretrained reads the cache's snapshot, as after `hf download`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-flux"
    snapshot = _pipeline_copy(tiny_model, repo / "snapshots" / commit)
    for part in PARTS:
        _as_variant(snapshot, part, "bf16")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cache, out = tmp_path / "cache", tmp_path / "out"
    stage1 = run_cli(*preprocess_args("acme/tiny-flux", images, cache, "--captioner", "none", "--default-caption",
                                      "a toy"), env=env, check=True)
    stage2 = run_cli(*train_args("acme/tiny-flux", cache, out, "--steps", "2"), env=env, check=True)
    assert (out / "lora.safetensors").is_file()
    for said in (stage1.stderr, stage2.stderr):  # the libraries' offline chatter stays out of the user's way
        assert "Could not reach the Hub" not in said and "local_dir_use_symlinks" not in said, said
    assert loading.stored_variant(str(snapshot)) == "bf16"
