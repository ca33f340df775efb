"""Config precedence and strictness.   .venv/bin/python -m pytest -q tests/test_config.py"""

import pytest

from flux_lora.config import build_config, reference_markdown, to_yaml
from flux_lora.errors import ConfigError


def test_precedence_defaults_yaml_flags_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  steps: 7\n  lr: 0.5\n  batch_size: 3\nlora:\n  rank: 8\n")
    cfg = build_config(y, {"train.lr": 0.25, "train.batch_size": None}, ["train.lr=0.125"])
    assert cfg.train.steps == 7  # YAML over default
    assert cfg.train.batch_size == 3  # a flag not given (None) leaves YAML alone
    assert cfg.train.lr == 0.125  # --set over flag over YAML
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 8.0  # alpha defaults to rank
    assert cfg.train.grad_accum == 1  # default
    cfg2 = build_config(y, {"train.lr": 0.25})
    assert cfg2.train.lr == 0.25


def test_unknown_key_in_yaml_names_key_and_valid_ones(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError) as e:
        build_config(y)
    assert "train.stepz" in str(e.value) and "steps" in str(e.value) and "batch_size" in str(e.value)


def test_unknown_section_and_set_key():
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        build_config(None, None, ["trian.steps=3"])
    with pytest.raises(ConfigError, match="lora.rnak"):
        build_config(None, None, ["lora.rnak=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(None, None, ["steps"])


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="train.steps"):
        build_config(None, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="data.square"):
        build_config(None, None, ["data.square=maybe"])
    assert build_config(None, None, ["data.square=true"]).data.square is True
    assert build_config(None, None, ["data.sample_prompts=[a cat, a dog]"]).data.sample_prompts == ["a cat", "a dog"]


def test_yaml_on_off_words_reach_the_on_off_choices(tmp_path):
    """YAML reads `off`, `no`, `on` as booleans; the on/off/auto settings take them as meant."""
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  compile: off\n  cuda_graphs: no\n  gradient_checkpointing: on\n  fp8_compute: off\n")
    t = build_config(y).train
    assert (t.compile, t.cuda_graphs, t.gradient_checkpointing, t.fp8_compute) == ("off", "off", "on", "off")
    y2 = tmp_path / "resolved.yaml"
    y2.write_text(to_yaml(build_config(y)))
    assert build_config(y2).train.compile == "off"


def test_validation_messages():
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_config(None, None, ["data.resolution=500"])
    with pytest.raises(ConfigError, match="constant, cosine, linear"):
        build_config(None, None, ["train.schedule=exponential"])


@pytest.mark.parametrize("setting, bound", [
    ("train.max_nonfinite=0", ">= 1"), ("train.lr=nan", "> 0"), ("train.lr=-1e-4", "> 0"), ("train.lr=inf", "> 0"),
    ("lora.dropout=5", ">= 0 and <= 0.99"), ("preprocess.num_workers=-2", ">= -1"), ("lora.rank=0", ">= 1"),
    ("train.max_grad_norm=nan", ">= 0"), ("train.logit_std=0", "> 0"), ("dist.timeout_s=0", ">= 1"),
    ("train.keep_checkpoints=0", ">= 1"), ("train.guidance=-inf", ">= 0"), ("preprocess.max_image_pixels=0", ">= 1"),
])
def test_every_number_is_checked_when_the_config_is_built(setting, bound):
    """Before any model loads: one line naming the key, the value and the range."""
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=.* out of range; it must be a finite number {bound}"):
        build_config(None, None, [setting])


def test_every_numeric_field_has_a_range_or_is_free_on_purpose():
    import dataclasses

    from flux_lora.config import section_types

    free = {"train.logit_mean"}  # any real mean is a valid logit-normal
    for name, cls in section_types().items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", int, float) and f"{name}.{f.name}" not in free:
                assert f.metadata.get("low") is not None, f"{name}.{f.name} has no range"


def test_sample_options_fail_before_loading(tmp_path):
    from conftest import run_cli

    proc = run_cli("sample", "--model", tmp_path / "nowhere", "--prompt", "x", "--out", tmp_path / "x.png", "--size", "0")
    assert proc.returncode == 2 and "--size 0 must be a positive multiple of 16" in proc.stderr


def test_resolved_yaml_round_trips(tmp_path):
    cfg = build_config(None, {"train.steps": 9, "data.sample_prompts": ["x"]})
    y = tmp_path / "resolved.yaml"
    y.write_text(to_yaml(cfg))
    assert build_config(y) == cfg
    assert "`train.steps`" in reference_markdown()


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must open with its launch command"
        build_config(path)


def test_config_reference_page_is_current():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert reference_markdown() in page, "regenerate docs/config.md with: python -m flux_lora config-reference"
