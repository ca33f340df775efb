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

from dataclasses import dataclass

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
# model FLOPs utilisation of the measured matmul peak, per (memory mode, fp8 compute, sharding,
# gradient checkpointing), from FLUX.1-dev runs of scripts/bench.py on H100/H200 (bench/results)
MFU = {("fast", True, "ddp", False): 0.74, ("fast", False, "ddp", False): 0.60,
       ("fast", True, "ddp", True): 0.50, ("fast", False, "ddp", True): 0.45,
       ("fp8", False, "ddp", True): 0.30, ("nf4", False, "ddp", True): 0.126,
       ("fast", False, "fsdp", False): 0.46, ("fast", False, "fsdp", True): 0.34}


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


@dataclass(frozen=True)
class Setting:
    memory_mode: str  # fast, fp8, nf4
    sharding: str  # ddp, fsdp
    checkpointing: bool
    fp8_compute: bool  # fast mode's fp8 matmuls (GPUs with fp8 tensor cores)


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
    if setting.memory_mode == "nf4":
        return sizes.weight_bytes - blocks_linear * 2 + int(blocks_linear * 0.5625)
    if setting.memory_mode == "fp8" or setting.fp8_compute:
        return sizes.weight_bytes - blocks_linear
    return sizes.weight_bytes


def peak_bytes(sizes: PlannedSizes, work: Workload, setting: Setting) -> int:
    tokens = work.batch_size * ((2 if work.paired else 1) * work.image_tokens + work.text_tokens)
    weights = weight_bytes(sizes, setting)
    if setting.sharding == "fsdp" and work.ranks > 1:
        return memory.sharded_step_memory_bytes(weights, sizes.lora_params, tokens, sizes.blocks, sizes.hidden,
                                                sizes.largest_block_bytes, work.ranks, setting.checkpointing)
    return memory.step_memory_bytes(weights, sizes.lora_params, tokens, sizes.blocks, sizes.hidden, setting.checkpointing)


def flops_per_sample(sizes: PlannedSizes, image_tokens: float, text_tokens: int, checkpointing: bool,
                     paired: bool = False) -> float:
    """Forward and backward of one sample: each matmul pass costs 2 FLOPs per weight per token
    (the forward, the backward's input gradient, and the recompute under checkpointing: the frozen
    base has no weight gradient), attention 4·T²·d per block forward and twice that backward."""
    tokens = (2 if paired else 1) * image_tokens + text_tokens
    linear = 2 * sizes.params_per_token * tokens
    attention = 4 * tokens**2 * sizes.hidden * sizes.blocks
    forward = linear + attention
    return forward + linear + 2 * attention + (forward if checkpointing else 0)


def predict(sizes: PlannedSizes, work: Workload, setting: Setting, tflops: float | None,
            gpu_bytes: int = 0) -> Prediction:
    samples = work.batch_size * work.grad_accum * work.ranks
    flops = flops_per_sample(sizes, work.mean_image_tokens, work.text_tokens, setting.checkpointing, work.paired)
    mfu = MFU.get((setting.memory_mode, setting.fp8_compute, setting.sharding, setting.checkpointing), 0.4)
    step_s = flops * samples / work.ranks / (tflops * 1e12 * mfu) if tflops else float("nan")
    peak = peak_bytes(sizes, work, setting)
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
    out += [Setting("fp8", "ddp", True, False), Setting("nf4", "ddp", True, False)]
    return out


def table(predictions: list[Prediction], chosen: Setting | None = None) -> str:
    """The plan as a text table for people."""
    head = f"{'memory mode':<22}{'sharding':<10}{'checkpointing':<15}{'GiB/GPU':>9}{'s/step':>9}{'samples/s':>11}{'run':>10}{'GPU-h':>8}  fits"
    lines = [head, "-" * len(head)]
    for p in predictions:
        s = p.setting
        mode = s.memory_mode + (" (fp8 matmuls)" if s.fp8_compute else "")
        fits = {True: "yes", False: "NO", None: "?"}[p.fits]
        run = f"{int(p.run_hours)}:{int(p.run_hours * 60) % 60:02d}" if p.run_hours == p.run_hours else "?"
        mark = "  <- this run" if chosen == s else ""
        lines.append(f"{mode:<22}{s.sharding:<10}{'on' if s.checkpointing else 'off':<15}{p.peak_gib:>9.1f}"
                     f"{p.step_s:>9.3f}{p.samples_per_s:>11.2f}{run:>10}{p.gpu_hours:>8.2f}  {fits}{mark}")
    return "\n".join(lines)
