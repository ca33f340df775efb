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
