"""FSDP2 (--sharding fsdp) on CPU with gloo: the same LoRA as DDP and as one rank, exact resume
after SIGKILL, resume on other numbers of ranks (from either checkpoint format), the auto choice,
and the refused combinations.
    pytest -q tests/test_fsdp.py"""

import copy
import json
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import cli_env, run_cli, torchrun, train_args
from flux_lora.config import Config
from flux_lora.fast import compiled_blocks, memory
from flux_lora.parallel.session import DistInfo
from flux_lora.training import checkpoint
from flux_lora.training import sharding

# global batch 6 = 2 ranks × 3 = 3 ranks × 2 = 1 rank × 6; previews and validation run between steps
COMMON = ["--steps", "8", "--lr", "1e-2", "--checkpoint-every", "3", "--validation-split", "0.25",
          "--sample-every", "3", "--set", "train.keep_checkpoints=5",
          # per-sample and per-step state that must survive sharding, rank counts and resumes
          "--set", "train.caption_dropout=0.3", "--set", "train.ema_decay=0.9",
          "--save-dtype", "fp32"]  # the files are compared to 1e-5: bf16's rounding would be the gap
# auto, on the CPU, with a 1 KiB "GPU": DDP cannot fit, so auto shards
AUTO_SHARDS = ["--sharding", "auto", "--set", "dist.gpu_memory_gib=0.000001"]


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _relative_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    return float(num / sum(b[k].pow(2).sum() for k in b).sqrt())


def _lora(out, name="lora.safetensors"):
    return load_file(out / name)


@pytest.fixture(scope="module")
def sharded_run(tiny_model, cache_dir, tmp_path_factory):
    """2 ranks × batch 3 under FSDP2, chosen by auto."""
    out = tmp_path_factory.mktemp("fsdp") / "out"
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, "--batch-size", "3", *COMMON, *AUTO_SHARDS))
    return SimpleNamespace(out=out, stderr=proc.stderr)


def test_auto_shards_when_ddp_does_not_fit_and_says_why(sharded_run):
    assert "dist.sharding=auto chose fsdp: DDP needs ~" in sharded_run.stderr
    start = _events(sharded_run.out)[0]
    assert start["sharding"] == "fsdp" and start["world_size"] == 2
    # each rank wrote its own shard, and the LoRA file is the plain single file a DDP run writes
    dcp = checkpoint.checkpoint_dir(sharded_run.out, 3) / "dcp"
    assert sorted(p.name for p in dcp.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_fsdp_equals_ddp_and_one_rank(tiny_model, cache_dir, tmp_path, sharded_run):
    """Same global batch, same data and noise per sample: only the order of float sums differs
    (reduce-scatter vs all-reduce vs one rank's batch), ~1e-7 relative after 8 Adam steps at a
    high learning rate; a real difference (a stale or missing gradient) is > 1e-3."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(2, *train_args(tiny_model, cache_dir, ddp, "--batch-size", "3", *COMMON, "--sharding", "ddp"))
    run_cli(*train_args(tiny_model, cache_dir, single, "--batch-size", "6", *COMMON, "--sharding", "fsdp"), check=True)
    sharded = _lora(sharded_run.out)
    assert _relative_gap(sharded, _lora(ddp)) < 1e-5
    assert _relative_gap(sharded, _lora(single)) < 1e-5
    for other in (ddp, single):
        assert _relative_gap(_lora(sharded_run.out, "lora-ema.safetensors"), _lora(other, "lora-ema.safetensors")) < 1e-5
    assert any(v.abs().max() > 0 for k, v in sharded.items() if "lora_B" in k)
    assert _events(ddp)[0]["sharding"] == "ddp"
    losses = [[e["loss"] for e in _events(o) if e["event"] == "progress"] for o in (sharded_run.out, ddp)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # the same file format: keys, dtype and the adapter metadata
    with safe_open(str(sharded_run.out / "lora.safetensors"), "pt") as a, safe_open(str(ddp / "lora.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
        assert {k: a.get_tensor(k).dtype for k in a.keys()} == {k: b.get_tensor(k).dtype for k in b.keys()}
    # previews and validation ran under FSDP2 (every rank in step) and gave DDP's numbers
    validation = [[(e["step"], e["loss"]) for e in _events(o) if e["event"] == "validation"] for o in (sharded_run.out, ddp)]
    assert [s for s, _ in validation[0]] == [0, 3, 6, 8]
    assert [v for _, v in validation[0]] == pytest.approx([v for _, v in validation[1]], rel=1e-5)
    assert (sharded_run.out / "samples" / "step-000006.png").is_file()


@pytest.fixture(scope="module")
def killed_run(tiny_model, cache_dir, tmp_path_factory):
    """The sharded run SIGKILLed after step 5: its step-3 checkpoint is the last one."""
    out = tmp_path_factory.mktemp("killed") / "out"
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, "--batch-size", "3", *COMMON, *AUTO_SHARDS), check=False,
                    env=cli_env(FLUX_LORA_FAULT="kill@5"))
    assert proc.returncode != 0 and not (out / "lora.safetensors").exists()
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3]
    return out


def test_sigkill_then_resume_is_bit_identical(tiny_model, cache_dir, tmp_path, sharded_run, killed_run):
    out = tmp_path / "resumed"
    shutil.copytree(killed_run, out)
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, "--batch-size", "3", *COMMON, *AUTO_SHARDS))
    assert "resuming from" in proc.stderr and "at step 3" in proc.stderr
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        resumed, reference = _lora(out, name), _lora(sharded_run.out, name)
        assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_on_one_and_on_three_ranks(tiny_model, cache_dir, tmp_path, sharded_run, killed_run):
    """The killed 2-rank FSDP2 run resumes from its step-3 checkpoint on 1 rank (whole model) and
    on 3 ranks (resharded, the LoRA replicated), each at global batch 6. The 3-rank run is killed
    after step 6 and its checkpoint resumes on 2 ranks with the LoRA sharded again; the 1-rank
    run's own checkpoint (DDP's format) resumes under FSDP2 on 2 ranks. All end at the
    uninterrupted run's LoRA."""
    one, three = tmp_path / "one", tmp_path / "three"
    shutil.copytree(killed_run, one)
    shutil.copytree(killed_run, three)
    proc = run_cli(*train_args(tiny_model, cache_dir, one, "--batch-size", "6", *COMMON, "--sharding", "fsdp"), check=True)
    assert "at step 3" in proc.stderr and "nothing to shard over" in proc.stderr
    # (with both blocks as one FSDP2 unit: the checkpoint's names do not depend on the grouping)
    proc = torchrun(3, *train_args(tiny_model, cache_dir, three, "--batch-size", "2", *COMMON, "--sharding", "fsdp",
                                   "--set", "dist.fsdp_unit_blocks=2", "--set", "dist.fsdp_lora=replicated"),
                    check=False, env=cli_env(FLUX_LORA_FAULT="kill@7"))
    assert proc.returncode != 0 and "FSDP2 keeps the LoRA whole on every rank" in proc.stderr
    assert [s for s, _ in checkpoint.list_checkpoints(three)][-1] == 6  # written by 3 ranks from whole tensors
    proc = torchrun(2, *train_args(tiny_model, cache_dir, three, "--batch-size", "3", *COMMON, *AUTO_SHARDS))
    assert "at step 6" in proc.stderr and "FSDP2 shards the LoRA" in proc.stderr
    reference = _lora(sharded_run.out)
    assert _relative_gap(_lora(one), reference) < 1e-5
    assert _relative_gap(_lora(three), reference) < 1e-5
    whole = checkpoint.checkpoint_dir(one, 6)
    assert (whole / "lora.safetensors").is_file() and not (whole / "dcp").exists()
    again = tmp_path / "again"
    torchrun(2, *train_args(tiny_model, cache_dir, again, "--batch-size", "3", *COMMON, "--sharding", "fsdp",
                            "--resume-from", whole, "--set", "dist.fsdp_prefetch=2",  # gathers ahead: the same maths
                            "--set", "dist.fsdp_keep_gathered=2"))  # and skips the backward's gathers: the same too
    assert _relative_gap(_lora(again), reference) < 1e-5
    ema = _lora(sharded_run.out, "lora-ema.safetensors")
    for out in (one, three, again):
        assert _relative_gap(_lora(out, "lora-ema.safetensors"), ema) < 1e-5


def test_failing_rank_ends_a_sharded_job_fast(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "fail"
    t0 = time.time()
    proc = torchrun(2, *train_args(tiny_model, cache_dir, out, "--steps", "50", "--sharding", "fsdp"), check=False,
                    env=cli_env(FLUX_LORA_FAULT="raise@3:1"))
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "rank 1: failed: RuntimeError: injected failure at step 3" in proc.stderr


@pytest.mark.parametrize("settings, words", [
    ({"memory_mode": "fp8"}, "memory_mode=fp8 keeps a quantized base"),
    ({"memory_mode": "nf4"}, "memory_mode=nf4 keeps a quantized base"),
    ({"fp8_compute": "on"}, "fp8_compute=on keeps an fp8 copy"),
    ({"cuda_graphs": "on"}, "cuda_graphs=on records fixed addresses"),
])
def test_combinations_fsdp_does_not_take_are_one_line(settings, words):
    from flux_lora.config import TrainConfig
    from flux_lora.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        sharding.check_combination(TrainConfig(**settings), DistInfo(0, 2, 0, torch.device("cpu")))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_auto_choice_from_the_memory_estimate():
    """FLUX.1-dev's sizes: DDP fits an 80 GB card and not a 24 GB one; on 24 GB cards FSDP2 over
    two ranks fits with checkpointing; one rank never shards; a quantized base never shards."""
    sizes = sharding.PlannedSizes(weight_bytes=23_800_000_000, lora_params=65_000_000, blocks=57, hidden=3072,
                              largest_block_bytes=340_000_000)
    tokens = 4096 + 512

    def choose(gib, world=2, mode="fast", ckpt="auto"):
        cfg = Config()
        cfg.dist.gpu_memory_gib, cfg.train.memory_mode, cfg.train.gradient_checkpointing = gib, mode, ckpt
        return sharding.decide(cfg, DistInfo(0, world, 0, torch.device("cpu")), lambda: sizes, tokens, False)

    assert choose(80).mode == "ddp"
    pick = choose(24)
    assert pick.mode == "fsdp" and "DDP needs ~" in pick.why and "still more" not in pick.why
    assert choose(24, world=1).mode == "ddp"
    assert choose(24, mode="fp8").mode == "ddp"
    assert "still more than fits" in choose(8).why
    # the sharded estimate: half the weights and LoRA state, two whole blocks, the same activations
    whole = memory.step_memory_bytes(sizes.weight_bytes, sizes.lora_params, tokens, sizes.blocks, sizes.hidden, True)
    half = memory.sharded_step_memory_bytes(sizes.weight_bytes, sizes.lora_params, tokens, sizes.blocks, sizes.hidden,
                                            sizes.largest_block_bytes, 2, True)
    assert half == whole - (sizes.weight_bytes + 16 * sizes.lora_params) // 2 + 2 * sizes.largest_block_bytes


def test_lora_replicated_while_its_training_state_is_small(tiny_model):
    """dist.fsdp_lora=auto: FLUX.1-dev's rank-16 LoRA (65 M parameters, ~1 GiB of fp32 weights,
    gradients and Adam moments) is replicated on a 141 GB card and sharded on 24 GB ones; no GPU
    size known (the CPU) shards; a set value wins. Only a sharded LoRA refuses the other optimizers."""
    from flux_lora.config import TrainConfig
    from flux_lora.errors import ConfigError
    from flux_lora.models import families
    from flux_lora.training import optim

    assert sharding.replicates_lora("auto", 65_000_000, int(139.8 * 2**30))
    assert not sharding.replicates_lora("auto", 65_000_000, 24 * 2**30)
    assert not sharding.replicates_lora("auto", 1, 0)
    assert sharding.replicates_lora("replicated", 10**12, 0) and not sharding.replicates_lora("sharded", 1, 2**40)
    family, two = families.of_model(str(tiny_model)), DistInfo(0, 2, 0, torch.device("cpu"))
    cfg = Config()
    cfg.model.path, cfg.dist.gpu_memory_gib = str(tiny_model), 24.0  # the tiny LoRA's state: far below 2%
    fsdp = sharding.ShardingChoice("fsdp", "")
    assert not sharding.shards_lora(cfg, two, family, fsdp)
    assert not sharding.shards_lora(cfg, two, family, sharding.ShardingChoice("ddp", ""))
    cfg.dist.fsdp_lora = "sharded"
    assert sharding.shards_lora(cfg, two, family, fsdp)
    with pytest.raises(ConfigError, match="dist.fsdp_lora=replicated"):
        optim.check_choice(TrainConfig(optimizer="prodigy"), torch.device("cpu"), True)
    optim.check_choice(TrainConfig(optimizer="prodigy"), torch.device("cpu"), False)


def test_blocks_kept_gathered_fit_the_memory_left():
    """dist.fsdp_keep_gathered=auto keeps the last blocks whole while the estimate has room: all
    of FLUX.1-dev's on a 141 GB card at 1024 px, none on 24 GB cards without checkpointing, some of
    the small single blocks with it (its 14.4 GiB leave ~4.8 under 80% of the card); a set
    number is taken as it is (at most every block); no GPU size to plan for keeps none."""
    assert memory.blocks_to_keep_gathered(10, [4, 4, 3]) == 2  # 3 then 4 fit, the next 4 does not
    assert memory.blocks_to_keep_gathered(-5, [1]) == 0
    flux1 = [680_000_000] * 19 + [280_000_000] * 38  # bf16 bytes of FLUX.1-dev's double and single blocks
    model = SimpleNamespace(transformer_blocks=[SimpleNamespace(n=n) for n in flux1[:19]],
                            single_transformer_blocks=[SimpleNamespace(n=n) for n in flux1[19:]])
    sizes = (sum(flux1), 18_700_000, 57, 3072)

    def keep(setting, gib, tokens=4096 + 512, ckpt=False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(memory, "model_sizes", lambda m: sizes)
            mp.setattr(memory, "block_bytes", lambda b: b.n)
            return memory.fsdp_blocks_to_keep(model, setting, tokens, 2, int(gib * 2**30), ckpt)

    assert keep(-1, 139.8) == 57
    assert keep(-1, 24) == 0
    assert 0 < keep(-1, 24, ckpt=True) < 38 and 0 < keep(-1, 64) < 57
    assert keep(3, 24) == 3 and keep(100, 24) == 57 and keep(-1, 0) == 0


def test_planned_sizes_match_the_built_model(tiny_model):
    """The plan reads only the config (meta device); its sizes are the loaded model's."""
    from flux_lora.models import families
    from flux_lora.training.lora import add_lora

    family = families.of_model(str(tiny_model))
    cfg = Config()
    planned = sharding.planned_sizes(family, str(tiny_model), "", torch.float32, cfg.lora)
    model = family.load_transformer(str(tiny_model), torch.float32)
    weights = sum(p.numel() * 4 for p in model.parameters())
    n_lora = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, 0.0, 0, family.lora_presets)
    assert (planned.weight_bytes, planned.lora_params) == (weights, n_lora)
    assert planned.blocks == len(model.transformer_blocks) + len(model.single_transformer_blocks)


def test_a_truncated_shard_makes_the_checkpoint_unreadable(tmp_path, sharded_run):
    from flux_lora.errors import CheckpointError

    broken = tmp_path / "checkpoints" / "step-000003"
    shutil.copytree(checkpoint.checkpoint_dir(sharded_run.out, 3), broken)
    assert checkpoint.load_checkpoint(broken)["dcp"].endswith("dcp")
    shard = broken / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="__1_0.distcp has 100 bytes"):
        checkpoint.load_checkpoint(broken)
    assert checkpoint.latest_valid(tmp_path) == (None, [(broken, checkpoint.quick_problem(broken))])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: a single-rank checkpoint
@pytest.mark.parametrize("optimizer", ["schedule-free", "adamw, gradients kept"])
def test_optimizer_state_survives_a_sharded_checkpoint(tmp_path, optimizer):
    """Under FSDP2 the checkpoint is a torch.distributed.checkpoint directory, and torch creates
    the optimizer state it loads into only for an optimizer without state and without gradients.
    Schedule-free's train() leaves an empty state per parameter, and CUDA graphs (on for the
    blocks FSDP2 leaves whole) keep the gradients allocated from the compile on: either made a
    resume restart the optimizer's averages (schedule-free: a 6% different LoRA after 6 steps;
    AdamW on an H200: losses 0.2% apart one step after the resume). The state now comes back whole."""
    import schedulefree

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        if optimizer == "schedule-free":
            opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=2)
            opt.train()
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            compiled_blocks.keep_grads(model)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    model, opt, sched = make()
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save_sharded_checkpoint(tmp_path, 3, model, opt, {"scheduler": sched.state_dict()}, keep=2)
    again, opt_again, sched_again = make()
    checkpoint.resume_into(checkpoint.load_checkpoint(checkpoint.checkpoint_dir(tmp_path, 3)), again, opt_again,
                           sched_again)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    names = {"z", "exp_avg_sq"} if optimizer == "schedule-free" else {"step", "exp_avg", "exp_avg_sq"}
    for p, q in zip(model.parameters(), again.parameters()):
        assert opt.state[p].keys() == opt_again.state[q].keys() == names
        assert all(torch.equal(opt.state[p][k], opt_again.state[q][k]) for k in names)
        assert q.grad is not None or optimizer == "schedule-free"  # still kept for the graphs
    if optimizer == "schedule-free":
        assert opt_again.param_groups[0]["k"] == opt.param_groups[0]["k"] == 3


@pytest.mark.parametrize("replicate", [True, False])
def test_kept_blocks_are_whole_on_every_rank_only_with_the_lora_replicated(replicate):
    """The frozen base never changes: with the LoRA outside FSDP2, a block kept gathered would hold
    the same weights from step to step, so it is not sharded at all (no shard beside it, no FSDP2
    hooks). A sharded LoRA's update lives in the shards: its kept blocks are FSDP2 units, freed by
    the backward. Either way the step's numbers are the plain model's."""
    from torch.distributed.fsdp import FSDPModule

    from flux_lora.parallel import fsdp
    from flux_lora.parallel.session import DistInfo

    torch.manual_seed(0)
    blocks = [torch.nn.Linear(8, 8) for _ in range(3)]
    model = torch.nn.Sequential(*blocks)
    for b in blocks:
        b.weight.requires_grad_(False)  # the frozen base; the biases stand in for the LoRA
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8)
    reference(x).square().sum().backward()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        fsdp.wrap_fsdp(model, blocks, DistInfo(0, 1, 0, torch.device("cpu"), 1), torch.float32, keep_gathered=2,
                       replicate_lora=replicate)
        for _ in range(2):
            model.zero_grad()
            model(x).square().sum().backward()
        if replicate:
            fsdp.sync_replicated_grads(model)
        from torch.distributed.tensor import DTensor

        sharded = [True, False, False] if replicate else [True] * 3
        assert [isinstance(b, FSDPModule) for b in blocks] == sharded
        assert [isinstance(b.weight, DTensor) for b in blocks] == sharded  # whole: plain tensors
        assert not any(b._get_fsdp_state()._fsdp_param_group.is_unsharded for b, s in zip(blocks, sharded) if s)
        assert isinstance(model, FSDPModule)
        for b, ref in zip(blocks, reference):
            grad = b.bias.grad
            torch.testing.assert_close(grad.full_tensor() if hasattr(grad, "full_tensor") else grad, ref.bias.grad)
    finally:
        torch.distributed.destroy_process_group()
