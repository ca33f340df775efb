"""Preprocess stage end to end on the tiny model.   pytest -q tests/test_preprocess.py"""

import json
import shutil
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import preprocess_args, run_cli, torchrun
from flux_lora.data.cache import load_manifest


def _shards(cache):
    m = load_manifest(cache)
    out = {}
    for s in m["shards"]:
        shard = torch.load(cache / "shards" / s["file"], weights_only=True)
        for pos, idx in enumerate(shard["index"].tolist()):
            tid = int(shard["text_id"][pos])
            out[idx] = {"latents": shard["latents"][pos], "caption": shard["caption"][pos], "source": shard["source"][pos],
                        "bucket": tuple(shard["bucket"][pos]), "t5": shard["t5"][tid], "clip": shard["clip"][tid]}
    return out


def test_latents_match_diffusers_vae(cache_dir, tiny_model, images):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from flux_lora.data.images import load_rgb, resize_to_bucket

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    items = _shards(cache_dir)
    assert len(items) == 8
    for idx in (0, 1, 3):
        it = items[idx]
        im = resize_to_bucket(load_rgb(images / it["source"]), it["bucket"])
        x = VaeImageProcessor(vae_scale_factor=8).preprocess(im)
        with torch.no_grad():
            expect = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        # conv kernels differ slightly with batch size and threads; a missing shift would be off by 0.09
        torch.testing.assert_close(it["latents"], expect[0], rtol=1e-3, atol=1e-3)


def test_embeddings_match_encode_prompt(cache_dir, tiny_model):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model)
    items = _shards(cache_dir)
    for idx in (0, 1):
        it = items[idx]
        t5, pooled, _ = pipe.encode_prompt(it["caption"], it["caption"], max_sequence_length=32)
        torch.testing.assert_close(it["t5"], t5[0])
        torch.testing.assert_close(it["clip"], pooled[0])


def test_captions_trigger_and_sidecars(cache_dir, images):
    rows = [json.loads(line) for line in (cache_dir / "captions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    by_src = {r["source"]: r["caption"] for r in rows}
    for src, cap in by_src.items():
        txt = (images / src).with_suffix(".txt")
        assert cap.startswith("sks")
        if txt.exists():
            assert cap == "sks, " + txt.read_text().strip()
        else:
            assert len(cap) > len("sks, ")  # auto-captioned
    events = [json.loads(line) for line in (cache_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "warning" and "random weights" in e["message"] for e in events)  # said, not hidden
    # identical captions share one stored embedding
    m = load_manifest(cache_dir)
    shard = torch.load(cache_dir / "shards" / m["shards"][0]["file"], weights_only=True)
    assert shard["t5"].shape[0] == len(set(shard["caption"])) < len(shard["caption"])
    samples = torch.load(cache_dir / "samples.pt", weights_only=True)
    assert samples["prompts"] == ["sks, a red circle", "sks, a blue square"] and samples["t5"].shape[0] == 2


def test_manifest_contents(cache_dir):
    m = load_manifest(cache_dir)
    assert m["total_items"] == 8 and m["world_size"] == 1 and m["resolution"] == 64
    assert len(m["fingerprint"]) == 32 and m["buckets"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert (cache_dir / "config.yaml").is_file()
    events = [json.loads(line) for line in (cache_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"


def test_folder_and_zip_give_identical_shards(tmp_path, tiny_model, images, cache_dir):
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(images.iterdir()):
            zf.write(f, f"dataset/{f.name}")
    cache = tmp_path / "zc"
    run_cli(*preprocess_args(tiny_model, z, cache), check=True)
    a, b = _shards(cache_dir), _shards(cache)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["caption"] == b[k]["caption"] and a[k]["source"] == b[k]["source"].removeprefix("dataset/")
        assert torch.equal(a[k]["latents"], b[k]["latents"]) and torch.equal(a[k]["t5"], b[k]["t5"])


def test_url_download(tmp_path, tiny_model, images):
    z = tmp_path / "www" / "data.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(images.iterdir())[:4]:
            zf.write(f, f.name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(z.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        cache = tmp_path / "uc"
        run_cli(*preprocess_args(tiny_model, url, cache), check=True)
        assert len(list((cache / "download").glob("*-data.zip"))) == 1  # keyed by URL
        n_images = sum(f.suffix != ".txt" for f in sorted(images.iterdir())[:4])
        assert load_manifest(cache)["total_items"] == n_images
    finally:
        server.shutdown()


def _awkward_dataset(root, images):
    shutil.copytree(images, root)
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a jpeg")
    (root / "trunc.png").write_bytes((images / "img_001.png").read_bytes()[:50])
    return root


def test_unreadable_files_skipped_with_warning_or_strict_error(tmp_path, tiny_model, images):
    data = _awkward_dataset(tmp_path / "data", images)
    cache = tmp_path / "c"
    proc = run_cli(*preprocess_args(tiny_model, data, cache), check=True)
    for name in ("zero.png", "text.jpg", "trunc.png"):
        assert sum(name in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert load_manifest(cache)["total_items"] == 8
    warnings = [json.loads(line) for line in (cache / "events.jsonl").read_text().splitlines()
                if '"warning"' in line and "skipping" in line]
    assert len(warnings) == 3


def test_strict_failure_on_another_rank_is_reported_with_its_cause(tmp_path, tiny_model, images):
    """Under --strict the unreadable file is rank 1's: rank 0 only sees its peer vanish, yet the
    error event names rank 1 and its own cause, rank 0 exits 5 and nothing is marked complete."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "x_good.png").write_bytes((images / "img_001.png").read_bytes())  # item 8: rank 0
    (data / "y_trunc.png").write_bytes((images / "img_001.png").read_bytes()[:50])  # item 9: rank 1
    cache = tmp_path / "c2"
    proc = torchrun(2, *preprocess_args(tiny_model, data, cache, "--strict"), check=False)
    assert proc.returncode != 0
    assert "rank 1: error: y_trunc.png: not a readable image" in proc.stderr
    errors = [json.loads(line) for line in (cache / "events.jsonl").read_text().splitlines() if '"error"' in line]
    assert len(errors) == 1 and errors[0]["rank"] == 1 and errors[0]["exit_code"] == 5, \
        json.dumps(errors) + proc.stderr[-2000:]
    assert "rank 1 failed: DataError: y_trunc.png" in errors[0]["message"]
    assert not (cache / "manifest.json").exists()


def test_empty_and_all_unreadable_datasets(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(*preprocess_args(tiny_model, empty, tmp_path / "c"))
    assert proc.returncode == 2 and "no images" in proc.stderr and str(empty) in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    proc = run_cli(*preprocess_args(tiny_model, bad, tmp_path / "c2"))
    assert proc.returncode == 2 and "no usable images" in proc.stderr


def test_rerun_skips_finished_chunks_and_rebuilds_missing(tmp_path, tiny_model, images):
    cache = tmp_path / "c"
    args = preprocess_args(tiny_model, images, cache, "--set", "preprocess.chunk_items=3")
    run_cli(*args, check=True)
    parts = sorted((cache / "shards").glob("*.pt"))
    assert len(parts) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    proc = run_cli(*args, check=True)
    assert "already complete" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in parts} == mtimes
    # a crash lost the last chunk and the manifest: only that chunk is rebuilt
    parts[-1].unlink()
    (cache / "manifest.json").unlink()
    run_cli(*args, check=True)
    assert parts[-1].is_file() and load_manifest(cache)["total_items"] == 8
    done = [json.loads(line) for line in (cache / "events.jsonl").read_text().splitlines()][-1]
    assert done["encoded_items"] == 2  # the rebuilt chunk only, not the chunks found complete
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in parts[:-1])


def test_different_settings_refused_then_overwrite(tmp_path, tiny_model, images):
    cache = tmp_path / "c"
    run_cli(*preprocess_args(tiny_model, images, cache), check=True)
    before = (cache / "manifest.json").read_bytes()
    proc = run_cli(*preprocess_args(tiny_model, images, cache, "--square"))
    assert proc.returncode == 2 and "different square" in proc.stderr and "--overwrite" in proc.stderr
    assert (cache / "manifest.json").read_bytes() == before  # nothing already written is lost
    run_cli(*preprocess_args(tiny_model, images, cache, "--square", "--overwrite"), check=True)
    assert load_manifest(cache)["square"] is True


def test_two_ranks_match_one_rank(tmp_path, tiny_model, images, cache_dir):
    """Two ranks build what one builds (with a second resolution beside it: each rank's chunks of
    both, the base's equal to the one-rank cache's)."""
    cache = tmp_path / "c2"
    torchrun(2, *preprocess_args(tiny_model, images, cache, "--resolution", "64,80"))
    m = load_manifest(cache)
    assert m["world_size"] == 2
    assert sorted(s["file"] for s in m["shards"]) == ["rank-00000-of-00002-part-0000.pt", "rank-00001-of-00002-part-0000.pt"]
    assert sorted(s["file"] for s in m["layers"][0]["shards"]) == \
        ["res-00080/rank-00000-of-00002-part-0000.pt", "res-00080/rank-00001-of-00002-part-0000.pt"]
    assert sorted(r[0] for r in m["layers"][0]["items"]) == list(range(8))
    a, b = _shards(cache_dir), _shards(cache)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["caption"] == b[k]["caption"]
        torch.testing.assert_close(a[k]["latents"], b[k]["latents"])
    shard1 = torch.load(cache / "shards" / "rank-00001-of-00002-part-0000.pt", weights_only=True)
    assert shard1["index"].tolist() == [1, 3, 5, 7]
    done = [json.loads(line) for line in (cache / "events.jsonl").read_text().splitlines()][-1]
    # both ranks' items at both resolutions
    assert done["encoded_items"] == 16 and done["items_per_s"] == pytest.approx(16 / done["encode_s"], rel=0.01)
    assert len(done["encode_s_per_rank"]) == 2 and max(done["encode_s_per_rank"]) == pytest.approx(done["encode_s"], abs=1e-3)


def test_fewer_images_than_ranks(tmp_path, tiny_model, images):
    data = tmp_path / "one"
    data.mkdir()
    shutil.copy(images / "img_001.png", data)
    cache = tmp_path / "c"
    torchrun(2, *preprocess_args(tiny_model, data, cache, "--captioner", "none", "--default-caption", "a thing"))
    m = load_manifest(cache)
    assert m["total_items"] == 1 and len(m["shards"]) == 2
    assert [s["items"] for s in m["shards"]] == [1, 0]


def test_a_stop_that_a_library_rewrapped_is_still_a_stop():
    """SIGTERM (torchrun ending the peers of a failed rank) can land inside diffusers' lazy import,
    which re-raises it as its own RuntimeError; the stage must see the stop, not a crash of its own."""
    from flux_lora.errors import StoppedError
    from flux_lora.outputs.events import _stop_inside

    stop = StoppedError("preprocess stopped (SIGTERM)")
    try:
        try:
            raise stop
        except Exception as e:
            raise RuntimeError("Failed to import diffusers.pipelines.flux.pipeline_flux") from e
    except RuntimeError as wrapped:
        assert _stop_inside(wrapped) is stop
    assert _stop_inside(RuntimeError("a crash of our own")) is None


def test_a_caption_shared_across_chunks_is_encoded_once(tmp_path, tiny_model, images, monkeypatch):
    """Images without captions all get the default caption: over three chunks the text encoders
    see it once, and every chunk stores the same embedding (diffusers' encode_prompt's)."""
    from diffusers import FluxPipeline

    from flux_lora.config import build_config
    from flux_lora.data import preprocess
    from flux_lora.models.families import flux1

    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(images.iterdir()):
        if p.suffix != ".txt":
            shutil.copy(p, data / p.name)
    seen = []
    real = flux1.FAMILY.__class__.encode_prompts

    def counting(self, text_pipe, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(self, text_pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(flux1.FAMILY.__class__, "encode_prompts", counting)
    cache = tmp_path / "cache"
    preprocess.run(build_config(flags={"model.path": str(tiny_model), "data.source": str(data), "data.cache_dir": str(cache),
                                       "data.resolution": 64, "data.max_sequence_length": 32, "data.captioner": "none",
                                       "data.default_caption": "a shape", "preprocess.num_workers": 0,
                                       "preprocess.chunk_items": 3}))
    assert seen.count("a shape") == 1  # once for three chunks (the empty prompt is another text)
    items = _shards(cache)
    assert len(load_manifest(cache)["shards"]) == 3 and len(items) == 8
    t5, pooled, _ = FluxPipeline.from_pretrained(tiny_model).encode_prompt("a shape", "a shape", max_sequence_length=32)
    for it in items.values():
        torch.testing.assert_close(it["t5"], t5[0])
        torch.testing.assert_close(it["clip"], pooled[0])


def test_encoders_turn_tf32_on_for_reduced_precision_only_and_restore_it(tiny_model):
    """The compiled T5's attention multiplies bf16 values upcast to fp32: TF32 is turned on while
    the encoders live (exact for such inputs) and the caller's setting comes back; an fp32 run
    keeps full fp32 matmuls."""
    from flux_lora.config import build_config
    from flux_lora.data.preprocess import Encoders
    from flux_lora.models import families
    from flux_lora.models.families.base import to_host

    family = families.of_model(str(tiny_model))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for dtype, during in (("bf16", True), ("fp32", False)):
            cfg = build_config(flags={"model.path": str(tiny_model), "model.dtype": dtype})
            enc = Encoders(cfg, torch.device("cpu"), family, text=False)
            assert torch.backends.cuda.matmul.allow_tf32 is during
            enc.close()
            assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(to_host(x), x) and to_host(x).device.type == "cpu"
    from flux_lora.models.families import base
    with pytest.raises(ValueError), base.host_copies_queued(torch.device("cpu")):  # queued copies are CUDA's only
        assert not base._queued.on and torch.equal(to_host(x), x)
        base._queued.on = True
        raise ValueError
    assert not base._queued.on  # an error inside leaves copies waited for again
