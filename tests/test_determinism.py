"""train.deterministic: torch's global switches set and put back, the config it refuses, the
attention it picks, the compile caches keyed on SDPA's switches, and a whole run under it.
    pytest -q tests/test_determinism.py"""

import json
import os

import pytest
import torch
import torch._inductor.config as inductor
import torch.compiler.config
from conftest import run_cli, train_args
from test_train import REFERENCE_LOSSES

from flux_lora.config import Config, ModelConfig, TrainConfig, build_config
from flux_lora.errors import ConfigError
from flux_lora.fast import attention, determinism
from flux_lora.models.tiny import make_tiny


@pytest.fixture
def undo():
    yield
    determinism.apply(False)


def test_switches_set_and_put_back(undo, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    determinism.apply(False)  # never turned on: nothing to undo, the user's own setting is left alone
    assert not torch.are_deterministic_algorithms_enabled()
    determinism.apply(True)
    assert torch.are_deterministic_algorithms_enabled()
    # strict: under warn_only torch keeps the non-deterministic attention backwards
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert inductor.deterministic and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == determinism.CUBLAS_WORKSPACE
    assert not torch.utils.deterministic.fill_uninitialized_memory  # no fill kernel per allocation
    determinism.apply(False)
    assert not torch.are_deterministic_algorithms_enabled() and not inductor.deterministic
    assert torch.utils.deterministic.fill_uninitialized_memory and not torch.backends.cudnn.deterministic


@pytest.mark.parametrize("kernel", ["cudnn", "default"])
def test_attention_without_deterministic_backward_refused(kernel):
    with pytest.raises(ConfigError, match=f"model.attention={kernel}.*use model.attention=auto"):
        Config(model=ModelConfig(attention=kernel), train=TrainConfig(deterministic=True))
    with pytest.raises(ConfigError, match="train.deterministic"):
        build_config(None, {"model.attention": kernel, "train.deterministic": True})
    for fine in ("auto", "flash", "efficient", "math"):
        Config(model=ModelConfig(attention=fine), train=TrainConfig(deterministic=True))


def test_auto_attention_under_deterministic_is_not_cudnn(tmp_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(make_tiny(tmp_path / "tiny") / "transformer")
    # on a GPU auto would pick the cuDNN op (test_attention); deterministic picks flash instead
    chosen = attention.choose_backend("auto", model, torch.bfloat16, torch.device("cpu"), deterministic=True)
    assert chosen == attention.DETERMINISTIC == "flash" and not attention.in_use(model)


def test_sdpa_switches_are_part_of_the_compile_cache_key(monkeypatch):
    """A compiled block bakes SDPA's kernel in when it is traced, and torch's caches do not key on
    the switches: without the tag a run with other switches loaded the first run's kernels."""
    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    monkeypatch.setenv("TORCH_COMPILER_CACHE_KEY_TAG", "mine")
    try:
        cuda.enable_flash_sdp(True)
        cuda.enable_mem_efficient_sdp(True)
        attention.tag_compile_caches()
        flash = torch.compiler.config.cache_key_tag
        cuda.enable_flash_sdp(False)
        attention.tag_compile_caches()
        efficient = torch.compiler.config.cache_key_tag
    finally:
        cuda.enable_flash_sdp(before[0])
        cuda.enable_mem_efficient_sdp(before[1])
        torch.compiler.config.cache_key_tag = ""
    assert flash != efficient and flash.startswith("mine|") and efficient.startswith("mine|")
    assert flash.endswith("|flux_lora=" + attention.code_fingerprint())


def test_flux_lora_op_code_is_part_of_the_compile_cache_key(tmp_path):
    """A custom op's backward is traced into the cached backward graph but is not in torch's key:
    any change to flux_lora/fast/ must give another key (a warm cache ran an old backward)."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "fast"
    shutil.copytree(Path(attention.__file__).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert attention.code_fingerprint(folder) == attention.code_fingerprint()
    op = folder / "lora_linear.py"
    op.write_text(op.read_text().replace("need_dx", "needs_dx"))
    attention.code_fingerprint.cache_clear()
    assert attention.code_fingerprint(folder) != attention.code_fingerprint()


def test_a_run_under_it_trains_as_without(tiny_model, cache_dir, tmp_path):
    """Strict deterministic mode stops at any op without a deterministic kernel: the whole run
    (steps, previews, checkpoint) has none. On the CPU the kernels are the same: test_train's
    reference run gives its reference losses under train.deterministic too."""
    out = tmp_path / "strict"
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "4", "--batch-size", "2", "--lr", "1e-3",
                        "--sample-every", "4", "--checkpoint-every", "4", "--set", "train.deterministic=true"), check=True)
    assert "deterministic: true" in (out / "config.yaml").read_text()
    losses = [e["loss"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "progress"]
    assert losses == pytest.approx(REFERENCE_LOSSES, rel=1e-4)  # as test_train: recorded on another CPU
    assert any((out / "samples").rglob("*.png")) and (out / "lora.safetensors").is_file()
