"""Training-quality options against direct computations on the tiny model: caption dropout, the
EMA of the LoRA. (World-size invariance and exact resume with them on: tests/test_fsdp.py.)
    pytest -q tests/test_quality.py"""

import shutil

import pytest
import torch

from conftest import run_cli, train_args
from flux_lora.data import cache
from flux_lora.models import families
from flux_lora.training import conditioning, ema, step


def test_dropped_samples_depend_on_position_not_on_the_rank_split():
    positions = list(range(4000))
    drops = conditioning.dropped(7, 3, positions, 0.25)
    assert 0.22 < sum(drops) / len(drops) < 0.28
    # any rank's slice of the global batch gets the same decisions for its positions
    assert conditioning.dropped(7, 3, positions[1::2], 0.25) == drops[1::2]
    assert conditioning.dropped(7, 4, positions, 0.25) != drops  # a new draw every step
    assert conditioning.dropped(7, 3, positions, 0.0) == [False] * len(positions)


def test_dropped_caption_trains_on_the_empty_prompt(tiny_model, cache_dir):
    """The loss with caption dropout equals the loss of the same batch with the dropped rows
    replaced by the cached empty prompt by hand."""
    manifest = cache.load_manifest(cache_dir)
    data = cache.CachedDataset(cache_dir, manifest)
    family = families.of_model(str(tiny_model))
    empty = cache.load_empty_prompt(cache_dir, list(family.text_keys))
    assert empty is not None and set(empty) == {"t5", "clip"}
    same_bucket = [k for k in range(len(data)) if data.items[k].bucket == data.items[0].bucket][:3]
    batch = data.collate(same_bucket)
    model = family.load_transformer(str(tiny_model), torch.float32)
    positions = list(range(len(same_bucket)))
    seed, at = 0, 0
    while not (0 < sum(conditioning.dropped(seed, at, positions, 0.5)) < len(positions)):
        at += 1  # a step where some, not all, samples are dropped
    drops = conditioning.dropped(seed, at, positions, 0.5)
    inputs = step.StepInputs(seed, 1.0, "uniform", 0.0, 1.0, torch.device("cpu"), torch.float32, family, 0.5, empty)
    by_hand = {**batch, **{k: torch.stack([empty[k] if d else batch[k][i] for i, d in enumerate(drops)]) for k in empty}}
    plain = step.StepInputs(seed, 1.0, "uniform", 0.0, 1.0, torch.device("cpu"), torch.float32, family)
    with torch.no_grad():
        assert step.micro_loss(model, batch, positions, at, inputs) == step.micro_loss(model, by_hand, positions, at, plain)
        assert step.micro_loss(model, batch, positions, at, inputs) != step.micro_loss(model, batch, positions, at, plain)
    assert torch.equal(batch["t5"], data.collate(same_bucket)["t5"])  # the batch itself is not changed


def test_ema_follows_its_recurrence_and_ignores_skipped_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    average = ema.Ema([("w", p)], decay=0.9)
    expected = torch.zeros(3)
    for value, skipped in ((1.0, False), (2.0, False), (5.0, True), (3.0, False)):
        with torch.no_grad():
            p.fill_(value)
        average.update(torch.tensor(skipped))
        if not skipped:
            expected = 0.9 * expected + 0.1 * value
        assert torch.allclose(average.state()["w"], expected)
    with average.applied():
        assert torch.equal(p.detach(), average.state()["w"])
    assert torch.equal(p.detach(), torch.full((3,), 3.0))


def test_caption_dropout_on_a_cache_without_the_empty_prompt_is_one_line(tiny_model, cache_dir, tmp_path):
    old = tmp_path / "cache"
    shutil.copytree(cache_dir, old)
    (old / "empty_prompt.pt").unlink()
    proc = run_cli(*train_args(tiny_model, old, tmp_path / "o", "--steps", "1", "--set", "train.caption_dropout=0.1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "lacks" in lines[0] and "rerun the same preprocess command" in lines[0]


@pytest.mark.parametrize("key", ["train.caption_dropout=1.0", "train.ema_decay=1.0", "train.caption_dropout=-0.1"])
def test_out_of_range_settings_are_refused(key):
    from flux_lora.config import build_config
    from flux_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="out of range"):
        build_config(None, {}, [key])
