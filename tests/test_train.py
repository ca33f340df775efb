"""Train stage on the tiny model: reference losses, world-size invariance, outputs, and refusing
caches that do not fit (learning itself: test_learn_check.py; a LoRA changing generation:
test_watch.py's sample test and test_families_train.py).   pytest -q tests/test_train.py"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, torchrun, train_args

# First losses of a fixed-seed run (seed 0, batch 2, rank 4, lr 1e-3) on the session cache,
# recorded with torch 2.13 CPU. A change here means the objective, the data order or the
# noise changed: check that it was meant, then re-record.
REFERENCE_LOSSES = [1.7865817546844482, 1.551861047744751, 1.698555588722229, 1.5309407711029053]


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _losses(out):
    return [e["loss"] for e in _events(out) if e["event"] == "progress"]


def test_reference_losses_and_outputs(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "run"
    run_cli(*train_args(tiny_model, cache_dir, out, "--steps", "4", "--batch-size", "2", "--lr", "1e-3"), check=True)
    losses = _losses(out)
    assert losses == pytest.approx(REFERENCE_LOSSES, rel=1e-4), losses
    assert (out / "lora.safetensors").is_file() and (out / "config.yaml").is_file() and (out / "loss.png").is_file()
    mode = (out / "config.yaml").stat().st_mode & 0o777  # every output keeps the user's permissions
    assert all(p.stat().st_mode & 0o777 == mode for p in out.rglob("*") if p.is_file() and p.name != ".flux_lora.lock")
    events = _events(out)
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    done = events[-1]
    assert 0 < done["setup_s"] <= done["time_to_first_step_s"] <= done["elapsed_s"]
    gcs = done["gc_full_collections"]
    assert gcs["count"] >= 1 and gcs["max_s"] <= done["elapsed_s"]  # at least the freeze's own collection
    assert 0 <= gcs["after_warmup"]["count"] < gcs["count"], "the freeze's collection belongs to the warm-up"
    assert events[0]["cpu_threads"] >= 1
    # imports and process-group set-up come before setup: seconds, not minutes (Linux /proc, ±1 s)
    assert done["time_to_first_step_s"] - 1 <= done["first_step_since_process_start_s"] < done["time_to_first_step_s"] + 120
    before = done["before_setup_s"]  # where those seconds went, and that they add up
    assert set(before) == {"imports", "process_group", "resume_check"} and min(before.values()) >= 0
    assert sum(before.values()) == pytest.approx(done["first_step_since_process_start_s"] - done["time_to_first_step_s"], abs=0.1)
    phases = done["setup_phases_s"]  # set-up's own account, in order, within setup_s
    assert list(phases)[:3] == ["data", "plan", "model_load"] and "lora" in phases and list(phases)[-1] == "previews"
    assert min(phases.values()) >= 0 and sum(phases.values()) <= done["setup_s"] + 0.01
    assert done["compile"] == {}  # nothing compiles on the CPU by default (on CUDA: torch's compile timers)
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    for key in ("step", "total_steps", "progress", "loss", "avg_loss", "learning_rate", "samples_per_s",
                "eta_s", "elapsed_s", "time"):
        assert key in progress[-1]
    assert progress[-1]["avg_loss"] == pytest.approx(sum(losses) / 4)
    keys = load_file(out / "lora.safetensors").keys()
    assert all(k.startswith("transformer.") and ("lora_A" in k or "lora_B" in k) for k in keys)
    assert not any("base_model" in k for k in keys)


def _lora(out):
    return load_file(out / "lora.safetensors")


def _validation(out):
    return [(e["step"], e["loss"]) for e in _events(out) if e["event"] == "validation"]


def test_world_size_invariance(tiny_model, cache_dir, tmp_path):
    common = ["--steps", "6", "--lr", "1e-2", "--checkpoint-every", "3", "--validation-split", "0.25"]
    a, b, c = tmp_path / "1x2", tmp_path / "2x1", tmp_path / "1x1x2"
    run_cli(*train_args(tiny_model, cache_dir, a, "--batch-size", "2", *common), check=True)
    torchrun(2, *train_args(tiny_model, cache_dir, b, "--batch-size", "1", *common))
    run_cli(*train_args(tiny_model, cache_dir, c, "--batch-size", "1", "--grad-accum", "2", *common), check=True)
    la, lb, lc = _lora(a), _lora(b), _lora(c)
    assert la.keys() == lb.keys() == lc.keys()
    for other in (lb, lc):
        num = sum((la[k] - other[k]).pow(2).sum() for k in la).sqrt()
        den = sum(la[k].pow(2).sum() for k in la).sqrt()
        assert num / den < 1e-5, float(num / den)
    # the LoRA moved away from its initialisation (B starts at zero)
    assert any(v.abs().max() > 0 for k, v in la.items() if "lora_B" in k)
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)
    # validation: the same items at fixed t and noise; at step 0 the very same number on 1 or 2 ranks,
    # later as close as the weights themselves (DDP's sums round differently, ~1e-8)
    va, vb, vc = _validation(a), _validation(b), _validation(c)
    assert [s for s, _ in va] == [s for s, _ in vb] == [s for s, _ in vc] == [0, 3, 6]
    assert va[0] == vb[0] == vc[0]
    assert [v for _, v in vb] == pytest.approx([v for _, v in va], rel=1e-6)
    assert _events(a)[0]["dataset_size"] == 6 and _events(a)[0]["validation_items"] == 2


def test_cache_for_another_model_refused(other_tiny_model, cache_dir, tmp_path):
    proc = run_cli(*train_args(other_tiny_model, cache_dir, tmp_path / "o", "--steps", "1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "was built for model" in lines[0] and "rerun preprocess" in lines[0]


def test_corrupt_and_missing_shards_refused(tiny_model, cache_dir, tmp_path):
    broken = tmp_path / "cache"
    shutil.copytree(cache_dir, broken)
    shard = next((broken / "shards").glob("*.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli(*train_args(tiny_model, broken, tmp_path / "o", "--steps", "1"))
    assert proc.returncode == 2 and "sha256" in proc.stderr and "rerun preprocess" in proc.stderr
    shard.unlink()
    proc = run_cli(*train_args(tiny_model, broken, tmp_path / "o", "--steps", "1"))
    assert proc.returncode == 2 and "missing" in proc.stderr
    proc = run_cli(*train_args(tiny_model, tmp_path / "nothing", tmp_path / "o", "--steps", "1"))
    assert proc.returncode == 2 and "run `flux_lora preprocess" in proc.stderr


@pytest.mark.parametrize("fused", [True, False])
def test_update_skips_non_finite_steps_on_either_path(fused):
    """update() skips a NaN step without touching the weights or Adam's state: from a device flag
    with fused AdamW (no host sync), after reading the votes otherwise; the result reads the same."""
    from flux_lora.training import step as training_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert training_step.skips_on_device(opt) is fused

    def step(poison: bool):
        loss = model(torch.randn(2, 4)).square().mean()
        loss.backward()
        if poison:
            loss = loss * float("nan")
        return training_step.update(model, opt, sched, loss.detach(), False, 1.0, torch.device("cpu"), 1).result()

    res = step(False)
    assert not res.skipped and res.loss > 0
    before = [p.detach().clone() for p in model.parameters()]
    steps = [opt.state[p]["step"].item() for p in model.parameters()]
    res = step(True)
    assert res.skipped and res.loss != res.loss  # nan
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert [opt.state[p]["step"].item() for p in model.parameters()] == steps
    assert not step(False).skipped
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_update_makes_no_tensor_from_host_data():
    """The update queues only device work: a tensor made from host data on a GPU
    (torch.tensor(x, device=...)) is a copy that first waits for the whole backward to finish,
    leaving the GPU idle while the host queues the update (measured: ~6% of an H200 step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flux_lora.training import step as training_step

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # skips on the device: no vote read
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = model(torch.randn(2, 4)).square().mean()
    loss.backward()
    with Ops() as ops:
        pending = training_step.update(model, opt, sched, loss.detach(), True, 1.0, torch.device("cpu"), 1)
    assert "_fused_adamw_.default" in ops.names  # the mode saw the update's ops
    assert not [n for n in ops.names if n.startswith(("lift_fresh", "_local_scalar_dense"))], ops.names
    assert pending.result().stop


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_on_a_gpu_never_waits_for_it(tiny_model, cache_dir):
    """A whole step on a GPU (caption dropout and per-dataset loss weights included) runs under
    CUDA's sync check: nothing in it waits for the GPU, so the host stays ahead of it."""
    from flux_lora.data import cache
    from flux_lora.models import families
    from flux_lora.training import batches as training_batches
    from flux_lora.training import step as training_step

    device = torch.device("cuda")
    manifest = cache.load_manifest(cache_dir)
    data = cache.CachedDataset(cache_dir, manifest)
    family = families.of_model(str(tiny_model))
    empty = cache.load_empty_prompt(cache_dir, list(family.text_keys))
    same_bucket = [k for k in range(len(data)) if data.items[k].bucket == data.items[0].bucket][:2]
    batch = training_batches.pinned({**data.collate(same_bucket), "dataset": torch.tensor([0, 1])})
    model = family.load_transformer(str(tiny_model), torch.float32)
    training_step.lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    model.to(device)
    opt = torch.optim.AdamW([p for _, p in training_step.lora.lora_parameters(model)], lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    inputs = training_step.StepInputs(0, 1.0, "uniform", 0.0, 1.0, device, torch.float32, family, 0.99, empty,
                                      dataset_weights=(1.0, 0.5))  # the empty prompt on the host, as train has it
    training_step.micro_loss(model, batch, [0, 1], 0, inputs).backward()  # warm-up: first-call set-up may sync
    training_step.update(model, opt, sched, torch.zeros((), device=device), False, 1.0, device, 1).result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = training_step.micro_loss(model, batch, [0, 1], 1, inputs)
        loss.backward()
        pending = training_step.update(model, opt, sched, loss.detach(), False, 1.0, device, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not pending.result().skipped


def test_gc_pauses_times_full_collections_only():
    import gc

    from flux_lora.fast.gc_freeze import GcPauses

    with GcPauses() as pauses:
        gc.collect(0)
        gc.collect(2)
        pauses.steady()
        gc.collect(2)
        pauses.steady()  # only the first mark counts
    gc.collect(2)  # after the block: not counted
    summary = pauses.summary()
    assert summary["count"] == 2 and 0 <= summary["max_s"] <= summary["total_s"]
    assert summary["after_warmup"]["count"] == 1
    assert pauses._callback not in gc.callbacks


def test_gc_frozen_at_start_and_after_warmup_and_unfrozen_after():
    import gc

    from flux_lora.fast import gc_freeze

    assert gc.get_freeze_count() == 0
    with gc_freeze.frozen_gc_after_warmup(True, first_step=10) as after_step:
        # start-up's objects frozen at once: the warm-up's (compile's) full collections skip them
        at_start = gc.get_freeze_count()
        assert at_start > 0
        made_in_warmup = [[i] for i in range(1000)]
        assert [after_step(s) for s in (11, 12)] == [False, False] and gc.get_freeze_count() == at_start
        assert after_step(10 + gc_freeze.WARMUP_STEPS) and gc.get_freeze_count() >= at_start + len(made_in_warmup)
    assert gc.get_freeze_count() == 0, "a later run in this process must be able to free this one"
    with gc_freeze.frozen_gc_after_warmup(False, first_step=0) as after_step:
        assert after_step(100) and gc.get_freeze_count() == 0  # off: never frozen
