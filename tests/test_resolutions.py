"""Several resolutions in one cache (data.resolutions, `--resolution 64,96`, `--add-resolution`):
each image's latents at each resolution's bucket, the text encoded once and shared, a resolution
added to a finished cache without loading a text encoder, batches drawn per bucket, and training
on it world-size invariant and resumable.   pytest -q tests/test_resolutions.py"""

import json
import shutil

import pytest
import torch

from conftest import cli_env, run_cli, torchrun, train_args
from flux_lora.config import build_config
from flux_lora.data import cache, preprocess
from flux_lora.errors import CacheError, ConfigError


def _flags(model, images, cache_dir, resolution: str, **more) -> dict:
    return {"model.path": str(model), "data.source": str(images), "data.cache_dir": str(cache_dir),
            **({"data.resolutions": resolution} if "," in resolution else {"data.resolution": int(resolution)}),
            "data.max_sequence_length": 32, "preprocess.num_workers": 0, "data.captioner": "none",
            "data.trigger_word": "sks", **more}


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_resolutions(tiny_model, images, tmp_path_factory):
    """A cache of the 8 images at 64 px (the base) and 96 px, built in this process (two ranks
    build one in test_preprocess.py's test_two_ranks_match_one_rank)."""
    cache_dir = tmp_path_factory.mktemp("multires") / "c"
    preprocess.run(build_config(flags=_flags(tiny_model, images, cache_dir, "64,96")))
    return cache_dir


def test_each_image_at_each_resolution_with_the_text_once(tiny_model, images, two_resolutions):
    from diffusers import AutoencoderKL

    from flux_lora.data.images import load_rgb, make_buckets, nearest_bucket, resize_to_bucket

    manifest = cache.load_manifest(two_resolutions)
    assert manifest["resolution"] == 64 and manifest["resolutions"] == [64, 96]
    layer = manifest["layers"][0]
    assert layer["resolution"] == 96 and layer["buckets"] == [list(b) for b in make_buckets(96)]
    assert sorted(r[0] for r in layer["items"]) == sorted(r[0] for r in manifest["items"])  # every image, again
    assert [s["file"] for s in layer["shards"]] == ["res-00096/rank-00000-of-00001-part-0000.pt"]
    dataset = cache.CachedDataset(two_resolutions, manifest)
    assert len(dataset) == 2 * dataset.base_items == 16
    layer_shard = torch.load(two_resolutions / "shards" / layer["shards"][0]["file"], weights_only=True)
    assert "text_keys" not in layer_shard and "t5" not in layer_shard  # latents only: the text is the base's
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    sources = {json.loads(line)["index"]: json.loads(line)["source"]
               for line in (two_resolutions / "captions.jsonl").read_text().splitlines()}
    for k in (0, dataset.base_items + 3):  # a base item and a 96 px one
        item = dataset[k]
        base = dataset[next(j for j in range(dataset.base_items) if dataset.items[j].index == item["index"])]
        assert torch.equal(item["t5"], base["t5"]) and torch.equal(item["clip"], base["clip"])
        side = 64 if k < dataset.base_items else 96
        image = load_rgb(images / sources[item["index"]])
        bucket = nearest_bucket(image.width, image.height, make_buckets(side))
        assert tuple(item["bucket"]) == bucket
        pixels = torch.from_numpy(__import__("numpy").asarray(resize_to_bucket(image, bucket)).copy())
        with torch.no_grad():
            mean = vae.encode(pixels.permute(2, 0, 1)[None].float() / 127.5 - 1.0).latent_dist.mean
        expected = (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        torch.testing.assert_close(item["latents"], expected[0], rtol=1e-3, atol=1e-4)  # batched convs


def test_batches_come_from_one_bucket_and_cover_every_resolution(two_resolutions):
    from flux_lora.training.batches import GlobalBatchSampler

    dataset = cache.CachedDataset(two_resolutions, cache.load_manifest(two_resolutions))
    sampler = GlobalBatchSampler([it.bucket for it in dataset.items], 2, seed=3)
    epoch = sampler.epoch_plan(0)
    assert all(len({dataset.items[k].bucket for k in batch}) == 1 for batch in epoch)
    assert {k for batch in epoch for k in batch} == set(range(len(dataset)))  # each image at each resolution


def test_a_resolution_added_without_encoding_text(tiny_model, images, tmp_path, monkeypatch):
    """--add-resolution on a finished cache: the base's files stay byte for byte, no text encoder
    loads, the manifest gains the layer; rerunning the first command keeps it; a cache of another
    base resolution, a missing cache and a bad size are one line each."""
    from flux_lora.models.families import flux1

    cache_dir = tmp_path / "c"
    preprocess.run(build_config(flags=_flags(tiny_model, images, cache_dir, "64")))
    before = {p.name: _sha(p) for p in (cache_dir / "shards").glob("rank-*")}
    before["captions.jsonl"] = _sha(cache_dir / "captions.jsonl")

    def no_text(*args, **kwargs):
        raise AssertionError("a text encoder loaded while adding a resolution")

    monkeypatch.setattr(flux1.FAMILY.__class__, "load_text_pipeline", no_text)
    summary = preprocess.run(preprocess.extension_config(str(cache_dir), "80", None, {}, []))
    assert summary["encoded_items"] == 8
    assert {p.name: _sha(p) for p in (cache_dir / "shards").glob("rank-*")} | \
        {"captions.jsonl": _sha(cache_dir / "captions.jsonl")} == before
    manifest = cache.load_manifest(cache_dir)
    assert cache.resolutions_of(manifest) == [64, 80] and len(cache.all_items(manifest)) == 16
    assert preprocess.run(build_config(flags=_flags(tiny_model, images, cache_dir, "64"))).get("encoded_items") is None
    assert cache.resolutions_of(cache.load_manifest(cache_dir)) == [64, 80]  # a cache only gains resolutions
    with pytest.raises(CacheError, match="built with different resolution.*--overwrite"):
        preprocess.run(build_config(flags=_flags(tiny_model, images, cache_dir, "96")))
    with pytest.raises(CacheError, match="has no manifest.json|does not exist"):
        preprocess.extension_config(str(tmp_path / "none"), "96", None, {}, [])
    with pytest.raises(ConfigError, match="'100' is not a positive multiple of 16"):
        preprocess.extension_config(str(cache_dir), "100", None, {}, [])
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data:\n  resolutions: [512, 1024]\n")
    from flux_lora.config import data_resolution_flags

    assert (build_config(yaml).data.resolution, build_config(yaml).data.resolutions) == (512, [512, 1024])
    flagged = build_config(yaml, data_resolution_flags("768"))  # the flag wins over the file's list
    assert (flagged.data.resolution, flagged.data.resolutions) == (768, [])
    proc = run_cli("preprocess", "--cache-dir", cache_dir, "--resolution", "64,9x6")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "error: data.resolutions: '9x6' is not a positive multiple of 16; give sides in pixels, e.g. --resolution 512,768,1024"


def test_training_on_two_resolutions_is_rank_invariant_and_resumes(tiny_model, two_resolutions, tmp_path):
    """One rank × batch 2 for 4 steps, against two ranks × batch 1 resumed from the first run's
    step-2 checkpoint: the same LoRA. The held-out image is held out at both resolutions."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--steps", "4", "--lr", "1e-2", "--validation-split", "0.25", "--checkpoint-every", "2"]
    run_cli(*train_args(tiny_model, two_resolutions, one, "--batch-size", "2", *args), check=True)
    start = json.loads((one / "events.jsonl").read_text().splitlines()[0])
    assert (start["dataset_size"], start["validation_items"]) == (12, 4)  # 2 of 8 images held out, at 64 and 96 px
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / "step-000002", two / "checkpoints" / "step-000002")
    torchrun(2, *train_args(tiny_model, two_resolutions, two, "--batch-size", "1", *args), env=cli_env())
    assert '"start_step":2' in (two / "events.jsonl").read_text().replace(" ", "")
    a, b = load_file(one / "lora.safetensors"), load_file(two / "lora.safetensors")
    gap = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt() / sum(a[k].pow(2).sum() for k in a).sqrt()
    assert gap < 5e-5, float(gap)
