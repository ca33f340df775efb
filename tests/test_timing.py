"""Running figures of a run (training/timing.py) and their line on the display (outputs/display.py).

    pytest -q tests/test_timing.py
"""

from pathlib import Path


def test_the_rate_says_what_it_counts(monkeypatch):
    """samples_per_s: all the time since the first step (what the ETA needs); training_samples_per_s:
    without the previews and checkpoints the loop excluded; the line shows both when they differ."""
    from flux_lora.outputs.display import progress_line
    from flux_lora.training import timing

    clock = iter([0.0, 10.0, 12.0, 14.0])
    monkeypatch.setattr(timing.time, "time", lambda: next(clock))
    meter = timing.Meter(total=10, start=0, global_batch=4)  # created at t=0
    meter.update(1, 1.0, 1e-4)  # the first step ends at t=10 (compile): rates count from here
    meter.update(2, 1.0, 1e-4)  # t=12
    meter.exclude(1.0)  # a preview took 1 s of the next 2
    ev = meter.update(3, 1.0, 1e-4)  # t=14: 2 steps in 4 s, 3 of them training
    assert ev["samples_per_s"] == 2.0 and abs(ev["training_samples_per_s"] - 8 / 3) < 1e-9
    assert ev["eta_s"] == 14.0  # 7 steps at the overall 0.5 steps/s
    assert "2.00 samples/s (2.67 in training steps)" in progress_line({**ev, "stage": "train"})


def test_a_python_that_compiles_torch_at_every_start_is_named_with_the_fix(tmp_path):
    """PYTHONDONTWRITEBYTECODE with no .pyc beside the module: one line naming the compileall
    command; a .pyc present, or bytecode writing allowed, says nothing."""
    import importlib.util
    import sys

    from flux_lora.models.loading import uncompiled_bytecode_note

    module = tmp_path / "site" / "torch" / "__init__.py"
    module.parent.mkdir(parents=True)
    module.write_text("")
    note = uncompiled_bytecode_note(dont_write=True, module_file=str(module))
    assert note and f"{sys.executable} -m compileall -q -j 0 {tmp_path / 'site'}" in note and "\n" not in note
    assert uncompiled_bytecode_note(dont_write=False, module_file=str(module)) is None
    cached = Path(importlib.util.cache_from_source(str(module)))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"")
    assert uncompiled_bytecode_note(dont_write=True, module_file=str(module)) is None
