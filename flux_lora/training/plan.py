"""`flux_lora plan`: before any GPU work, the predicted per-GPU peak memory, step time, run time
and GPU-hours of a run for each memory mode and sharding choice, from the model's config (built
on the meta device: no weights read) and the cache's buckets; `train` checks its own setting at
start with the same numbers.

Memory is fast.memory's step estimate (checked against measured peaks in tests/test_plan.py).
Time is the step's FLOPs (counted from the config: 2 FLOPs per weight per token for each matmul
pass, attention's 4·T²·d per block) over the GPU's bf16 matmul rate times the model FLOPs
utilisation measured for that setting on H100/H200 (bench/results). It is an estimate for
planning: other GPUs, models and bucket mixes differ.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

from flux_lora.data.cache import all_items
from flux_lora.fast import memory
from flux_lora.training.sharding import PlannedSizes

GIB = 2**30
# dense bf16 tensor-core TFLOP/s by GPU name (datasheets); a run reaches about 77% of it in a plain
# 8192² matmul (bench.py's measured peak: 760 of 989 on H100/H200), the MFU table below is against that
DATASHEET_TFLOPS = {"H200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "GH200": 989, "B200": 2250,
                    "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "RTX 6000 Ada": 364, "RTX A6000": 155,
                    "A6000": 155, "RTX 4090": 165, "RTX 3090": 71, "A10": 125}
MATMUL_FRACTION = 0.77
FP8_GPUS = ("H200", "H100", "GH200", "B200", "L40S", "L4", "RTX 6000 Ada", "RTX 4090", "L40")
# model FLOPs utilisation of the measured bf16 matmul peak, per (memory mode, fp8 matmuls, sharding,
# gradient checkpointing), from scripts/bench.py runs of FLUX.1-dev (width 3072) on H100/H200 in
# bench/results (fp8 mode with fp8 matmuls: FLUX.2 [dev]'s run, scaled to width 3072); fp8 matmuls
# can pass 1 (their peak is twice bf16's). Wider models fill the GPU better: × sqrt(width / 3072)
# fits FLUX.2 [klein] 9B (4096) and [dev] (6144) within 30%.
MFU = {("fast", True, "ddp", False): 0.82, ("fast", False, "ddp", False): 0.60,
       ("fast", True, "ddp", True): 0.50, ("fast", False, "ddp", True): 0.45,
       ("fp8", True, "ddp", True): 0.71, ("fp8", False, "ddp", True): 0.30, ("nf4", False, "ddp", True): 0.235,
       ("fast", False, "fsdp", False): 0.46, ("fast", False, "fsdp", True): 0.34}
FLOP_COUNT_SCALE = 1.04  # the formula counts ~4% less than torch's FlopCounterMode on FLUX.1 and FLUX.2


@dataclass(frozen=True)
class Workload:
    """What a step computes: per sample, its image and text tokens; per step, how many samples."""
    image_tokens: int  # the largest bucket's (memory) ...
    mean_image_tokens: float  # ... and the average item's (time)
    text_tokens: int
    batch_size: int  # per GPU per micro-step
    grad_accum: int
    ranks: int
    steps: int
    paired: bool = False  # an editing model: the control image's tokens too

    def micro_batch_tokens(self) -> int:
        """Tokens of the largest micro-batch (what the step's activations scale with)."""
        return self.batch_size * ((2 if self.paired else 1) * self.image_tokens + self.text_tokens)


@dataclass(frozen=True)
class Setting:
    memory_mode: str  # fast, fp8, nf4
    sharding: str  # ddp, fsdp
    checkpointing: bool
    fp8_compute: bool  # fast mode's fp8 matmuls (GPUs with fp8 tensor cores)
    checkpointed: float = 1.0  # with checkpointing: the share of the blocks that recompute (train.checkpoint_blocks)

    def checkpointed_blocks(self, blocks: int) -> int:
        return round(self.checkpointed * blocks) if self.checkpointing else 0

    def label(self, blocks: int) -> str:
        """off, on, or on for k of the blocks."""
        k = self.checkpointed_blocks(blocks)
        return "off" if not k else "on" if k == blocks else f"on {k}/{blocks}"


@dataclass(frozen=True)
class Prediction:
    setting: Setting
    peak_gib: float
    step_s: float
    samples_per_s: float
    run_hours: float
    gpu_hours: float
    fits: bool | None  # None: no GPU size known


def gpu_tflops(name: str) -> float | None:
    """The measured-matmul bf16 rate of a GPU by its name (torch.cuda.get_device_name), or None."""
    for key in sorted(DATASHEET_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return DATASHEET_TFLOPS[key] * MATMUL_FRACTION
    return None


def has_fp8(name: str) -> bool:
    return any(key.lower() in name.lower() for key in FP8_GPUS)


def weight_bytes(sizes: PlannedSizes, setting: Setting) -> int:
    """The frozen base on one GPU: bf16, with the blocks' Linear weights in fp8 (fp8 compute, fp8
    mode: 1 byte) or NF4 (~0.56 byte with its scales); sharded under FSDP2 by the caller."""
    blocks_linear = sizes.blocks_linear_params
    if setting.memory_mode == "nf4":  # plus, while a block runs, its weights dequantized to bf16 (up to 3 blocks)
        return sizes.weight_bytes - blocks_linear * 2 + int(blocks_linear * 0.5625) + 3 * sizes.largest_block_bytes
    if setting.memory_mode == "fp8" or setting.fp8_compute:
        return sizes.weight_bytes - blocks_linear
    return sizes.weight_bytes


def peak_bytes(sizes: PlannedSizes, work: Workload, setting: Setting, gpu_bytes: int = 0) -> int:
    """The step's peak on one GPU; with the fast mode's fp8 matmuls unchecked on a GPU of
    `gpu_bytes` that has room, train.fp8_transposed=auto's copies too (1 byte per fp8 parameter)."""
    tokens = work.micro_batch_tokens()
    weights = weight_bytes(sizes, setting)
    k = setting.checkpointed_blocks(sizes.blocks)
    if setting.sharding == "fsdp" and work.ranks > 1:
        return memory.sharded_step_memory_bytes(weights, sizes.lora_params, tokens, sizes.blocks, sizes.hidden,
                                                sizes.largest_block_bytes, work.ranks, k)
    step = memory.step_memory_bytes(weights, sizes.lora_params, tokens, sizes.blocks, sizes.hidden, k)
    transposed = sizes.blocks_linear_params
    if setting.memory_mode == "fast" and setting.fp8_compute and not k and step + transposed <= memory.HEADROOM * gpu_bytes:
        step += transposed
    return step


def flops_per_sample(sizes: PlannedSizes, image_tokens: float, text_tokens: int, checkpointing: bool | float,
                     paired: bool = False) -> float:
    """Forward and backward of one sample: each matmul pass costs 2 FLOPs per weight per token
    (the forward, the backward's input gradient, and the recompute under checkpointing: the frozen
    base has no weight gradient), attention 4·T²·d per block forward and twice that backward.
    `checkpointing`: the share of the blocks that recompute (True: all)."""
    tokens = (2 if paired else 1) * image_tokens + text_tokens
    linear = 2 * sizes.params_per_token * tokens
    attention = 4 * tokens**2 * sizes.hidden * sizes.blocks
    forward = linear + attention
    return FLOP_COUNT_SCALE * (forward + linear + 2 * attention + forward * float(checkpointing))


def predict(sizes: PlannedSizes, work: Workload, setting: Setting, tflops: float | None,
            gpu_bytes: int = 0) -> Prediction:
    samples = work.batch_size * work.grad_accum * work.ranks
    share = setting.checkpointed_blocks(sizes.blocks) / sizes.blocks
    flops = flops_per_sample(sizes, work.mean_image_tokens, work.text_tokens, share, work.paired)
    on, off = (MFU.get((setting.memory_mode, setting.fp8_compute, setting.sharding, ckpt), 0.4) for ckpt in (True, False))
    mfu = off + (on - off) * share if setting.memory_mode == "fast" else on  # partial checkpointing: in between
    mfu = min(1.5, mfu * math.sqrt(sizes.hidden / 3072))
    step_s = flops * samples / work.ranks / (tflops * 1e12 * mfu) if tflops else float("nan")
    peak = peak_bytes(sizes, work, setting, gpu_bytes)
    run_h = step_s * work.steps / 3600
    return Prediction(setting, peak / GIB, step_s, samples / step_s if step_s else float("nan"), run_h,
                      run_h * work.ranks, (peak <= memory.HEADROOM * gpu_bytes) if gpu_bytes else None)


def settings_to_compare(ranks: int, fp8_gpu: bool) -> list[Setting]:
    """Every memory mode and sharding a user can pick here, with checkpointing off and on."""
    out = []
    for ckpt in (False, True):
        out.append(Setting("fast", "ddp", ckpt, fp8_gpu))
        if ranks > 1:
            out.append(Setting("fast", "fsdp", ckpt, False))
    out += [Setting("fp8", "ddp", True, fp8_gpu), Setting("nf4", "ddp", True, False)]
    return out


def table(predictions: list[Prediction], chosen: Setting | None = None, blocks: int = 1) -> str:
    """The plan as a text table for people."""
    head = f"{'memory mode':<22}{'sharding':<10}{'checkpointing':<15}{'GiB/GPU':>9}{'s/step':>9}{'samples/s':>11}{'run':>10}{'GPU-h':>8}  fits"
    lines = [head, "-" * len(head)]
    for p in predictions:
        s = p.setting
        mode = s.memory_mode + (" (fp8 matmuls)" if s.fp8_compute else "")
        fits = {True: "yes", False: "NO", None: "?"}[p.fits]
        timed = p.step_s == p.step_s  # not NaN: the GPU's speed is known
        run = f"{int(p.run_hours)}:{int(p.run_hours * 60) % 60:02d}" if timed else "?"
        mark = "  <- this run" if chosen == s else ""
        gib = f"{p.peak_gib:.1f}" if p.peak_gib >= 1 else f"{p.peak_gib:.3f}"
        step, rate, hours = (f"{p.step_s:.3f}", f"{p.samples_per_s:.2f}", f"{p.gpu_hours:.2f}") if timed else ("?",) * 3
        lines.append(f"{mode:<22}{s.sharding:<10}{s.label(blocks):<15}{gib:>9}"
                     f"{step:>9}{rate:>11}{run:>10}{hours:>8}  {fits}{mark}")
    return "\n".join(lines)


def workload_of(manifest: dict | None, cfg, ranks: int, paired: bool) -> Workload:
    """The run's tokens: the cache's buckets (the largest for memory, the items' mean for time),
    or, without a cache, each of data.sizes squared and data.max_sequence_length."""
    t = cfg.train
    if manifest and manifest.get("items"):
        cols = manifest.get("items_columns", ["index", "shard", "position", "width", "height"])
        w, h = cols.index("width"), cols.index("height")
        tokens = [(row[w] // 16) * (row[h] // 16) for row in all_items(manifest)]
        return Workload(max(tokens), sum(tokens) / len(tokens), int(manifest["max_sequence_length"]), t.batch_size,
                        t.grad_accum, ranks, t.steps, paired)
    tokens = [(side // 16) ** 2 for side in cfg.data.sizes]
    return Workload(max(tokens), sum(tokens) / len(tokens), cfg.data.max_sequence_length, t.batch_size, t.grad_accum,
                    ranks, t.steps, paired)


def setting_of(cfg, sharding_mode: str, fp8_gpu: bool, sizes: PlannedSizes, work: Workload, gpu_bytes: int) -> Setting:
    """The setting this run's config resolves to (auto choices decided as train decides them)."""
    t = cfg.train
    fp8 = t.memory_mode == "fp8" and fp8_gpu or (t.memory_mode == "fast" and sharding_mode == "ddp" and (
        t.fp8_compute == "on" or (t.fp8_compute == "auto" and fp8_gpu)))
    if t.checkpoint_blocks:
        return Setting(t.memory_mode, sharding_mode, True, fp8, min(t.checkpoint_blocks, sizes.blocks) / sizes.blocks)
    ckpt = {"on": True, "off": False}.get(t.gradient_checkpointing, t.memory_mode != "fast")
    if t.gradient_checkpointing == "auto" and t.memory_mode == "fast" and gpu_bytes:
        # as memory.use_checkpointing: none if the step fits, else as few blocks as fit, else all
        fitting = (Setting("fast", sharding_mode, k > 0, fp8, k / sizes.blocks if k else 1.0) for k in range(sizes.blocks))
        return next((s for s in fitting if predict(sizes, work, s, None, gpu_bytes).fits),
                    Setting("fast", sharding_mode, True, fp8))
    return Setting(t.memory_mode, sharding_mode, ckpt, fp8)


def check_at_start(cfg, device, sizes_of, work: Workload, sharding_mode: str, fp8_gpu: bool) -> str:
    """train's own check: one warning line when the predicted peak will not fit the GPU ("" when
    it fits, or no GPU size is known)."""
    budget = memory.gpu_bytes(device, cfg.dist.gpu_memory_gib)
    if not budget:
        return ""
    sizes = sizes_of()
    setting = setting_of(cfg, sharding_mode, fp8_gpu, sizes, work, budget)
    p = predict(sizes, work, setting, None, budget)
    if p.fits:
        return ""
    return (f"plan: this run (memory_mode={setting.memory_mode}, {setting.sharding}, checkpointing "
            f"{setting.label(sizes.blocks)}) needs ~{p.peak_gib:.1f} GiB per GPU, the GPU has "
            f"{budget / GIB:.1f} GiB; it may run out of memory: `flux_lora plan` lists the settings that fit")


def report(cfg, gpus: int, gpu_name: str, gpu_memory_gib: float) -> tuple[str, list[Prediction]]:
    """`flux_lora plan`: the text for people and the predictions (for --json)."""
    import torch

    from flux_lora.data import cache
    from flux_lora.models import families
    from flux_lora.training.sharding import decide, planned_sizes

    family = families.of_model(cfg.model.path, cfg.model.revision)
    manifest = cache.load_manifest(cfg.data.cache_dir) if cfg.data.cache_dir else None
    work = workload_of(manifest, cfg, gpus, family.paired)
    sizes = planned_sizes(family, cfg.model.path, cfg.model.revision, torch.bfloat16, cfg.lora)
    tflops, budget = gpu_tflops(gpu_name), int(gpu_memory_gib * GIB)
    fp8_gpu = has_fp8(gpu_name)
    predictions = [predict(sizes, work, s, tflops, budget) for s in settings_to_compare(gpus, fp8_gpu)]
    # sharding=auto decided as train decides it, on these GPUs
    planned = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, gpu_memory_gib=gpu_memory_gib))
    mode = decide(planned, SimpleNamespace(world_size=gpus, device=torch.device("cpu")), lambda: sizes, work.micro_batch_tokens(),
                  fp8_gpu and cfg.train.fp8_compute != "off").mode
    chosen = setting_of(cfg, mode, fp8_gpu, sizes, work, budget)
    if chosen not in [p.setting for p in predictions]:
        predictions.append(predict(sizes, work, chosen, tflops, budget))
    sides = ",".join(map(str, cfg.data.sizes))
    source = f"the cache's {len(all_items(manifest))} items" if manifest else f"{sides} px (no cache given)"
    lines = [f"{family.title}: {sizes.weight_bytes / GIB:.1f} GiB of bf16 weights, LoRA rank {cfg.lora.rank} "
             f"({sizes.lora_params / 1e6:.1f} M parameters)",
             f"{gpus} GPU(s) × batch {work.batch_size} × grad accum {work.grad_accum}; {work.steps} steps; tokens per "
             f"sample: {work.image_tokens} image (largest), {work.text_tokens} text; from {source}",
             f"GPU: {gpu_name or 'unknown (pass --gpu, e.g. H100)'}"
             + (f", {gpu_memory_gib:.0f} GiB" if budget else ", memory unknown (pass --gpu-memory-gib)"), "",
             table(predictions, chosen, sizes.blocks), ""]
    mine = next(p for p in predictions if p.setting == chosen)
    if mine.fits is False:
        fitting = [p for p in predictions if p.fits]
        best = max(fitting, key=lambda p: p.samples_per_s if p.samples_per_s == p.samples_per_s else 0, default=None)
        lines.append(f"this run will NOT fit: ~{mine.peak_gib:.1f} GiB per GPU" + (
            f"; fastest that fits: memory_mode={best.setting.memory_mode}, sharding={best.setting.sharding}, "
            f"gradient_checkpointing={'on' if best.setting.checkpointing else 'off'}" if best else
            "; nothing here fits: more GPUs, a smaller batch or lower resolution"))
    lines.append("predictions: memory within ~7% and time within ~5% of the H100/H200 runs in bench/results for "
                 "FLUX.1 (up to ~30% for FLUX.2 [dev] sharded); other GPUs and data differ")
    return "\n".join(lines), predictions
