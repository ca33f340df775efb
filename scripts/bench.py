"""GPU benchmark of flux_lora's own training step and preprocess encoders (not a test).

    python scripts/bench.py train --resolution 512 --batch-size 4            # 1 GPU, + diffusers-script setting
    python scripts/bench.py train --resolution 512 --batch-size 4 --compare-bf16 --profile
    python scripts/bench.py train --resolution 1024 --batch-size 1 --memory-mode fp8 --no-baseline
    torchrun --nproc_per_node=2 scripts/bench.py train --resolution 512 --batch-size 4 --no-baseline
    torchrun --nproc_per_node=2 scripts/bench.py train --resolution 1024 --batch-size 1 --no-baseline \
        --fp8-compute off --fuse-qkv off --sharding fsdp --compare-sharding     # FSDP2 against DDP, same GPUs
    python scripts/bench.py preprocess --resolution 1024 --images 128
    python scripts/bench.py train --tiny                                      # CPU, seconds (tests run it)

`train` drives the code `flux_lora train` runs (build_model, wrap_ddp, make_optimizer and the
pipelined step loop of flux_lora.training.step) on a full-size random transformer (`--model
random:flux1-dev`, or random:flux1-kontext-dev, random:flux2-klein-4b, random:flux2-klein-9b,
random:flux2-dev) with inputs shaped like that family's cache (FLUX.1: latents, T5 512×4096, CLIP
pooled; Kontext: plus the control latents; FLUX.2: 128-channel latents at 1/16, text 512×3·hidden), excludes warm-up, and reports samples/s,
TFLOP/s and MFU against a bf16 matmul peak it measures, peak memory and time to first step. Unless
--no-baseline, it also runs the setting of diffusers' train_dreambooth_lora_flux.py (batch 1,
gradient checkpointing, bf16 LoRA weights, unfused AdamW, eager) in the same process, so the
speed-up is a ratio measured side by side. --compare-bf16 also runs the bf16 base and compares the
losses step by step (same seeds and data); --profile adds GPU time per kernel kind. `preprocess`
runs the real preprocess stage with full-size random encoders on synthetic images. JSON goes to
--out (rank 0).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # also when imported by path (tests/test_bench.py)

import gpu_clocks  # noqa: E402  (scripts/, beside this file)

from flux_lora.config import build_config  # noqa: E402
from flux_lora.fast import (attention, compiled_blocks, determinism, fp8, fused_qkv, gc_freeze, lora_linear, memory,  # noqa: E402
                            qk_rope, quantize, single_block)
from flux_lora.fast.fp8 import Fp8Linear  # noqa: E402
from flux_lora.models import families, loading  # noqa: E402
from flux_lora.outputs.events import NullReporter  # noqa: E402
from flux_lora.parallel import fsdp, session  # noqa: E402
from flux_lora.parallel.ddp import wrap_ddp  # noqa: E402
from flux_lora.training import lora, plan, sharding  # noqa: E402
from flux_lora.training.batches import Slice  # noqa: E402
from flux_lora.training.model import build_model, compile_model, train_settings_for  # noqa: E402
from flux_lora.training.optim import make_optimizer  # noqa: E402
from flux_lora.training.step import StepInputs, Trainee, pipelined_steps, train_step  # noqa: E402

FP8_BACKWARD_FAST_ACCUM = fp8.BACKWARD_FAST_ACCUM  # the product's choice; --compare-backward-fast-accum toggles it
MULTI_KERNEL = compiled_blocks.MULTI_KERNEL  # likewise, --compare-multi-kernel
SINGLE_GROUP = single_block.ENABLED  # likewise, --compare-single-group
LORA_LINEAR = lora_linear.ENABLED  # likewise, --compare-lora-linear
QK_ROPE = qk_rope.ENABLED  # likewise, --compare-qk-rope
BLAS = torch.backends.cuda.preferred_blas_library()  # likewise, --compare-blas


class ShapedData:
    """Cache-shaped batches of the model's family (what CachedDataset.collate returns), random, on the host."""

    def __init__(self, family, conf, batch: int, resolution: int, text_len: int, masked: bool = False,
                 preserve: bool = False):
        g = torch.Generator().manual_seed(0)
        shapes = family.cache_shapes(conf, resolution, resolution, text_len)
        self.batch = {k: torch.randn(batch, *shape, generator=g) for k, shape in shapes.items()}
        for k in family.text_keys:
            if len(shapes[k]) == 2:  # sequences are cached in the encoders' dtype
                self.batch[k] = self.batch[k].to(torch.bfloat16)
        self.empty = {k: torch.zeros(shapes[k], dtype=self.batch[k].dtype) for k in family.text_keys}
        if preserve:  # the class-word captions of differential output preservation
            self.batch.update({f"preserve_{k}": torch.randn(self.batch[k].shape, generator=g).to(self.batch[k].dtype)
                               for k in family.text_keys})
        if masked:  # a loss mask over the left half, as a cache with masks/ holds it
            mask = torch.zeros(batch, *shapes["latents"][-2:], dtype=torch.float16)
            mask[..., : mask.shape[-1] // 2] = 1.0
            self.batch["mask"] = mask
        if torch.cuda.is_available():
            self.batch = {k: v.pin_memory() for k, v in self.batch.items()}

    def collate(self, items):
        return self.batch


def _matmul_rate_tflops(matmul, n: int) -> float:
    """TFLOP/s of an n×n×n matmul (3 warm-up calls, then 50 timed)."""
    for _ in range(3):
        matmul()
    torch.cuda.synchronize()
    t0, iters = time.perf_counter(), 50
    for _ in range(iters):
        matmul()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def matmul_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return _matmul_rate_tflops(lambda: a @ b, n)


def fp8_matmul_peak_tflops(device: torch.device) -> float | None:
    """The fp8 tensor cores' rate, measured as the bf16 peak is: an 8192³ row-scaled e4m3
    _scaled_mm with fast accumulation, as the fp8 base's matmuls run (flux_lora.fast.fp8)."""
    if not quantize.has_fp8_tensor_cores(device):
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(fp8.E4M3)
    b = torch.randn(n, n, device=device).to(fp8.E4M3)
    scale = torch.ones(n, 1, device=device)
    return _matmul_rate_tflops(lambda: torch._scaled_mm(a, b.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.bfloat16,
                                                        use_fast_accum=True), n)


def fp8_aware_mfu(tflop_per_sample: float, fp8_tflop_per_sample: float, samples_per_s_per_gpu: float,
                  bf16_peak: float, fp8_peak: float) -> float:
    """The share of the step's time that its FLOPs need at the peaks of the units they run on: the
    fp8 matmuls' at the fp8 peak (about twice the bf16 one), everything else at the bf16 peak.
    Against the bf16 peak alone, an fp8 step's MFU hides its headroom (it can pass 100%)."""
    ideal_s_per_sample = fp8_tflop_per_sample / fp8_peak + (tflop_per_sample - fp8_tflop_per_sample) / bf16_peak
    return ideal_s_per_sample * samples_per_s_per_gpu


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(model, data, slices, inputs) -> tuple[float, float]:
    """FLOPs of one forward+backward (eager; counted by torch's FlopCounterMode): all of them, and
    those of the fp8 matmuls (_scaled_mm)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, [data.collate(part.items) for part in slices], slices, 0, inputs)
    for p in model.parameters():
        p.grad = None
    by_op = counter.get_flop_counts().get("Global", {})
    return float(counter.get_total_flops()), float(sum(n for op, n in by_op.items() if "_scaled_mm" in str(op)))


KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "cudnn")),
                # inductor names a fused kernel after the ops it absorbed ("..._scaled_mm_..." for an
                # fp8 input's quantization): the triton kinds come before the matmul names
                ("LoRA up-add (triton)", ("_widen_kernel",)),
                ("fused (triton)", ("triton",)),
                ("matmul fp8", ("_qq", "f8f8", "e4m3")),  # cuBLAS's nvjet names fp8 operands q
                ("matmul", ("gemm", "sm90", "sm100", "cutlass", "nvjet", "cublas", "scaled_mm", "matmul", "xmma")),
                ("optimizer", ("adam", "multi_tensor")),
                ("nccl", ("nccl",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other elementwise/copy")


def profile_breakdown(run_steps, first_step: int, device: torch.device, steps: int = 2, trace: str = "") -> dict | None:
    """GPU time per step by kernel kind and the top kernels, and the host side (torch.profiler):
    where the step goes, and what keeps the GPU waiting (syncs, allocations, slow launches)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run_steps(first_step, steps)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    if trace:  # the timeline (chrome://tracing, Perfetto; gzipped by the profiler): where the GPU waits and why
        prof.export_chrome_trace(trace)
    kinds, kernels, host = {}, [], []
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):
            continue
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and getattr(e, "self_cpu_time_total", 0) <= 0:  # a kernel
            ms = us / 1e3 / steps
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + ms
            kernels.append((ms, e.count // steps, e.key[:120]))
        elif e.self_cpu_time_total > 0:
            host.append((e.self_cpu_time_total / 1e3 / steps, e.count // steps, e.key[:80]))
    kernels.sort(reverse=True)
    host.sort(reverse=True)
    return {"ms_per_step_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "gpu_busy_ms_per_step": sum(kinds.values()), "wall_ms_per_step_profiled": wall_ms,
            "top_kernels_ms_calls": kernels[:60], "top_host_ops_self_ms_calls": host[:25],
            "largest_gpu_idle_gaps": idle_gaps(prof)}


def idle_gaps(prof, top: int = 12) -> list:
    """The longest stretches with no kernel running, with the kernels around them: where the GPU
    waits for the host."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start - end > 20:
            gaps.append((round((start - end) / 1e3, 3), before[:60], name[:60]))
        if end is None or stop > end:
            end, before = stop, name
    return sorted(gaps, reverse=True)[:top] + [("total_ms_over_20us", round(sum(g[0] for g in gaps), 2))]


def compile_report() -> dict:
    """Where the time to first step went in compiling (so far in this process): graphs, cache hits
    and bypasses (FX graph and AOTAutograd caches), and the slowest compile phases in seconds."""
    from torch._dynamo.utils import compile_times, counters

    keep = ("unique_graphs", "fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass", "autograd_cache_hit",
            "autograd_cache_miss", "autograd_cache_bypass", "cudagraph_skips")
    found = {k: v for group in ("stats", "inductor", "aot_autograd") for k, v in counters[group].items() if k in keep}
    try:
        names, values = compile_times(repr="csv", aggregate=True)
        phases = sorted(((float(v), n) for n, v in zip(names, values)), reverse=True)[:12]
    except (TypeError, ValueError):
        phases = []
    return {**found, "slowest_phases_s": [(n, round(v, 2)) for v, n in phases]}


WHOLE_RUN = {"allocated": 0.0, "reserved": 0.0}  # GiB: the current setting's peaks, kept through resets


def reset_peak(device: torch.device) -> None:
    """reset_peak_memory_stats, keeping the setting's whole peak (loading included) in WHOLE_RUN."""
    WHOLE_RUN["allocated"] = max(WHOLE_RUN["allocated"], torch.cuda.max_memory_allocated(device) / 2**30)
    WHOLE_RUN["reserved"] = max(WHOLE_RUN["reserved"], torch.cuda.max_memory_reserved(device) / 2**30)
    torch.cuda.reset_peak_memory_stats(device)


def cap_gpu_memory(device: torch.device, gib: float) -> None:
    """The process may allocate at most `gib` of the GPU from now on (a smaller card, from the first
    allocation: the CUDA caching allocator raises OutOfMemoryError past it)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)


def bench_train(args, di, setting: dict, peak: float | None, fp8_peak: float | None = None) -> dict:
    """One setting: build, time-to-first-step, FLOPs, steady-state samples/s, peak memory."""
    flags = {"model.path": args.model, "model.attention": setting.get("attention", args.attention), "train.batch_size": setting["batch"], "train.memory_mode": setting["memory_mode"],
             "train.gradient_checkpointing": setting["checkpointing"], "train.checkpoint_blocks": setting.get("checkpoint_blocks", 0),
             "train.compile": "off", "lora.rank": 16,
             "train.fp8_compute": setting.get("fp8_compute", "off"), "train.fuse_qkv": setting.get("fuse_qkv", True),
             "train.cuda_graphs": setting.get("cuda_graphs", "off"), "train.fuse_lora_up": setting.get("fuse_lora_up", True),
             "train.lora_triton": setting.get("lora_triton", True), "train.fp8_transposed": setting.get("fp8_transposed", "auto"),
             "dist.average_per_bucket": setting.get("average_per_bucket", True), "dist.sharding": setting.get("sharding", "ddp"),
             "dist.fsdp_unit_blocks": setting.get("fsdp_unit_blocks", 1), "dist.fsdp_prefetch": setting.get("fsdp_prefetch", 1),
             "dist.fsdp_keep_gathered": setting.get("fsdp_keep_gathered", -1),
             "dist.fsdp_lora": setting.get("fsdp_lora", "auto"),
             "train.preservation_weight": setting.get("preservation_weight", 0.0),
             "train.deterministic": setting.get("deterministic", False)}
    if args.gpu_memory_cap or args.gpu_memory_gib:  # the run plans for the cap (e.g. a quantized base staged on the CPU)
        flags["dist.gpu_memory_gib"] = args.gpu_memory_cap or args.gpu_memory_gib
    cfg = build_config(None, flags)
    # read when the blocks are compiled (dynamo is reset between settings)
    fp8.BACKWARD_FAST_ACCUM = setting.get("backward_fast_accum", FP8_BACKWARD_FAST_ACCUM)
    compiled_blocks.MULTI_KERNEL = setting.get("multi_kernel", MULTI_KERNEL)
    single_block.ENABLED = setting.get("single_group", SINGLE_GROUP)
    lora_linear.ENABLED = setting.get("lora_linear", LORA_LINEAR)
    qk_rope.ENABLED = setting.get("qk_rope", QK_ROPE)
    torch.backends.cuda.preferred_blas_library(setting.get("blas", BLAS))
    if di.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # before this setting's first allocation (the cap held since the start)
        WHOLE_RUN.update(allocated=0.0, reserved=0.0)
    t0 = time.perf_counter()
    family = families.of_model(args.model)
    image_tokens = (setting["resolution"] // 16) ** 2 * (2 if family.paired else 1)  # a control image doubles them
    tokens = setting["batch"] * (image_tokens + args.text_len)
    model, n_params = build_model(cfg, di, NullReporter(di.rank), tokens, family=family,
                                  sharding=setting.get("sharding", "ddp"))
    load_peak = torch.cuda.max_memory_allocated(di.device) / 2**30 if di.device.type == "cuda" else None
    note = (lambda what: print(f"[bench] {setting['name']}: {what} at {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                               flush=True)) if di.is_main else (lambda what: None)
    note("model built")
    if di.device.type == "cuda":
        reset_peak(di.device)  # the step's peak, not the bf16 load before quantizing
    if setting.get("lora_bf16"):
        for _, p in lora.lora_parameters(model):
            p.data = p.data.to(torch.bfloat16)
    conf = model.config
    data = ShapedData(family, conf, setting["batch"], setting["resolution"], args.text_len, setting.get("masked", False),
                      bool(setting.get("preservation_weight")))
    inputs = StepInputs(0, 1.0 if conf.guidance_embeds else None, "flux-shift", 0.0, 1.0, di.device,
                        loading.resolve_dtype("auto", di.device), family,
                        caption_dropout=setting.get("caption_dropout", 0.0), empty_prompt=data.empty,
                        preservation_weight=setting.get("preservation_weight", 0.0))
    slices = [Slice(0, list(range(setting["batch"])), list(range(setting["batch"])))]
    # counted on one sample (FLOPs grow linearly with the batch): the counting pass runs eagerly
    # through Python dispatch and needs far more memory than a compiled step
    one_sample = ShapedData(family, conf, 1, setting["resolution"], args.text_len, preserve=bool(setting.get("preservation_weight")))
    fp8_flops = None  # known where the counter ran
    if not setting.get("count_flops", True):
        flops = None
    elif args.gpu_memory_cap:  # the eager counting pass would not fit the cap: the plan's count (within 3% of it)
        sizes = sharding.planned_sizes(family, args.model, "", loading.resolve_dtype("auto", di.device), cfg.lora)
        flops = plan.flops_per_sample(sizes, (setting["resolution"] // 16) ** 2, args.text_len,
                                      memory.checkpointed_share(model), family.paired) * setting["batch"]
    else:
        flops, fp8_flops = (n * setting["batch"] for n in step_flops(model, one_sample, [Slice(0, [0], [0])], inputs))
    note("FLOPs counted")
    if di.device.type == "cuda":
        reset_peak(di.device)  # FLOP counting runs through Python dispatch: not a real step
    train_cfg = dataclasses.replace(train_settings_for(cfg), compile=setting["compile"])  # as train: e.g. DOP's graphs off
    compiled = compiled_blocks.use_compile(train_cfg, di.device)
    compile_model(model, train_cfg, di.device, memory.checkpointed_share(model) > 0)  # as train does
    ddp = model if fsdp.is_sharded(model) else wrap_ddp(model, di, cfg.dist.bucket_mb, cfg.dist.average_per_bucket)  # as train does
    opt, sched = make_optimizer(model, cfg.train, di.device)
    if setting.get("unfused_adamw"):
        opt = torch.optim.AdamW([p for _, p in lora.lora_parameters(model)], lr=1e-4, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainee = Trainee(model, ddp, opt, sched)
    batch = [data.collate(part.items) for part in slices]

    def steps(first: int, n: int) -> list[float]:
        """n steps through train's own pipelined loop (a step's result is read after the next is queued)."""
        return [result.loss for _, result in pipelined_steps(trainee, lambda step: (slices, batch), first, first + n,
                                                              inputs, 1.0, di.world_size)]

    losses = steps(0, 1)
    first_step_s = time.perf_counter() - t0
    note("first step done")
    losses += steps(1, args.warmup - 1)
    with gc_freeze.frozen_gc_after_warmup(cfg.train.gc_freeze, 0) as after_step:
        after_step(gc_freeze.WARMUP_STEPS)  # the warm-up steps above are done: freeze as train does
        _sync(di.device)
        with gpu_clocks.Sampler(di.device) as clocks:
            t1 = time.perf_counter()
            losses += steps(args.warmup, args.steps)
            step_s = (time.perf_counter() - t1) / args.steps
        trace = f"{args.trace}-{re.sub(r'[^A-Za-z0-9]+', '-', setting['name'])}.json.gz" if args.trace else ""
        breakdown = profile_breakdown(steps, args.warmup + args.steps, di.device, trace=trace) if args.profile else None
    samples_s = setting["batch"] * di.world_size / step_s
    previews = preview_timings(args, di, cfg, model, family, setting, lambda: steps(args.warmup + args.steps, 3)) \
        if args.compare_previews and "loss_key" not in setting and "lora_bf16" not in setting else None
    out = {**setting, "compiled": compiled, "lora_parameters": n_params, "world_size": di.world_size, "step_s": step_s,
           "samples_per_s": samples_s, "time_to_first_step_s": first_step_s, "losses": losses,
           "fp8_base": any(isinstance(m, Fp8Linear) for m in model.modules()),
           "fp8_transposed_gib": round(getattr(model, "flux_lora_fp8_transposed_bytes", 0) / 2**30, 2),
           "checkpointing_on": model.is_gradient_checkpointing, "checkpointed_share": memory.checkpointed_share(model), "fused_attention_op": attention.in_use(model),
           "cuda_graphs_on": compiled_blocks.uses_cuda_graphs(model), "average_per_bucket": cfg.dist.average_per_bucket,
           "qkv_groups": sum(isinstance(m, fused_qkv.FusedProjection) for m in model.modules()),
           "single_blocks_grouped": sum(hasattr(m, "to_qkv_mlp") for m in model.modules()),
           "multi_kernel": compiled_blocks.MULTI_KERNEL and not cfg.train.deterministic,
           "lora_linear": lora_linear.ENABLED, "qk_rope": qk_rope.ENABLED,
           "blas": str(torch.backends.cuda.preferred_blas_library()),
           "sharded": fsdp.is_sharded(model), "fsdp_blocks_kept_gathered": getattr(model, "flux_lora_kept_gathered", None),
           "fsdp_lora_replicated": bool(getattr(model, "flux_lora_replicated", None)),
           "gpu_clocks": clocks.summary()}
    if breakdown:
        out["gpu_time_breakdown"] = breakdown
    if previews:
        out["previews"] = previews
    out["compile_report"] = compile_report()
    if flops:
        per_sample = flops / setting["batch"]
        out.update(tflop_per_sample=per_sample / 1e12, tflops_per_gpu=per_sample * samples_s / di.world_size / 1e12,
                   flops_counted_by="the plan (under a memory cap)" if args.gpu_memory_cap else "FlopCounterMode")
        if fp8_flops is not None:
            out["fp8_matmul_tflop_per_sample"] = fp8_flops / setting["batch"] / 1e12
        if peak:
            out["mfu"] = out["tflops_per_gpu"] / peak
            if fp8_peak and fp8_flops:
                out["mfu_fp8_aware"] = fp8_aware_mfu(out["tflop_per_sample"], out["fp8_matmul_tflop_per_sample"],
                                                     samples_s / di.world_size, peak, fp8_peak)
            if out["checkpointed_share"]:
                # the count above has the recompute in it (though FlopCounterMode misses its attention);
                # the model's own FLOPs, from the plan (within ~1.5% of the counter's without checkpointing),
                # leave it out: the MFU of a run that computes only what the step needs
                sizes = sharding.planned_sizes(family, args.model, "", loading.resolve_dtype("auto", di.device), cfg.lora)
                model_flops = plan.flops_per_sample(sizes, (setting["resolution"] // 16) ** 2, args.text_len, 0.0,
                                                    family.paired)
                out["model_tflop_per_sample"] = model_flops / 1e12
                out["mfu_model_flops"] = model_flops * samples_s / di.world_size / 1e12 / peak
    if di.device.type == "cuda":
        # every rank's step peak (the largest decides whether a card fits)
        out["peak_mem_gib_per_rank"] = session.gather_objects(torch.cuda.max_memory_allocated(di.device) / 2**30)
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(di.device) / 2**30
        out["weights_gib"] = torch.cuda.memory_allocated(di.device) / 2**30
        out["load_peak_gib"] = load_peak
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(di.device) / 2**30
        reset_peak(di.device)  # model building, FLOP counting, the steps: the whole setting's peak
        out["whole_run_peak_gib"], out["whole_run_peak_reserved_gib"] = WHOLE_RUN["allocated"], WHOLE_RUN["reserved"]
        out["gpu_memory_cap_gib"] = args.gpu_memory_cap or None
    model = ddp = opt = data = trainee = batch = None  # free the GPU before the next setting
    if di.device.type == "cuda":
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()  # their memory pool, too
        # dynamo's code cache would hand the next model's blocks the graphs bound to the trees
        # just shut down ("Running CUDAGraph after shutdown"); they recompile from inductor's caches
        torch._dynamo.reset()
        # a sharded model holds reference cycles (FSDP2's hooks and states): without a collection
        # its shards stay allocated into the next setting's build and steps (seen: +30 GiB)
        gc.collect()
        torch.cuda.empty_cache()
    return out


def preview_timings(args, di, cfg, model, family, setting: dict, more_steps) -> dict:
    """A preview grid's cost, as train draws it between steps: 2 prompts at the setting's resolution,
    train.sample_steps denoising steps, drawn a prompt at a time with eager blocks (before), as one
    batch eagerly, and as one batch with the transformer replayed from a CUDA graph (now); twice
    each (the first call warms up / records). Then 3 training steps: the step after previews."""

    from flux_lora.outputs.previews import Previewer

    if family.name != "flux1":
        raise SystemExit("--compare-previews: FLUX.1 models only (their cached prompt shapes)")
    conf, g = model.config, torch.Generator().manual_seed(0)
    samples = {"prompts": ["one", "two"], "text_keys": ["t5", "clip"],
               "t5": torch.randn(2, args.text_len, conf.joint_attention_dim, generator=g),
               "clip": torch.randn(2, conf.pooled_projection_dim, generator=g)}
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=tempfile.mkdtemp()))
    out, images = {"sample_steps": cfg.train.sample_steps, "prompts": 2}, {}
    for name, how in (("per_prompt_eager", {"batched": False, "graphed": False}),
                      ("batched_eager", {"batched": True, "graphed": False}), ("batched_graphed", {})):
        previewer = Previewer(cfg, di, {"resolution": setting["resolution"]}, model, samples, None, family, **how)
        seconds = []
        for _ in range(2):
            _sync(di.device)
            t0 = time.perf_counter()
            images[name] = previewer.images()
            _sync(di.device)
            seconds.append(time.perf_counter() - t0)
        out[f"{name}_s"] = seconds
        out[f"{name}_graphed"] = previewer.graphed
    import numpy as np

    if args.profile:  # where a preview's time goes: the ops by host time and by GPU time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            previewer.images()
            _sync(di.device)
        table = prof.key_averages()
        out["profile_by_cpu"] = table.table(sort_by="self_cpu_time_total", row_limit=25).splitlines()
        out["profile_by_gpu"] = table.table(sort_by="self_device_time_total", row_limit=15).splitlines()
    out["max_pixel_difference_graphed_vs_per_prompt"] = max(
        int(np.abs(np.asarray(images["batched_graphed"][i], np.int16) - np.asarray(images["per_prompt_eager"][i], np.int16)).max())
        for i in images["per_prompt_eager"])
    _sync(di.device)
    t0 = time.perf_counter()
    out["losses_after_previews"] = more_steps()
    _sync(di.device)
    out["step_s_after_previews"] = (time.perf_counter() - t0) / 3
    return out


def loss_comparison(test: list[float], reference: list[float]) -> dict:
    """Same seeds, data and steps: how far the losses move against how much they vary from step to
    step (the noise a single loss reading has anyway)."""
    import statistics

    diffs = [abs(a - b) for a, b in zip(test, reference)]
    return {"mean_abs_diff": statistics.fmean(diffs), "max_abs_diff": max(diffs),
            "mean_rel_diff": statistics.fmean(d / abs(b) for d, b in zip(diffs, reference)),
            "reference_step_to_step_std": statistics.stdev(reference) if len(reference) > 1 else None}


def train_settings(args) -> list[dict]:
    other_sharding = "ddp" if args.sharding == "fsdp" else "fsdp"
    ours = {"name": f"flux_lora {args.memory_mode} fp8_compute={args.fp8_compute}",
            "resolution": args.resolution, "batch": args.batch_size, "memory_mode": args.memory_mode,
            "checkpointing": args.checkpointing, "checkpoint_blocks": args.checkpoint_blocks, "compile": args.compile, "fp8_compute": args.fp8_compute,
            "fuse_qkv": args.fuse_qkv == "on", "cuda_graphs": args.cuda_graphs, "fuse_lora_up": args.fuse_lora_up == "on",
            "lora_triton": args.lora_triton == "on", "fp8_transposed": args.fp8_transposed,
            "sharding": args.sharding, "fsdp_unit_blocks": args.fsdp_unit_blocks, "fsdp_prefetch": args.fsdp_prefetch,
            "fsdp_keep_gathered": args.fsdp_keep_gathered, "fsdp_lora": args.fsdp_lora,
            "deterministic": args.deterministic}
    runs = [] if args.only_baseline else [ours]
    # (asked for, what changes, the report key comparing the losses)
    variants = ((args.compare_bf16, "bf16 base (loss reference)", {"fp8_compute": "off"}, "loss_vs_bf16_base"),
                (args.compare_unfused, "q/k/v unfused", {"fuse_qkv": False}, "loss_vs_unfused"),
                (args.compare_graphs, "without CUDA graphs", {"cuda_graphs": "off"}, "loss_vs_no_graphs"),
                (args.compare_up_add, "peft's LoRA forward" if ours["fuse_lora_up"] else "LoRA up-projection as one addmm", {"fuse_lora_up": not ours["fuse_lora_up"]}, "loss_vs_up_add_toggled"),
                (args.compare_lora_triton, "LoRA up-add by " + ("cuBLAS" if ours["lora_triton"] else "Triton"),
                 {"lora_triton": not ours["lora_triton"]}, "loss_vs_lora_triton_toggled"),
                (args.compare_plain_lora, "cuBLAS up-add, fp8 transposes per call (before 2026-11-30 s17)",
                 {"lora_triton": False, "fp8_transposed": "off"}, "loss_vs_plain_lora"),
                (args.compare_backward_fast_accum, f"fp8 backward fast accumulation {'off' if FP8_BACKWARD_FAST_ACCUM else 'on'}",
                 {"backward_fast_accum": not FP8_BACKWARD_FAST_ACCUM},
                 "loss_vs_backward_fast_accum"),
                (args.compare_multi_kernel, f"multi-kernel reductions {'off' if MULTI_KERNEL else 'on'}",
                 {"multi_kernel": not MULTI_KERNEL}, "loss_vs_multi_kernel_toggled"),
                (args.compare_single_group, f"FLUX.1 single blocks' q/k/v and proj_mlp {'apart' if SINGLE_GROUP else 'as one'}",
                 {"single_group": not SINGLE_GROUP}, "loss_vs_single_group_toggled"),
                (args.compare_lora_linear, f"plain base and its LoRA as one op {'off' if LORA_LINEAR else 'on'}",
                 {"lora_linear": not LORA_LINEAR}, "loss_vs_lora_linear_toggled"),
                (args.compare_qk_rope, f"q/k norm and rotary embedding as one op {'off' if QK_ROPE else 'on'}",
                 {"qk_rope": not QK_ROPE}, "loss_vs_qk_rope_toggled"),
                (bool(args.compare_blas), f"torch's bf16 matmuls by {args.compare_blas}", {"blas": args.compare_blas},
                 "loss_vs_blas"),
                (args.compare_fp8_transposed is not None, f"fp8_transposed={args.compare_fp8_transposed}",
                 {"fp8_transposed": args.compare_fp8_transposed}, "loss_vs_fp8_transposed"),
                (args.compare_deterministic, f"deterministic={not args.deterministic}", {"deterministic": not args.deterministic},
                 "loss_vs_deterministic_toggled"),
                (args.compare_average, "DDP dividing each gradient", {"average_per_bucket": False}, "loss_vs_ddp_average"),
                (args.compare_attention, "flash attention (loss reference)", {"attention": "flash"}, "loss_vs_flash_attention"),
                (args.compare_masked, "masked loss", {"masked": True}, "loss_vs_masked"),
                (args.compare_caption_dropout, "caption dropout 0.1", {"caption_dropout": 0.1}, "loss_vs_caption_dropout"),
                (args.compare_preservation, "differential output preservation 1.0", {"preservation_weight": 1.0},
                 "loss_vs_preservation"),
                (args.compare_sharding, f"sharding={other_sharding}", {"sharding": other_sharding}, "loss_vs_other_sharding"),
                (bool(args.compare_fsdp_unit_blocks), f"FSDP2 units of {args.compare_fsdp_unit_blocks} blocks",
                 {"sharding": "fsdp", "fsdp_unit_blocks": args.compare_fsdp_unit_blocks}, "loss_vs_fsdp_units"),
                (args.compare_fsdp_prefetch > 1, f"FSDP2 gathering {args.compare_fsdp_prefetch} blocks ahead",
                 {"sharding": "fsdp", "fsdp_prefetch": args.compare_fsdp_prefetch}, "loss_vs_fsdp_prefetch"),
                (args.compare_fsdp_keep_gathered is not None, f"FSDP2 keeping {args.compare_fsdp_keep_gathered} blocks gathered",
                 {"sharding": "fsdp", "fsdp_keep_gathered": args.compare_fsdp_keep_gathered}, "loss_vs_fsdp_keep_gathered"),
                (args.compare_fsdp_lora is not None, f"FSDP2 with the LoRA {args.compare_fsdp_lora}",
                 {"sharding": "fsdp", "fsdp_lora": args.compare_fsdp_lora}, "loss_vs_fsdp_lora"),
                (args.compare_sharding_checkpointed, "sharding=fsdp, gradient checkpointing", {"sharding": "fsdp", "checkpointing": "on"},
                 "loss_vs_fsdp_checkpointed"))
    for wanted, what, change, key in variants:
        if wanted:
            runs.append({**ours, **change, "name": f"flux_lora {args.memory_mode} {what}", "loss_key": key})
    for setting in args.compare_inductor:
        name, _, value = setting.partition("=")
        runs.append({**ours, "inductor": {name: ast.literal_eval(value)}, "name": f"flux_lora {args.memory_mode} inductor {setting}",
                     "loss_key": f"loss_vs_inductor_{name}"})
    if args.baseline:  # the script on these machines: SDPA with cuDNN off, i.e. flash
        runs.append({"name": "diffusers-script setting", "resolution": args.resolution, "batch": 1,
                     "memory_mode": "fast", "checkpointing": "on", "compile": "off", "lora_bf16": True,
                     "unfused_adamw": True, "attention": "flash"})
    return runs


def run_train(args) -> dict:
    with session.process_group(600) as di:
        loading.quiet_libraries()
        if args.gpu_memory_cap and di.device.type == "cuda":
            cap_gpu_memory(di.device, args.gpu_memory_cap)
        peak, fp8_peak = matmul_peak_tflops(di.device), fp8_matmul_peak_tflops(di.device)
        results = []
        for setting in train_settings(args):
            with torch._inductor.config.patch(setting.get("inductor", {})):  # read when the blocks compile
                results.append(bench_train(args, di, setting, peak, fp8_peak))
            if di.is_main:
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        report = {"kind": "train", "model": args.model, "text_len": args.text_len, "peak_bf16_tflops": peak, "peak_fp8_tflops": fp8_peak,
                  "results": results}
        if args.baseline and not args.only_baseline:
            report["speedup_vs_diffusers_setting"] = results[0]["samples_per_s"] / results[-1]["samples_per_s"]
        for other in results[1:]:
            if "loss_key" in other:
                report[other["loss_key"]] = loss_comparison(results[0]["losses"], other["losses"])
        return report if di.is_main else {}


def run_preprocess(args) -> dict:
    """The real preprocess stage on synthetic images; images/s per GPU from its own events."""
    from flux_lora.data import preprocess
    from flux_lora.data.demo import make_images

    # one folder for all ranks of this torchrun: their parent is its agent (TORCHELASTIC_RUN_ID is
    # "none" for every standalone torchrun, so consecutive runs would share one)
    run_id = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    tmp = Path(tempfile.gettempdir()) / f"flux-lora-bench-{run_id}"
    images = tmp / "images"
    if int(os.environ.get("RANK", 0)) == 0:
        make_images(images, args.images, caption_every=10**9)  # every image has a caption
        for i, txt in enumerate(sorted(images.glob("*.txt"))):
            txt.write_text(f"photo number {i} of a unique subject, {i * 7919 % 1000} details")  # unique captions
        (tmp / "ready").touch()  # the other ranks start when the captions are written too
    cache_dir = Path(args.cache_dir or tmp / "cache")
    flags = {"model.path": args.model, "data.source": str(images), "data.cache_dir": str(cache_dir),
             "data.resolution": args.resolution, "data.captioner": "none", "data.max_sequence_length": args.text_len,
             "preprocess.batch_size": args.batch_size, "preprocess.num_workers": args.workers,
             "preprocess.overwrite": True, "data.square": True, "preprocess.chunk_items": args.chunk_items,
             "preprocess.compile": {"auto": "on"}.get(args.compile, args.compile)}  # the bench measures the compiled rate
    cfg = build_config(None, flags)
    t0 = time.perf_counter()
    _wait_for(tmp / "ready")
    profiling = args.profile and torch.cuda.is_available()  # GPU time by kernel over the stage: is the GPU kept busy
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) if profiling else contextlib.nullcontext() as prof:
        preprocess.run(cfg)
    wall = time.perf_counter() - t0
    gpu_profile = None
    if profiling:
        kernels = sorted(((e.device_time_total / 1e6, e.count, e.key[:100]) for e in prof.key_averages()
                          if e.device_time_total > 0), reverse=True)
        gpu_profile = {"gpu_busy_s": sum(k[0] for k in kernels), "top_kernels": kernels[:25]}
    events = [json.loads(line) for line in (cache_dir / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["event"] == "done"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    rate = done[-1].get("items_per_s") if done else None  # all ranks' items over the encoding time
    # steady state: from the progress event at a quarter of the items to the last (compiles done)
    progress = [e for e in events if e["event"] == "progress" and e.get("stage", "preprocess") == "preprocess"]
    quarter = next((e for e in progress if e["done"] >= args.images / 4), None)
    steady = (progress[-1]["done"] - quarter["done"]) / (progress[-1]["time"] - quarter["time"]) \
        if quarter and progress[-1]["time"] > quarter["time"] else None
    report = {"kind": "preprocess", "model": args.model, "resolution": args.resolution, "images": args.images,
              "batch_size": args.batch_size, "chunk_items": args.chunk_items, "world_size": world, "wall_s_incl_load": wall, "compile": args.compile,
              "images_per_s": rate, "images_per_s_per_gpu": rate / world if rate else None,
              "encode_s_per_rank": done[-1].get("encode_s_per_rank") if done else None,
              "cpu_threads": torch.get_num_threads(),
              "steady_images_per_s": steady, "steady_images_per_s_per_gpu": steady / world if steady else None,
              "timing": [e for e in events if e["event"] == "timing"], "gpu_profile": gpu_profile}
    if torch.cuda.is_available():
        report["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return report if int(os.environ.get("RANK", 0)) == 0 else {}


def _wait_for(marker: Path) -> None:
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["train", "preprocess"])
    p.add_argument("--model", default="random:flux1-dev")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--memory-mode", default="fast", choices=["fast", "fp8", "nf4"])
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--checkpoint-blocks", type=int, default=0, help="checkpoint only the first N blocks (train.checkpoint_blocks)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--only-baseline", action="store_true", help="the diffusers-script setting alone (a model too big for both in one process)")
    p.add_argument("--fp8-compute", default="auto", choices=["auto", "on", "off"], help="fast mode: fp8 frozen base")
    p.add_argument("--compare-bf16", action="store_true", help="also run with a bf16 base; compare the losses step by step")
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient"])
    p.add_argument("--fuse-qkv", default="on", choices=["on", "off"])
    p.add_argument("--compare-unfused", action="store_true", help="also run with q/k/v as separate layers")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compare-graphs", action="store_true", help="also run without CUDA graphs; compare the losses")
    p.add_argument("--fuse-lora-up", default="on", choices=["on", "off"], help="LoRA up-projection and add as one addmm")
    p.add_argument("--compare-up-add", action="store_true", help="also run with --fuse-lora-up toggled; compare the losses")
    p.add_argument("--lora-triton", default="on", choices=["on", "off"], help="LoRA up-add as a Triton kernel (train.lora_triton)")
    p.add_argument("--compare-lora-triton", action="store_true", help="also run with --lora-triton toggled; compare the losses")
    p.add_argument("--fp8-transposed", default="auto", choices=["auto", "on", "off"], help="fp8 base: kept transposed weights (train.fp8_transposed)")
    p.add_argument("--compare-fp8-transposed", default=None, choices=["auto", "on", "off"], help="also run with this train.fp8_transposed")
    p.add_argument("--compare-backward-fast-accum", action="store_true", help="also run the fp8 input gradients with fast accumulation toggled")
    p.add_argument("--compare-multi-kernel", action="store_true", help="also run with inductor's multi-kernel reductions toggled (compiled_blocks.MULTI_KERNEL)")
    p.add_argument("--compare-single-group", action="store_true", help="also run with FLUX.1 single blocks' q/k/v and proj_mlp grouping toggled (single_block.ENABLED)")
    p.add_argument("--compare-lora-linear", action="store_true", help="also run with a plain base and its LoRA as one op toggled (lora_linear.ENABLED; the bf16 base)")
    p.add_argument("--compare-qk-rope", action="store_true", help="also run with the q/k norm and rotary embedding as one op toggled (qk_rope.ENABLED)")
    p.add_argument("--compare-blas", default="", choices=["", "cublas", "cublaslt"],
                   help="also run with torch.backends.cuda.preferred_blas_library set so (the fp8 matmuls are cuBLASLt's either way)")
    p.add_argument("--compare-inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="also run with this inductor setting (repeatable: one run each), e.g. triton.multi_kernel=1")
    p.add_argument("--compare-plain-lora", action="store_true", help="also run with --lora-triton off --fp8-transposed off")
    p.add_argument("--deterministic", action="store_true", help="train.deterministic: bit-identical runs on the GPU")
    p.add_argument("--compare-deterministic", action="store_true", help="also run with train.deterministic toggled")
    p.add_argument("--compare-average", action="store_true", help="under torchrun: also let DDP divide each gradient by the world size (no comm hook)")
    p.add_argument("--compare-attention", action="store_true", help="also run with flash attention; compare the losses")
    p.add_argument("--compare-masked", action="store_true", help="also run with a loss mask (half the image); the step's cost")
    p.add_argument("--compare-preservation", action="store_true", help="also run with differential output preservation (weight 1): its second forward and backward")
    p.add_argument("--compare-caption-dropout", action="store_true", help="also run with caption dropout 0.1; the step's cost")
    p.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: DDP or FSDP2 (dist.sharding)")
    p.add_argument("--compare-sharding", action="store_true", help="under torchrun: also run the other sharding; compare the losses")
    p.add_argument("--compare-sharding-checkpointed", action="store_true", help="also run FSDP2 with gradient checkpointing (its memory floor)")
    p.add_argument("--fsdp-unit-blocks", type=int, default=1, help="FSDP2: transformer blocks per unit (dist.fsdp_unit_blocks)")
    p.add_argument("--fsdp-prefetch", type=int, default=1, help="FSDP2: blocks gathered ahead (dist.fsdp_prefetch)")
    p.add_argument("--compare-fsdp-prefetch", type=int, default=0, help="also run FSDP2 gathering this many blocks ahead")
    p.add_argument("--fsdp-keep-gathered", type=int, default=-1, help="FSDP2: last blocks kept gathered from forward to backward (dist.fsdp_keep_gathered; -1 auto)")
    p.add_argument("--fsdp-lora", default="auto", choices=["auto", "replicated", "sharded"], help="FSDP2: the LoRA replicated or sharded (dist.fsdp_lora)")
    p.add_argument("--compare-fsdp-lora", default=None, choices=["replicated", "sharded"], help="also run FSDP2 with the LoRA placed so")
    p.add_argument("--compare-fsdp-keep-gathered", type=int, default=None, help="also run FSDP2 keeping this many blocks gathered (0: none)")
    p.add_argument("--compare-fsdp-unit-blocks", type=int, default=0, help="also run FSDP2 with this many blocks per unit")
    p.add_argument("--gpu-memory-gib", type=float, default=0.0, help="GiB the run plans for (dist.gpu_memory_gib: checkpointing and sharding auto), without a cap")
    p.add_argument("--gpu-memory-cap", type=float, default=0.0, help="GiB: cap this process's GPU memory from its first allocation (torch.cuda.set_per_process_memory_fraction) and plan for it (dist.gpu_memory_gib); reports the whole-run peak")
    p.add_argument("--compare-previews", action="store_true", help="time a 2-prompt preview grid the old way (a prompt at a time, eager) and the new (batched, CUDA graph)")
    p.add_argument("--profile", action="store_true", help="add a GPU time breakdown by kernel kind")
    p.add_argument("--trace", default="", help="with --profile: write each setting's timeline to TRACE-N.json.gz")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--chunk-items", type=int, default=64, help="preprocess: items per shard (preprocess.chunk_items, same default; runs before 2026-11-30 session 14 used 16)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script runs")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.tiny:
        from flux_lora.models.tiny import make_tiny

        args.model = str(make_tiny(Path(tempfile.mkdtemp()) / "tiny"))
        args.resolution, args.text_len, args.steps, args.warmup, args.images = 64, 32, 2, 1, 6
        args.batch_size = min(args.batch_size, 2)
        args.workers = 0
    if args.deterministic or args.compare_deterministic:  # read once, at cuBLAS's first call: before the peak matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", determinism.CUBLAS_WORKSPACE)
    report = run_train(args) if args.kind == "train" else run_preprocess(args)
    if not report:
        return
    report.update(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  command=" ".join(sys.argv))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
