"""The output folder's model card (outputs/model_card.py): front matter the Hub reads, how to load
the LoRA, and never replacing a README.md flux_lora did not write.   pytest -q tests/test_model_card.py"""

import yaml

from flux_lora.outputs import model_card


def _info(**kw):
    base = dict(base_model="black-forest-labs/FLUX.1-Kontext-dev", family_title="FLUX.1 Kontext",
                pipeline_class="FluxKontextPipeline", trigger_word="sks", settings={"steps": 100, "LoRA rank / alpha": "16 / 16"},
                preview="samples/step-000100.png", files=["lora.safetensors", "lora-kohya.safetensors"], kohya=True,
                paired=True)
    return model_card.CardInfo(**{**base, **kw})


def test_card_front_matter_and_usage():
    text = model_card.card_text(_info())
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "black-forest-labs/FLUX.1-Kontext-dev" and front["instance_prompt"] == "sks"
    assert front["widget"][0]["output"]["url"] == "samples/step-000100.png" and "lora" in front["tags"]
    assert "FluxKontextPipeline.from_pretrained(\"black-forest-labs/FLUX.1-Kontext-dev\"" in text
    assert 'pipe(image=load_image("input.png"), prompt="sks, your instruction")' in text
    assert "lora-kohya.safetensors" in text and "| steps | 100 |" in text
    local = yaml.safe_load(model_card.card_text(_info(base_model="/models/mine", paired=False, preview=None)).split("---")[1])
    assert "base_model" not in local and "widget" not in local  # a local folder is not a Hub id


def test_a_users_readme_is_never_replaced(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    assert model_card.write_model_card(tmp_path, _info()).name == "model-card.md"
    assert (tmp_path / "README.md").read_text() == "my notes"
    (tmp_path / "README.md").unlink()
    assert model_card.write_model_card(tmp_path, _info()).name == "README.md"
    assert model_card.write_model_card(tmp_path, _info(trigger_word="zzz")).name == "README.md"  # ours: rewritten
    assert "zzz" in (tmp_path / "README.md").read_text()


class _FakeHub:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo, **kw):
        if self.fail:
            raise self.fail
        self.calls.append(("create", repo, kw))
        return f"https://huggingface.co/{repo}"

    def upload_folder(self, **kw):
        self.calls.append(("upload", kw))


def test_push_uploads_the_card_lora_and_previews_only(tmp_path):
    hub = _FakeHub()
    assert model_card.push_to_hub(tmp_path, "me/my-lora", hub) == "https://huggingface.co/me/my-lora"
    (_, repo, created), (_, upload) = hub.calls
    assert repo == "me/my-lora" and created["exist_ok"] and created["private"]
    assert upload["folder_path"] == str(tmp_path) and "README.md" in upload["allow_patterns"]
    assert "lora.safetensors" in upload["allow_patterns"] and not any("checkpoints" in p for p in upload["allow_patterns"])


def test_push_failure_is_one_line_and_a_bad_repo_id_is_refused():
    import pytest

    from flux_lora.config import build_config
    from flux_lora.errors import ConfigError

    with pytest.raises(OSError, match="^PermissionError: not logged in$"):
        model_card.push_to_hub(".", "me/x", _FakeHub(fail=PermissionError("not logged in\ntraceback...")))
    with pytest.raises(ConfigError, match="not a repo id; use OWNER/NAME"):
        build_config(None, {"output.push_to_hub": "just-a-name"})
