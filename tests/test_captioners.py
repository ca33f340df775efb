"""Auto-captioners of each supported kind (data/captions.py) on tiny random models of the real
architectures (tests/tiny_captioners.py): the generation call comes from the config, a batch gives
what one image at a time gives, bad choices are one line, and preprocess captions with one,
rank-sharded.   pytest -q tests/test_captioners.py"""

import json

import pytest
import torch
from PIL import Image

import tiny_captioners
from conftest import TINY_ARGS, run_cli
from flux_lora.data.captions import Captioner
from flux_lora.errors import ModelError

KINDS = {"florence2": "florence2", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "llava": "chat"}


@pytest.fixture(scope="module")
def captioners(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {name: tiny_captioners.build(name, root / name) for name in KINDS}


def _images():
    return [Image.new("RGB", (48, 32), (200, 30, 30)), Image.new("RGB", (32, 64), (30, 200, 30)),
            Image.new("RGB", (40, 40), (30, 30, 200))]


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_captions_a_batch_as_one_at_a_time(captioners, name):
    captioner = Captioner(str(captioners[name]), torch.device("cpu"), torch.float32, max_new_tokens=6,
                          prompt="<DETAILED_CAPTION>" if name == "florence2" else "Describe the image.")
    assert captioner.kind == KINDS[name]
    batch = captioner(_images())
    assert len(batch) == 3 and all(isinstance(t, str) for t in batch)
    assert batch == [captioner([image])[0] for image in _images()]  # left padding, image tokens per image


def test_the_default_prompts(tmp_path):
    from flux_lora.data import captions

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert captions.processor_chat_template(str(tmp_path)) == "{{ messages }}"  # a processor folder's own file
    assert captions.processor_chat_template(str(tmp_path / "nothing")) is None

    assert captions.caption_prompt("florence2", "") == "<MORE_DETAILED_CAPTION>"
    assert captions.caption_prompt("qwen", "") == captions.CHAT_PROMPT == captions.caption_prompt("chat", "")
    assert captions.caption_prompt("blip", "ignored") == ""


def test_unsupported_and_wrong_prompts_are_one_line(captioners, tiny_model):
    with pytest.raises(ModelError, match=r"'clip_text_model' model.*supported kinds: blip .*florence2.*qwen2_5_vl.*llava"):
        Captioner(str(tiny_model / "text_encoder"), torch.device("cpu"), torch.float32)
    with pytest.raises(ModelError, match="Florence-2 takes a task prompt.*<MORE_DETAILED_CAPTION>"):
        Captioner(str(captioners["florence2"]), torch.device("cpu"), torch.float32, prompt="describe it")


def test_preprocess_captions_with_a_vlm(captioners, tiny_model, images, tmp_path):
    cache = tmp_path / "cache"
    run_cli("preprocess", "--model", tiny_model, "--data", images, "--cache-dir", cache, *TINY_ARGS, "--captioner",
            captioners["qwen3_vl"], "--caption-prompt", "Describe the image.", "--trigger-word", "sks", check=True)
    rows = [json.loads(line) for line in (cache / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["caption"].startswith("sks") for r in rows)
