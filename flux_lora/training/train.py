"""Stage 2: LoRA training on the cached shards with DistributedDataParallel.

    python -m flux_lora train --model M --cache-dir CACHE --output OUT          # 1 process (CPU or 1 GPU)
    torchrun --nproc_per_node=8 -m flux_lora train --config configs/flux-dev-512.yaml

Every rank loads the transformer, adds the same LoRA, and takes its slice of each global batch;
DDP averages gradients. Rank 0 writes checkpoints, events and the LoRA. A signal, a non-finite
loss or a failing rank becomes every rank's decision through the one all-reduce per step.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux_lora import cache, checkpoint, distributed, faults, flow, lora, models, speed
from flux_lora.config import Config, to_dict, to_yaml
from flux_lora.plot import write_loss_plot
from flux_lora.errors import (CacheError, CheckpointError, ConfigError, DivergedError, FluxLoraError,
                              StoppedError)
from flux_lora.report import GcPauses, make_reporter, process_started_at
from flux_lora.sampler import GlobalBatchSampler


# ---------------------------------------------------------------- setup

def prepare_output(cfg: Config) -> str | None:
    """Rank 0: make the output dir usable; returns the checkpoint to resume from, if any."""
    if not cfg.output.dir:
        raise CheckpointError("no output directory given; pass --output DIR")
    out = Path(cfg.output.dir)
    if cfg.output.overwrite and out.is_dir():
        for name in ("checkpoints", "samples"):
            shutil.rmtree(out / name, ignore_errors=True)
        for f in out.glob("*"):
            if f.is_file() and (f.suffix in (".safetensors", ".png", ".jsonl", ".yaml")):
                f.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output directory {out} is not writable ({e.strerror}); choose another --output") from None
    if cfg.output.resume_from:
        if not Path(cfg.output.resume_from).is_dir():
            raise CheckpointError(f"--resume-from {cfg.output.resume_from} does not exist; point it at OUTPUT/checkpoints/step-NNNNNN")
        return cfg.output.resume_from
    has_results = any(out.glob("checkpoints/step-*")) or any(out.glob("*.safetensors"))
    if not cfg.output.resume:
        if has_results:
            raise CheckpointError(f"output directory {out} already holds a run and --no-resume was given; "
                                  "pass --overwrite to replace it or choose another --output")
        return None
    latest = checkpoint.latest_valid(out)
    return str(latest) if latest else None


def load_data(cfg: Config, di) -> tuple[dict, cache.CachedDataset]:
    """The manifest, checked against --model, and every shard's size and checksum."""
    cache_dir = Path(cfg.data.cache_dir)
    if not cfg.data.cache_dir:
        raise CacheError("no cache directory given; pass --cache-dir DIR (written by `flux_lora preprocess`)")
    manifest = cache.load_manifest(cache_dir)
    models.check_model_path(cfg.model.path)
    fp = models.fingerprint(cfg.model.path, manifest["max_sequence_length"], cfg.model.revision)
    if fp != manifest["fingerprint"]:
        raise CacheError(f"cache {cache_dir} was built for model {manifest['model']}, not {cfg.model.path} "
                         "(different VAE/text encoders); rerun preprocess with this --model")
    problems = [p for ps in distributed.gather_objects(cache.check_shard_files(cache_dir, manifest, di.rank, di.world_size))
                for p in ps]
    if problems:
        raise CacheError(f"cache {cache_dir}: {problems[0]}"
                         + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                         + "; rerun preprocess (with --overwrite) to rebuild it")
    return manifest, cache.CachedDataset(cache_dir, manifest)


def image_token_counts(dataset: cache.CachedDataset) -> set[int]:
    """Image tokens (one per 16×16 pixels) of each bucket the dataset uses."""
    return {(w // 16) * (h // 16) for w, h in {it.bucket for it in dataset.items}}


def max_tokens(dataset: cache.CachedDataset, text_len: int, batch_size: int) -> int:
    """Tokens of the largest micro-batch: image tokens + text tokens."""
    return batch_size * (max(image_token_counts(dataset)) + text_len)


def token_counts(dataset: cache.CachedDataset) -> int:
    """How many micro-batch shapes the run will see: distinct image token counts of the buckets."""
    return len(image_token_counts(dataset))


def build_model(cfg: Config, di, reporter, tokens: int = 0, shapes: int = 1):
    """Transformer from_pretrained, frozen, LoRA added (fp32), speed/memory options applied;
    `tokens` (largest micro-batch) lets gradient checkpointing=auto decide from memory, `shapes`
    (distinct micro-batch shapes) lets cuda_graphs=auto decide."""
    dtype = models.resolve_dtype(cfg.model.dtype, di.device)
    stage = speed.load_device(cfg.train, di.device, dtype, models.synthetic.is_synthetic(cfg.model.path))
    transformer = models.load_transformer(cfg.model.path, dtype, cfg.model.revision, stage)
    models.set_attention_backend(cfg.model.attention, transformer, dtype, di.device)
    for name in lora.unmatched_targets(transformer, cfg.lora.targets):
        reporter.warning(f"LoRA target {name!r} matches no Linear layer of the transformer")
    speed.quantize_base(transformer, cfg.train.memory_mode, di.device)
    n_params = lora.add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout, cfg.train.seed)
    if n_fp8 := speed.fp8_base(transformer, cfg.train, di.device, dtype):
        where = "on fp8 tensor cores" if di.device.type == "cuda" else f"in fp8 on the {di.device.type}"
        reporter.info(f"frozen base in fp8: {n_fp8} Linear layers multiply {where}"
                      + (" (train.fp8_compute=off keeps bf16)" if cfg.train.memory_mode == "fast" else ""))
    transformer.to(di.device)
    why = speed.apply(transformer, cfg.train, di.device, tokens, shapes)
    if why:
        reporter.info(f"gradient checkpointing on ({why})")
    return transformer, n_params


def make_optimizer(model, cfg: Config, device: torch.device):
    """AdamW (fused on CUDA); LoRA B matrices may get a larger LR (LoRA+)."""
    params = lora.lora_parameters(model)
    a = [p for n, p in params if "lora_B" not in n]
    b = [p for n, p in params if "lora_B" in n]
    tc = cfg.train
    groups = [{"params": a, "lr": tc.lr}, {"params": b, "lr": tc.lr * tc.lr_b_factor}]
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999),
                            **({"fused": True} if device.type == "cuda" else {}))

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.schedule == "cosine":
            progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def math_config(cfg: Config, world: int, manifest: dict) -> dict:
    """What must not change between a checkpoint and its resume (the numbers depend on it)."""
    t, l = cfg.train, cfg.lora
    out = {"lora.rank": l.rank, "lora.alpha": l.alpha, "lora.targets": l.targets, "lora.dropout": l.dropout,
           "train.lr": t.lr, "train.lr_b_factor": t.lr_b_factor, "train.weight_decay": t.weight_decay,
           "train.warmup_steps": t.warmup_steps, "train.schedule": t.schedule, "train.max_grad_norm": t.max_grad_norm,
           "train.seed": t.seed, "train.guidance": t.guidance, "train.timestep_sampling": t.timestep_sampling,
           "train.logit_mean": t.logit_mean, "train.logit_std": t.logit_std,
           "global batch (batch_size × ranks × grad_accum)": t.batch_size * world * t.grad_accum,
           "cache": manifest["fingerprint"] + ":" + ",".join(s["sha256"][:12] for s in manifest["shards"])}
    if t.schedule == "cosine":
        out["train.steps"] = t.steps
    return out


# ---------------------------------------------------------------- the step

@dataclass
class StepInputs:
    seed: int
    guidance: float | None
    sampling: str
    logit_mean: float
    logit_std: float
    device: torch.device
    dtype: torch.dtype


def micro_loss(model, batch: dict, positions: list[int], step: int, s: StepInputs) -> torch.Tensor:
    """Rectified-flow loss of one micro-batch (one bucket)."""
    x0 = batch["latents"].to(s.device, non_blocking=True).float()  # [B, C, h, w]
    _, _, h, w = x0.shape
    seq_len = (h // 2) * (w // 2)
    noise, t = flow.sample_noise_and_t(tuple(x0.shape[1:]), s.seed, step, positions, s.sampling,
                                       s.logit_mean, s.logit_std, seq_len, s.device)
    xt = flow.pack_latents(flow.noisy_latents(x0, noise, t))
    t5 = batch["t5"].to(s.device, s.dtype, non_blocking=True)
    guidance = torch.full((x0.shape[0],), s.guidance, device=s.device) if s.guidance is not None else None
    autocast = torch.autocast("cuda", dtype=s.dtype) if s.device.type == "cuda" and s.dtype != torch.float32 \
        else contextlib.nullcontext()
    with autocast:
        pred = model(hidden_states=xt.to(s.dtype), timestep=t.to(s.dtype), guidance=guidance,
                     pooled_projections=batch["clip"].to(s.device, s.dtype, non_blocking=True),
                     encoder_hidden_states=t5, txt_ids=flow.text_ids(t5.shape[1], s.device),
                     img_ids=flow.image_ids(h, w, s.device), return_dict=False)[0]
    return flow.flow_loss(pred, flow.pack_latents(flow.velocity_target(x0, noise)))


def train_step(ddp_model, batches: list[dict], slices, step: int, s: StepInputs) -> torch.Tensor:
    """Forward/backward over this rank's micro-batches (batches[k] holds slices[k]'s items);
    gradients sync only on the last one."""
    total = torch.zeros((), device=s.device)
    for k, (sl, batch) in enumerate(zip(slices, batches)):
        last = k == len(slices) - 1
        sync = contextlib.nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()
        with sync:
            loss = micro_loss(ddp_model, batch, sl.positions, step, s) / len(slices)
            loss.backward()
        total += loss.detach()
    return total


# ---------------------------------------------------------------- the update

@dataclass
class StepResult:
    loss: float  # averaged over ranks; nan when the step was skipped
    stop: bool  # some rank got a stop signal
    skipped: bool  # non-finite loss or gradients on some rank
    lr: float


class PendingStep:
    """A step whose update is queued on the device; `result()` reads its votes on the host.
    The loop reads it one step late, after the next forward/backward is queued, so the GPU never
    waits for the host between steps. The votes are copied out right behind the all-reduce: a
    plain read later would queue behind the next step's work and wait for all of it."""

    def __init__(self, votes: torch.Tensor, lr: float, world: int):
        self.lr, self.world, self.ready = lr, world, None
        if votes.device.type == "cuda":
            self.votes = torch.empty(votes.shape, dtype=votes.dtype, pin_memory=True)
            self.votes.copy_(votes, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.votes = votes

    def result(self) -> StepResult:
        if self.ready is not None:
            self.ready.synchronize()
        loss_sum, stop_votes, bad_votes = self.votes.tolist()
        return StepResult(loss_sum / self.world if bad_votes == 0 else float("nan"), stop_votes > 0, bad_votes > 0, self.lr)


def skips_on_device(opt) -> bool:
    """Fused AdamW skips a step from a flag tensor (found_inf) it reads on the device: no host read."""
    return all(g.get("fused") for g in opt.param_groups)


def update(model, opt, sched, loss: torch.Tensor, stop_raised: bool, max_grad_norm: float,
           device: torch.device, world: int) -> PendingStep:
    """Clip, agree across ranks (the loop's one all-reduce), then step or skip: on the device
    where the optimizer can (no host sync), else after reading the votes."""
    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in lora.lora_parameters(model)],
                                               max_grad_norm if max_grad_norm > 0 else float("inf"))
    local_bad = (~torch.isfinite(loss)) | (~torch.isfinite(grad_norm))
    votes = distributed.all_sum_on_device(
        torch.stack([torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
                     torch.tensor(float(stop_raised), device=device), local_bad.float()]))
    lr = sched.get_last_lr()[0]
    if skips_on_device(opt):
        opt.found_inf = (votes[2] > 0).float()  # 1: every rank skips this update, on the device
        opt.step()
    elif votes[2].item() == 0:
        opt.step()
    speed.zero_grad(model, opt)
    sched.step()  # the LR is a function of the step, skipped or not
    return PendingStep(votes, lr, world)


# ---------------------------------------------------------------- the run

@dataclass
class RunState:
    step: int = 0
    nonfinite_in_row: int = 0
    loss_history: list = field(default_factory=list)  # (step, loss, lr)


@dataclass
class Run:
    """Everything one training run holds, so the phases below take one argument."""
    cfg: Config
    di: distributed.DistInfo
    out: Path
    reporter: object
    model: torch.nn.Module
    ddp: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    dataset: cache.CachedDataset
    sampler: GlobalBatchSampler
    inputs: StepInputs
    math: dict
    previews: object
    state: RunState


def run(cfg: Config) -> dict:
    models.quiet_libraries()
    with distributed.session(cfg.dist.timeout_s) as di:
        resume_from = distributed.main_then_share(lambda: prepare_output(cfg))
        out = Path(cfg.output.dir)
        reporter = make_reporter(di.is_main, di.rank, out / "events.jsonl", "train", cfg.output.json, cfg.train.log_every)
        stop = checkpoint.StopFlag().install()
        r = None
        try:
            t_start = time.time()
            r = setup(cfg, di, out, reporter, resume_from)
            setup_s = time.time() - t_start  # data, model, LoRA, DDP; compile follows, in step 1
            with GcPauses() as pauses:
                first_step_s = loop(r, stop, t_start, pauses)
            summary = finish(r, t_start, resume_from, step_timings(t_start, setup_s, first_step_s, pauses))
            # DDP must be torn down while the process group lives: its destructor can otherwise
            # wait forever on a group that session() has already destroyed
            r = None
            gc.collect()
            return summary
        except FluxLoraError as e:
            if isinstance(e, StoppedError):
                reporter.emit("stopped", message=str(e))
            else:
                reporter.error(str(e), rank=di.rank)
            raise
        except Exception as e:
            reporter.error(f"rank {di.rank}: {type(e).__name__}: {e}", rank=di.rank)
            raise
        finally:
            stop.restore()
            reporter.close()


def setup(cfg: Config, di, out: Path, reporter, resume_from: str | None) -> Run:
    manifest, dataset = load_data(cfg, di)
    model, n_params = build_model(cfg, di, reporter, max_tokens(dataset, manifest["max_sequence_length"], cfg.train.batch_size),
                                  token_counts(dataset))
    ddp = speed.wrap_ddp(model, di, cfg.dist.bucket_mb, cfg.dist.average_per_bucket)
    opt, sched = make_optimizer(model, cfg, di.device)
    tc = cfg.train
    current_math = math_config(cfg, di.world_size, manifest)
    state = resume(resume_from, model, opt, sched, current_math) if resume_from else RunState()
    if di.is_main:
        (out / "config.yaml").write_text(to_yaml(cfg))
    sampler = GlobalBatchSampler([it.bucket for it in dataset.items], tc.batch_size * di.world_size * tc.grad_accum, tc.seed)
    has_guidance = bool(getattr(model.config, "guidance_embeds", False))
    inputs = StepInputs(tc.seed, tc.guidance if has_guidance else None, tc.timestep_sampling, tc.logit_mean,
                        tc.logit_std, di.device, models.resolve_dtype(cfg.model.dtype, di.device))
    previews = make_previewer(cfg, di, manifest, model, reporter)
    reporter.start(tc.steps, "train", world_size=di.world_size, dataset_size=len(dataset), total_steps=tc.steps,
                   start_step=state.step, lora_parameters=n_params, global_batch=sampler.global_batch,
                   cpu_threads=torch.get_num_threads(), resumed_from=resume_from, config=to_dict(cfg))
    if resume_from:
        reporter.info(f"resuming from {resume_from} at step {state.step}")
    return Run(cfg, di, out, reporter, model, ddp, opt, sched, dataset, sampler, inputs, current_math, previews, state)


def loop(r: Run, stop, t_start: float, pauses: GcPauses) -> float | None:
    """Train until the last step; returns the time to the first step (compile included)."""
    tc = r.cfg.train
    meter = Meter(tc.steps, r.state.step, r.sampler.global_batch)
    pin = r.di.device.type == "cuda"

    def load(step: int):
        slices = r.sampler.rank_slices(step, r.di.rank, r.di.world_size, tc.batch_size)
        batches = [r.dataset.collate(sl.items) for sl in slices]
        return slices, [cache.pinned(b) for b in batches] if pin else batches

    prefetch = cache.Prefetcher(load, tc.steps)
    try:
        with speed.frozen_gc_after_warmup(tc.gc_freeze, r.state.step) as after_step:
            return _steps(r, stop, t_start, meter, prefetch, lambda step: after_step(step) and pauses.steady())
    finally:
        prefetch.close()


def _steps(r: Run, stop, t_start: float, meter, prefetch, after_step) -> float | None:
    """Step k+1's forward/backward is queued before step k's result is read: the host reads the
    votes of a step that has finished while the GPU already works on the next one. Step k's
    outputs (checkpoint, stop, divergence) see exactly the state after k: k+1's update is queued
    only after them, and dropped when the run ends at k."""
    tc, st = r.cfg.train, r.state
    pending = None
    while st.step < tc.steps or pending:
        queued = st.step + (1 if pending else 0)  # steps whose update is queued
        loss = None
        if queued < tc.steps:
            faults.during_step(queued + 1, r.di.rank)
            slices, batches = prefetch.get(queued)
            loss = train_step(r.ddp, batches, slices, queued, r.inputs)
            if faults.loss_is_nan(queued + 1, r.di.rank):
                loss = _poison(loss, r.model)
        if pending:
            ending = _step_done(r, pending.result(), stop, meter)
            if ending:
                speed.zero_grad(r.model, r.opt)  # the next step's gradients: not applied
                save_state(r)
                raise _collective(ending)
            after_step(st.step)
        if loss is None:
            break
        pending = update(r.model, r.opt, r.sched, loss, stop.raised, tc.max_grad_norm, r.di.device, r.di.world_size)
    return meter.t_first - t_start if meter.t_first else None


def _step_done(r: Run, res: StepResult, stop, meter) -> FluxLoraError | None:
    """Book one finished step; returns the error that ends the run after it, if any."""
    tc, st = r.cfg.train, r.state
    st.step += 1
    st.nonfinite_in_row = st.nonfinite_in_row + 1 if res.skipped else 0
    if res.skipped:
        r.reporter.warning(f"non-finite loss at step {st.step}; step skipped "
                           f"({st.nonfinite_in_row}/{tc.max_nonfinite} in a row)", step=st.step)
    st.loss_history.append((st.step, res.loss, res.lr))
    r.reporter.progress(st.step, **meter.update(st.step, res.loss, res.lr))
    if st.nonfinite_in_row >= tc.max_nonfinite:
        return DivergedError(f"loss was non-finite {st.nonfinite_in_row} steps in a row at step {st.step}; "
                             "checkpoint saved from before the divergence; lower --lr and rerun")
    periodic_outputs(r)
    faults.after_step(st.step, r.di.rank)
    if res.stop:
        return StoppedError(f"stopped at step {st.step} ({stop.signal_name or 'a signal'}); "
                            "rerun the same command to resume")
    return None


def step_timings(t_start: float, setup_s: float, first_step_s: float | None, pauses: GcPauses) -> dict:
    """The done event's timing fields (seconds from t_start unless named otherwise)."""
    out = {"time_to_first_step_s": first_step_s, "setup_s": setup_s, "gc_full_collections": pauses.summary()}
    started = process_started_at()
    if started is not None and first_step_s is not None:
        out["first_step_since_process_start_s"] = first_step_s + t_start - started
    return out


def finish(r: Run, t_start: float, resume_from: str | None, timings: dict) -> dict:
    if resume_from is None or r.state.step > _resume_step(resume_from):
        save_state(r)
    final = r.out / "lora.safetensors"
    lora.export_lora(final, r.model, r.di.rank, r.cfg.output.export_format)
    if r.previews:
        r.previews(r.state.step)
    if r.di.is_main:
        write_loss_plot(r.out / "loss.png", r.state.loss_history)
    digests = distributed.gather_objects(lora.digest(lora.lora_state_dict(r.model)))
    if len(set(digests)) > 1:
        r.reporter.warning(f"LoRA weights differ between ranks at the end ({len(set(digests))} versions); "
                           "rank 0's were saved")
    finite = [x[1] for x in r.state.loss_history if math.isfinite(x[1])]
    summary = {"lora": str(final), "steps": r.state.step, "ranks_agree": len(set(digests)) == 1,
               "final_loss": finite[-1] if finite else None,
               **timings, "elapsed_s": time.time() - t_start}
    r.reporter.done(**summary)
    r.reporter.info(f"LoRA written to {final}")
    return summary


def _collective(error: FluxLoraError) -> FluxLoraError:
    """Mark an error that every rank raises together (decided through a collective)."""
    error.shared = True
    return error


def _rng_state() -> dict:
    """Global RNG state, for completeness: training draws noise and timesteps from (seed, step,
    sample position) and the data order from (seed, epoch), so an exact resume does not need it."""
    return {"cpu": torch.get_rng_state()}


def _poison(loss: torch.Tensor, model) -> torch.Tensor:
    """Injected fault: what a diverging step looks like (NaN loss and gradients)."""
    for _, p in lora.lora_parameters(model):
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    return loss * float("nan")


def _resume_step(path: str) -> int:
    return int((cache.read_json(Path(path) / "state.json") or {}).get("step", -1))


class Meter:
    """Running figures for progress events (loss averaged over ranks, samples/s, ETA)."""

    def __init__(self, total: int, start: int, global_batch: int):
        self.total, self.global_batch = total, global_batch
        self.t0, self.sum, self.n, self.avg_loss = time.time(), 0.0, 0, float("nan")
        self.t_first, self.step_first = None, start

    def update(self, step: int, loss: float, lr: float) -> dict:
        now = time.time()
        if math.isfinite(loss):
            self.sum, self.n = self.sum + loss, self.n + 1
            self.avg_loss = self.sum / self.n
        if self.t_first is None:  # the first step includes compile/warm-up: rates count from its end
            self.t_first, self.step_first = now, step
        done, dt = step - self.step_first, now - self.t_first
        steps_s = done / dt if done and dt > 0 else 0.0
        out = {"step": step, "total_steps": self.total, "progress": step / self.total, "loss": loss,
               "avg_loss": self.avg_loss, "learning_rate": lr, "samples_per_s": steps_s * self.global_batch,
               "eta_s": (self.total - step) / steps_s if steps_s else None, "elapsed_s": now - self.t0}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # no sync: a host-side counter
        return out


def resume(path: str, model, opt, sched, current_math: dict) -> RunState:
    ck = checkpoint.load_checkpoint(Path(path))
    diffs = checkpoint.config_differences(ck["state"].get("math", {}), current_math)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: settings changed ({'; '.join(diffs)}); "
                          "restore them, or pass --no-resume --overwrite to start over")
    lora.load_lora_state_dict(model, ck["lora"])
    opt.load_state_dict(ck["optim"]["optimizer"])
    sched.load_state_dict(ck["optim"]["scheduler"])
    if "rng" in ck["optim"]:
        torch.set_rng_state(ck["optim"]["rng"]["cpu"])
    st = ck["state"]
    return RunState(step=st["step"], loss_history=[tuple(x) for x in st.get("loss_history", [])])


def save_state(r: Run) -> None:
    """A checkpoint of the current step (rank 0 writes; every rank learns if it failed)."""
    failure, path = None, None
    try:
        path = checkpoint.save_checkpoint(
            r.out, r.state.step, lora.lora_state_dict(r.model),
            {"optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(), "rng": _rng_state()},
            {"math": r.math, "loss_history": r.state.loss_history,
             "sampler": {"step": r.state.step, "global_batch": r.sampler.global_batch,
                         "batches_per_epoch": r.sampler.batches_per_epoch}},
            r.cfg.train.keep_checkpoints, r.di.rank)
    except CheckpointError as e:
        failure = str(e)
    failure = distributed.broadcast_object(failure)
    if failure:
        raise _collective(CheckpointError(failure))
    if path:
        r.reporter.emit("checkpoint", step=r.state.step, path=str(path))
        write_loss_plot(r.out / "loss.png", r.state.loss_history)


def periodic_outputs(r: Run) -> None:
    tc, step = r.cfg.train, r.state.step
    if step == tc.steps:
        return  # the end of the run writes everything once
    if tc.checkpoint_every and step % tc.checkpoint_every == 0:
        save_state(r)
    if tc.save_every and step % tc.save_every == 0:
        lora.export_lora(r.out / f"lora-step-{step:06d}.safetensors", r.model, r.di.rank, r.cfg.output.export_format)
    if r.previews and tc.sample_every and step % tc.sample_every == 0:
        r.previews(step)


def make_previewer(cfg: Config, di, manifest: dict, model, reporter):
    """A function step -> None drawing the cached sample prompts, or None when off."""
    if not cfg.train.sample_every:
        return None
    samples = cache.load_sample_prompts(Path(cfg.data.cache_dir))
    if not samples:
        reporter.warning("train.sample_every is set but the cache has no sample prompts; "
                         "pass --sample-prompt to preprocess to get preview images")
        return None
    from flux_lora.sampling import Previewer

    return Previewer(cfg, di, manifest, model, samples, reporter)
