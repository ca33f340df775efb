"""Several datasets in one run (`--data datasets.yaml`, data/datasets.py): the file's checks, each
dataset's captions options, repeats in the epoch, regularization images weighted in the loss, and
the manifest recording the sources.   pytest -q tests/test_datasets.py"""

import json
import shutil

import pytest
import torch

from conftest import TINY_ARGS, run_cli, torchrun, train_args
from flux_lora.data import datasets
from flux_lora.errors import ConfigError


def _yaml(path, text):
    path.write_text(text)
    return str(path)


def test_a_datasets_file_is_read_and_checked(tmp_path):
    (tmp_path / "a").mkdir()
    specs = datasets.load_datasets(_yaml(tmp_path / "d.yaml", """datasets:
  - path: a
    trigger_word: sks
    repeats: 3
  - {path: /data/class, regularization: true, default_caption: a photo of a person}
"""))
    assert specs[0] == datasets.DatasetSpec(str(tmp_path / "a"), "sks", None, 3, False)  # relative to the file
    assert specs[1].regularization and specs[1].trigger_word is None and specs[1].repeats == 1
    bad = {"datasets:\n  - {path: a, repeat: 2}": "dataset 1: unknown key 'repeat'",
           "datasets:\n  - {trigger_word: x}": "dataset 1: no path",
           "datasets:\n  - {path: a, repeats: 0}": "repeats=0 must be a whole number >= 1",
           "datasets:\n  - {path: a, regularization: true}": "every dataset is regularization",
           "datasets: []": "lists no datasets", "sets:\n  - a": "unknown top-level key 'sets'",
           "datasets:\n  - {path: a, regularization: maybe}": "regularization must be true or false"}
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            datasets.load_datasets(_yaml(tmp_path / "bad.yaml", text))
    with pytest.raises(ConfigError, match="does not exist"):
        datasets.load_datasets(str(tmp_path / "missing.yaml"))


def test_repeats_expand_an_epoch():
    manifest = [{"first": 0, "count": 2, "repeats": 3}, {"first": 2, "count": 2, "repeats": 1}]
    assert datasets.repeated([0, 1, 2, 3], [0, 1, 2, 3], manifest) == [0, 0, 0, 1, 1, 1, 2, 3]
    assert datasets.repeated([0, 1], [3, 1], manifest) == [0, 1, 1, 1]  # positions follow their item's dataset
    assert datasets.repeated([0, 1], [0, 1], None) == [0, 1]


def test_sample_weights_scale_each_samples_loss():
    from flux_lora.training import flow

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 4, generator=g)
    weights = torch.tensor([1.0, 0.5, 0.0])
    per_sample = (pred - target).pow(2).mean(dim=(1, 2))
    assert torch.allclose(flow.flow_loss(pred, target, sample_weight=weights), (weights * per_sample).mean())
    mask = torch.rand(3, 8, 4, generator=g)
    masked = ((pred - target).pow(2) * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
    assert torch.allclose(flow.flow_loss(pred, target, mask, weights), (weights * masked).mean())
    assert torch.equal(flow.flow_loss(pred, target, sample_weight=torch.ones(3)), flow.flow_loss(pred, target))


def test_two_datasets_one_cache_then_train(tiny_model, images, tmp_path):
    concept, regular = tmp_path / "concept", tmp_path / "class"
    concept.mkdir()
    regular.mkdir()
    files = sorted(p for p in images.iterdir() if p.suffix != ".txt")
    for p in files[:5]:
        shutil.copy(p, concept / p.name)
    for p in files[5:]:
        shutil.copy(p, regular / p.name)
    spec = _yaml(tmp_path / "data.yaml", f"""datasets:
  - {{path: concept, trigger_word: zzt, repeats: 2, default_caption: a shape}}
  - {{path: {regular}, regularization: true, default_caption: a photo of a shape}}
""")
    cache = tmp_path / "cache"
    torchrun(2, "preprocess", "--model", tiny_model, "--data", spec, "--cache-dir", cache, *TINY_ARGS,
             "--captioner", "none", "--trigger-word", "sks")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [(d["first"], d["count"], d["repeats"], d["regularization"]) for d in manifest["datasets"]] == \
        [(0, 5, 2, False), (5, 3, 1, True)]
    captions = [json.loads(line) for line in (cache / "captions.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in captions] == ["zzt, a shape"] * 5 + ["a photo of a shape"] * 3
    assert captions[0]["source"].startswith("0/") and captions[-1]["source"].startswith("1/")

    from flux_lora.config import build_config
    from flux_lora.data.preprocess import gather_sources
    from flux_lora.errors import DataError
    from flux_lora.models import families

    missing = _yaml(tmp_path / "missing.yaml", "datasets:\n  - concept\n  - {path: nowhere, regularization: true}\n")
    with pytest.raises(DataError, match="missing.yaml, regularization dataset 2: data source .*nowhere does not exist"):
        gather_sources(build_config(flags={"data.source": missing}), tmp_path / "c2", families.by_name("flux1"), None)

    out = tmp_path / "out"
    run_cli(*train_args(tiny_model, cache, out, "--steps", "3", "--batch-size", "2", "--set", "train.prior_loss_weight=0.5"),
            check=True)
    start = json.loads((out / "events.jsonl").read_text().splitlines()[0])
    assert start["dataset_size"] == 5 * 2 + 3  # an epoch: the concept twice, the class images once


def test_metadata_jsonl_captions(tmp_path):
    """Hugging Face's imagefolder metadata.jsonl: one caption ("text"/"caption") or several (a list);
    a .txt beside the image wins; a broken line is one error naming it."""
    from PIL import Image

    from flux_lora.data.sources import discover
    from flux_lora.errors import DataError

    for name in ("a.png", "b.png", "sub/c.png", "d.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "d.txt").write_text("from the sidecar")
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "sub/c.png", "captions": ["one", " two "]},
            {"file_name": "d.png", "caption": "ignored: d.txt wins"}, {"file_name": "gone.png", "text": "no image"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    found = {s.name: (s.caption, s.several_captions) for s in discover(tmp_path)}
    assert found == {"a.png": ("a red square", False), "b.png": (None, False), "sub/c.png": ("one\ntwo", True),
                     "d.png": ("from the sidecar", False)}
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2 is not a JSON object with a file_name and a text"):
        discover(tmp_path)


def test_metadata_csv_and_metadata_in_subfolders(tmp_path):
    """imagefolder's other layouts: metadata.csv (file_name,text or caption; quoted commas, a BOM),
    and a metadata file in a subfolder, its file_name relative to that folder. Bad ones: one line."""
    from PIL import Image

    from flux_lora.data.sources import discover
    from flux_lora.errors import DataError

    for name in ("a.png", "b.png", "train/c.png", "train/deep/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "metadata.csv").write_text('\ufefffile_name,text\na.png,"red, square"\nb.png,\n', encoding="utf-8")
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "see"}) + "\n")
    (tmp_path / "train" / "deep" / "metadata.csv").write_text("caption,file_name\nDee,./d.png\n")
    found = {s.name: s.caption for s in discover(tmp_path)}
    assert found == {"a.png": "red, square", "b.png": None, "train/c.png": "see", "train/deep/d.png": "Dee"}
    (tmp_path / "metadata.csv").write_text("image,prompt\na.png,x\n")
    with pytest.raises(DataError, match=r"metadata.csv needs a header with a file_name column and a text \(or caption\) "
                                         r"column; its first line is 'image,prompt'"):
        discover(tmp_path)
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"metadata.csv is not UTF-8 text; save it as UTF-8"):
        discover(tmp_path)


def test_a_jsonl_list_becomes_several_captions_each_with_its_datasets_trigger():
    from pathlib import Path

    from flux_lora.config import build_config
    from flux_lora.data.preprocess import final_captions
    from flux_lora.data.sources import SourceImage

    cfg = build_config(flags={"data.trigger_word": "sks", "data.default_caption": "a thing"})
    entries = [(0, SourceImage(Path("a.png"), "0/a.png", "one\ntwo", several_captions=True)),
               (1, SourceImage(Path("b.png"), "1/b.png", None, trigger_word="", default_caption="a person")),
               (2, SourceImage(Path("c.png"), "0/c.png", "red\nblue"))]
    assert final_captions(cfg, entries, {}) == {0: ["sks, one", "sks, two"], 1: ["a person"], 2: ["sks, red\nblue"]}
