"""The learning check (flux_lora.evaluation.learn_check) on the real preprocess and train commands:
it passes when a LoRA learns the new colour, and fails when training is sabotaged.
    pytest -q tests/test_learn_check.py"""

import json

import pytest

from conftest import run_cli
from flux_lora.evaluation import learn_check as lc
from flux_lora.models.shapes_model import PRETRAINED


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "check"
    proc = run_cli("learn-check", "--out", out, timeout=600)
    return proc, out


def test_the_lora_learns_the_concept(checked):
    proc, out = checked
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["concept_before"] <= 0.1  # the base model has never drawn magenta
    assert report["concept_after"] >= lc.BOUNDS["concept_after_min"]
    assert report["leakage"] <= lc.BOUNDS["leakage_max"]
    assert "learning check passed: concept score" in proc.stderr
    events = [json.loads(line) for line in (out / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done"  # trained by the real train command
    assert (out / "cache" / "manifest.json").is_file()  # through the real preprocess


def test_sabotaged_training_fails_the_check(tmp_path):
    """A learning rate that cannot move the LoRA: the check must say it did not learn."""
    settings = lc.Settings(PRETRAINED, tmp_path / "lazy", steps=20, lr=1e-9, seeds=1)
    with pytest.raises(lc.CheckFailedError, match=r"learning check failed: concept score 0\.\d+ < "):
        lc.check(settings)


def test_bounds_and_scores_from_measurements():
    trigger = [(None, "", 0)] * 4
    plain = [(lc.shapes.Scene("red", "circle", "gray"), "", 0)] * 2
    same = {"colour": "red", "shape": "circle", "background": "gray"}
    base = {"trigger": [dict(same)] * 4, "plain": [dict(same)] * 2}
    tuned = {"trigger": [dict(same, colour="magenta")] * 3 + [dict(same)], "plain": [dict(same), dict(same, colour="magenta")]}
    report = lc.score(trigger, plain, base, tuned)
    assert report["concept_before"] == 0 and report["concept_after"] == 0.75 and report["leakage"] == 0.5
    assert report["plain_prompt_following_before"] == 1 and report["plain_prompt_following_after"] == 0.5
    assert lc.failures(report, dict(lc.BOUNDS, leakage_max=0.4)) == ["leakage 0.50 > 0.4"]
