"""Stage 2: LoRA training on the cached shards with DistributedDataParallel (or FSDP2, parallel.fsdp).

    python -m flux_lora train --model M --cache-dir CACHE --output OUT          # 1 process (CPU or 1 GPU)
    torchrun --nproc_per_node=8 -m flux_lora train --config configs/flux-dev-512.yaml

Every rank loads the transformer, adds the same LoRA, and takes its slice of each global batch;
DDP averages gradients. Rank 0 writes checkpoints, events and the LoRA. A signal, a non-finite
loss or a failing rank becomes every rank's decision through the one all-reduce per step.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux_lora.config import Config, load_yaml, to_dict, to_yaml
from flux_lora.data import cache, datasets
from flux_lora.errors import CacheError, CheckpointError, ConfigError, DivergedError, FluxLoraError, StoppedError
from flux_lora.fast import compiled_blocks, memory, quantize
from flux_lora.fast.compiled_blocks import zero_grad
from flux_lora.fast.gc_freeze import GcPauses, frozen_gc_after_warmup
from flux_lora.models import families, fingerprint, loading
from flux_lora.models.families.base import Family
from flux_lora.outputs import files, model_card, trackers
from flux_lora.outputs.events import NullReporter, Reporter, holding
from flux_lora.outputs.plot import write_loss_plot
from flux_lora.outputs.previews import Previewer
from flux_lora.parallel import session
from flux_lora.parallel.ddp import wrap_ddp
from flux_lora.parallel.fsdp import is_sharded
from flux_lora.training import checkpoint, conditioning, faults, lora, optim, plan, sharding, validation
from flux_lora.training.batches import GlobalBatchSampler, Prefetcher, pinned
from flux_lora.training.ema import Ema
from flux_lora.training.model import build_model, largest_micro_batch_tokens, micro_batch_shapes
from flux_lora.training.step import StepInputs, StepResult, Trainee, pipelined_steps
from flux_lora.training.timing import Meter, Phases, step_timings


@dataclass
class RunState:
    step: int = 0
    nonfinite_in_row: int = 0
    loss_history: list = field(default_factory=list)  # (step, loss, lr)
    best: validation.Best = field(default_factory=validation.Best)  # validation losses and the lowest


@dataclass
class Run:
    """Everything one training run holds, so the phases below take one argument."""
    cfg: Config
    di: session.DistInfo
    out: Path
    reporter: Reporter | NullReporter
    trainee: Trainee
    family: Family
    dataset: cache.CachedDataset
    sampler: GlobalBatchSampler
    inputs: StepInputs
    resume_settings: dict  # what a resume must not change
    previews: Previewer | None
    state: RunState
    train_items: list[int]  # dataset positions the sampler draws from
    validation_items: list[int]  # held out: evaluated, never trained on
    setup_phases: dict = field(default_factory=dict)  # seconds by phase (timing.Phases)


def run(cfg: Config) -> dict:
    loading.quiet_libraries()  # (imports diffusers and transformers)
    entered = time.time()  # the imports are done: the done event's start-up account starts here
    if not cfg.output.dir:
        raise CheckpointError("no output directory given; pass --output DIR")
    out = Path(cfg.output.dir)
    with session.process_group(cfg.dist.timeout_s) as di, \
            holding(out, "output", "--output", cfg.output.overwrite, "train", cfg.output.json, cfg.train.log_every) as reporter:
        return _train(cfg, di, out, reporter, {"entered": entered, "process_group": time.time()})


def _train(cfg: Config, di: session.DistInfo, out: Path, reporter, marks: dict) -> dict:
    resume_from, notes = session.main_then_share(lambda: choose_resume(cfg, out))
    slow_start = loading.uncompiled_bytecode_note()
    for note in [*notes, slow_start] if slow_start else notes:
        reporter.warning(note)
    open_trackers(cfg, out, reporter)
    stop = checkpoint.StopFlag().install()
    current = None
    try:
        t_start = time.time()
        current = setup(cfg, di, out, reporter, resume_from)
        setup_s = time.time() - t_start  # data, model, LoRA, DDP; compile follows, in step 1
        if current.state.step == 0:
            baseline(current)
        with GcPauses() as pauses:
            first_step_s = loop(current, stop, t_start, pauses)
        summary = finish(current, t_start, resume_from, step_timings(t_start, setup_s, first_step_s, pauses, marks,
                                                                     current.setup_phases))
        # DDP must be torn down while the process group lives: its destructor can otherwise
        # wait forever on a group that process_group() has already destroyed
        current = None
        gc.collect()
        return summary
    finally:
        stop.restore()


# ---------------------------------------------------------------- setup

def choose_resume(cfg: Config, out: Path) -> tuple[str | None, list[str]]:
    """Rank 0: the checkpoint to resume from (or None), and warnings about corrupt checkpoints."""
    if cfg.output.resume_from:
        if Path(cfg.output.resume_from).is_file():
            raise CheckpointError(f"--resume-from {cfg.output.resume_from} is a file; point it at a checkpoint folder, "
                                  "OUTPUT/checkpoints/step-NNNNNN (to start from a LoRA file, pass --init-lora)")
        if not Path(cfg.output.resume_from).is_dir():
            raise CheckpointError(f"--resume-from {cfg.output.resume_from} does not exist; point it at OUTPUT/checkpoints/step-NNNNNN")
        return cfg.output.resume_from, []
    has_results = any(out.glob("checkpoints/step-*")) or any(out.glob("*.safetensors"))
    if not cfg.output.resume:
        if has_results:
            raise CheckpointError(f"output directory {out} already holds a run and --no-resume was given; "
                                  "pass --overwrite to replace it or choose another --output")
        return None, []
    latest, corrupt = checkpoint.latest_valid(out)
    notes = [f"checkpoint {path} is unreadable ({why}); skipped" for path, why in corrupt]
    if latest is None and corrupt:
        raise CheckpointError(f"every checkpoint in {out / 'checkpoints'} is unreadable ({corrupt[0][0].name}: "
                              f"{corrupt[0][1]}); pass --resume-from a good one, or --no-resume --overwrite to start over")
    return (str(latest) if latest else None), notes


def resume_settings(cfg: Config, world: int, manifest: dict) -> dict:
    """What must not change between a checkpoint and its resume (the numbers depend on it)."""
    train_cfg, lora_cfg = cfg.train, cfg.lora
    out = {"lora.rank": lora_cfg.rank, **({"lora.kind": lora_cfg.kind} if lora_cfg.kind != "lora" else {}), "lora.alpha": lora_cfg.alpha, "lora.targets": lora_cfg.targets,
           **({"lora.init": lora_cfg.init} if lora_cfg.init else {}),
           "lora.dropout": lora_cfg.dropout, "train.lr": train_cfg.lr, "train.lr_b_factor": train_cfg.lr_b_factor,
           "train.weight_decay": train_cfg.weight_decay, "train.warmup_steps": train_cfg.warmup_steps,
           "train.schedule": train_cfg.schedule, "train.max_grad_norm": train_cfg.max_grad_norm,
           "train.seed": train_cfg.seed, "train.guidance": train_cfg.guidance,
           "train.timestep_sampling": train_cfg.timestep_sampling, "train.caption_dropout": train_cfg.caption_dropout,
           "train.ema_decay": train_cfg.ema_decay,
           **({} if train_cfg.masked_loss else {"train.masked_loss": False}),
           **({"train.preservation_weight": train_cfg.preservation_weight} if train_cfg.preservation_weight else {}), "train.logit_mean": train_cfg.logit_mean,
           "train.logit_std": train_cfg.logit_std, "train.validation_split": train_cfg.validation_split,
           "train.validation_timesteps": train_cfg.validation_timesteps,
           "global batch (batch_size × ranks × grad_accum)": train_cfg.batch_size * world * train_cfg.grad_accum,
           "cache": manifest["fingerprint"] + ":" + ",".join(s["sha256"][:12] for s in cache.all_shards(manifest)),
           "model (family, transformer config and weights)": fingerprint.transformer_identity(cfg.model.path, cfg.model.revision,
                                                                                                     cfg.model.transformer_file)}
    if train_cfg.schedule != "constant":
        out["train.steps"] = train_cfg.steps
    if dataset_weights(cfg, manifest) is not None:  # (only with regularization images: older checkpoints keep theirs)
        out["train.prior_loss_weight"] = train_cfg.prior_loss_weight
    if train_cfg.optimizer != "adamw":  # checkpoints from before the choice existed were AdamW's
        out["train.optimizer"] = train_cfg.optimizer
    return out


def split_items(cfg: Config, dataset: cache.CachedDataset, manifest: dict, reporter) -> tuple[set[int], list[int]]:
    """(held-out items, the items the sampler draws from: each as often per epoch as a datasets
    file's repeats say)."""
    held = validation.held_out_items(dataset, cfg.train.validation_split)
    train_items = [k for k in range(len(dataset)) if k not in held]
    train_items = datasets.repeated(train_items, [dataset.items[k].index for k in train_items], manifest.get("datasets"))
    if cfg.train.validation_split and not held:
        reporter.warning(f"train.validation_split={cfg.train.validation_split} holds out nothing: the cache has "
                         f"{len(dataset)} item(s); add images or set it to 0")
    return held, train_items


def check_export_format(cfg: Config, family: Family) -> None:
    if cfg.output.export_format == "kohya" and not family.kohya_export:
        raise ConfigError(f"output.export_format=kohya covers FLUX.1 and Kontext, not {family.title}; use diffusers")
    if cfg.output.export_format == "kohya" and cfg.lora.kind == "dora":
        raise ConfigError("output.export_format=kohya writes plain LoRA layers; a DoRA's magnitudes need the "
                          "diffusers file (which diffusers loads): use export_format=diffusers")


def setup(cfg: Config, di: session.DistInfo, out: Path, reporter, resume_from: str | None) -> Run:
    phases = Phases()
    manifest, dataset = cache.open_for_training(cfg, di)
    held, train_items = split_items(cfg, dataset, manifest, reporter)
    buckets = {it.bucket for it in dataset.items}
    family = families.of_model(cfg.model.path, cfg.model.revision)
    check_export_format(cfg, family)
    phases.mark("data")
    tokens = largest_micro_batch_tokens(buckets, manifest["max_sequence_length"], cfg.train.batch_size, family.paired)
    choice = sharding.choose(cfg, di, family, tokens)
    if choice.why:
        reporter.info(choice.why)
    dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
    too_big = plan.check_at_start(
        cfg, di.device, lambda: sharding.planned_sizes(family, cfg.model.path, cfg.model.revision, dtype, cfg.lora),
        plan.workload_of(manifest, cfg, di.world_size, family.paired), choice.mode,
        quantize.has_fp8_tensor_cores(di.device))
    if too_big:
        reporter.info(f"warning: {too_big}")  # now, before the model loads; the event follows the start event
    if cfg.train.optimizer != "adamw":  # the others run on whole tensors only
        optim.check_choice(cfg.train, di.device, sharding.shards_lora(cfg, di, family, choice))
    compiled_blocks.use_compile_cache(cfg.train.compile_cache_dir)
    phases.mark("plan")
    model, n_params = build_model(cfg, di, reporter, tokens, micro_batch_shapes(buckets), family, choice.mode, phases)
    ddp = model if is_sharded(model) else wrap_ddp(model, di, cfg.dist.bucket_mb, cfg.dist.average_per_bucket)
    opt, sched = optim.make_optimizer(model, cfg.train, di.device)
    phases.mark("ddp_and_optimizer")
    trainee = Trainee(model, ddp, opt, sched, Ema(lora.lora_parameters(model), cfg.train.ema_decay)
                      if cfg.train.ema_decay else None)
    train_cfg = cfg.train
    settings = resume_settings(cfg, di.world_size, manifest)
    state = resume(resume_from, trainee, settings) if resume_from else RunState()
    phases.mark("resume")
    files.write_atomic(out / "config.yaml", to_yaml(cfg))
    sampler = GlobalBatchSampler([dataset.items[k].bucket for k in train_items],
                                 train_cfg.batch_size * di.world_size * train_cfg.grad_accum, train_cfg.seed)
    has_guidance = bool(getattr(model.config, "guidance_embeds", False))
    inputs = StepInputs(train_cfg.seed, train_cfg.guidance if has_guidance else None, train_cfg.timestep_sampling,
                        train_cfg.logit_mean, train_cfg.logit_std, di.device, dtype,
                        family, caption_dropout=train_cfg.caption_dropout, empty_prompt=empty_prompt(cfg, family),
                        masked_loss=train_cfg.masked_loss, preservation_weight=preservation_weight(cfg, dataset),
                        dataset_weights=dataset_weights(cfg, manifest))
    previews = make_previewer(cfg, di, manifest, model, reporter, family, dataset)
    phases.mark("previews")
    reporter.start(train_cfg.steps, "train", world_size=di.world_size, dataset_size=len(train_items), family=family.name,
                   sharding="fsdp" if is_sharded(model) else "ddp",
                   validation_items=len(held),
                   total_steps=train_cfg.steps, start_step=state.step, lora_parameters=n_params,
                   global_batch=sampler.global_batch, cpu_threads=torch.get_num_threads(), resumed_from=resume_from,
                   config=to_dict(cfg))
    if too_big:
        reporter.emit("warning", message=too_big)
    if resume_from:
        reporter.info(f"resuming from {resume_from} at step {state.step}")
    return Run(cfg, di, out, reporter, trainee, family, dataset, sampler, inputs, settings, previews, state, train_items,
               sorted(held), phases.seconds)


def preservation_weight(cfg: Config, dataset: cache.CachedDataset) -> float:
    """train.preservation_weight, when the cache holds the class-word captions it needs."""
    weight = cfg.train.preservation_weight
    if weight and not any(key.startswith("preserve_") for key in dataset[0]):
        raise CacheError(f"train.preservation_weight needs each caption with the class word, which cache "
                         f"{cfg.data.cache_dir} lacks; rerun preprocess with --class-word WORD (what the trigger "
                         "stands for, e.g. person) and --overwrite")
    return weight


def empty_prompt(cfg: Config, family: Family) -> dict | None:
    """The empty caption's embeddings when caption dropout is on."""
    if not cfg.train.caption_dropout:
        return None
    empty = cache.load_empty_prompt(Path(cfg.data.cache_dir), list(family.text_keys))
    if empty is None:
        raise CacheError(f"train.caption_dropout needs the empty caption's embedding, which cache {cfg.data.cache_dir} "
                         "lacks (it predates caption dropout); rerun the same preprocess command: it adds it without "
                         "encoding the images again")
    return empty


def dataset_weights(cfg: Config, manifest: dict) -> tuple[float, ...] | None:
    """Each dataset's loss weight: train.prior_loss_weight for regularization datasets, else 1;
    None without regularization images (the loss as before)."""
    recorded = manifest.get("datasets") or []
    if not any(d["regularization"] for d in recorded):
        return None
    return tuple(cfg.train.prior_loss_weight if d["regularization"] else 1.0 for d in recorded)


def make_previewer(cfg: Config, di: session.DistInfo, manifest: dict, model, reporter, family: Family,
                   dataset: cache.CachedDataset) -> Previewer | None:
    """Preview images of the cached sample prompts, or None when off."""
    if not cfg.train.sample_every:
        return None
    samples = cache.load_sample_prompts(Path(cfg.data.cache_dir))
    if not samples:
        reporter.warning("train.sample_every is set but the cache has no sample prompts; "
                         "pass --sample-prompt to preprocess to get preview images")
        return None
    return Previewer(cfg, di, manifest, model, samples, reporter, family, dataset)


# ---------------------------------------------------------------- the loop

def loop(current: Run, stop: checkpoint.StopFlag, t_start: float, pauses: GcPauses) -> float | None:
    """Train until the last step; returns the time to the first step (compile included). Step
    k's outputs (checkpoint, stop, divergence) see exactly the state after k: k+1's update is
    queued only after them, and dropped when the run ends at k."""
    train_cfg, state, di = current.cfg.train, current.state, current.di
    meter = Meter(train_cfg.steps, state.step, current.sampler.global_batch)
    pin = di.device.type == "cuda"

    def load(step: int):
        slices = current.sampler.rank_slices(step, di.rank, di.world_size, train_cfg.batch_size)
        batches = [current.dataset.collate([current.train_items[i] for i in part.items],
                                           conditioning.caption_picks(train_cfg.seed, step, part.positions))
                   for part in slices]
        return slices, [pinned(b) for b in batches] if pin else batches

    prefetch = Prefetcher(load, train_cfg.steps)
    steps = pipelined_steps(current.trainee, prefetch.get, state.step, train_cfg.steps, current.inputs,
                            train_cfg.max_grad_norm, di.world_size, lambda: stop.raised)
    try:
        with frozen_gc_after_warmup(train_cfg.gc_freeze, state.step) as after_step:
            for _, result in steps:
                ending = book_step(current, result, stop, meter)
                if ending:
                    zero_grad(current.trainee.model, current.trainee.opt)  # the next step's: not applied
                    save_state(current)
                    raise _collective(ending)
                if after_step(state.step):
                    pauses.steady()
    finally:
        steps.close()
        prefetch.close()
    return meter.t_first - t_start if meter.t_first else None


def book_step(current: Run, result: StepResult, stop: checkpoint.StopFlag, meter: Meter) -> FluxLoraError | None:
    """Record one finished step; returns the error that ends the run after it, if any."""
    train_cfg, state = current.cfg.train, current.state
    state.step += 1
    state.nonfinite_in_row = state.nonfinite_in_row + 1 if result.skipped else 0
    if result.skipped:
        current.reporter.warning(f"non-finite loss at step {state.step}; step skipped "
                                 f"({state.nonfinite_in_row}/{train_cfg.max_nonfinite} in a row)", step=state.step)
    state.loss_history.append((state.step, result.loss, result.lr))
    current.reporter.progress(state.step, **meter.update(state.step, result.loss, result.lr))
    if state.nonfinite_in_row >= train_cfg.max_nonfinite:
        return DivergedError(f"loss was non-finite {state.nonfinite_in_row} steps in a row at step {state.step}; "
                             "checkpoint saved from before the divergence; lower --lr and rerun")
    started = time.time()
    periodic_outputs(current)
    meter.exclude(time.time() - started)  # previews and checkpoints: not in the training rate
    faults.after_step(state.step, current.di.rank)
    if result.stop:
        return StoppedError(f"stopped at step {state.step} ({stop.signal_name or 'a signal'}); "
                            "rerun the same command to resume")
    return None


def periodic_outputs(current: Run) -> None:
    train_cfg, step = current.cfg.train, current.state.step
    if step == train_cfg.steps:
        return  # the end of the run writes everything once
    if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0:
        save_state(current)
    if train_cfg.save_every and step % train_cfg.save_every == 0:
        export_everywhere(current, current.out / f"lora-step-{step:06d}.safetensors")
    if current.previews and train_cfg.sample_every and step % train_cfg.sample_every == 0:
        with optim.averaged_weights(current.trainee.opt):
            current.previews(step)


# ---------------------------------------------------------------- the end

def finish(current: Run, t_start: float, resume_from: str | None, timings: dict) -> dict:
    state, model = current.state, current.trainee.model
    saved = resume_from is None or state.step > checkpoint.saved_step(resume_from)
    if saved:
        save_state(current)  # with loss.png
    evaluate(current)  # a no-op when the save above evaluated this step
    final = current.out / "lora.safetensors"
    export_everywhere(current, final)
    if current.trainee.ema is not None:
        with current.trainee.ema.applied():
            export_everywhere(current, current.out / "lora-ema.safetensors")
    if current.previews:
        with optim.averaged_weights(current.trainee.opt):
            current.previews(state.step)
    if not saved:
        write_loss_plot(current.out / "loss.png", state.loss_history, state.best.history)
    shared_outcome(lambda: model_card.write_model_card(current.out, card_info(current)), "the model card README.md")
    digests = session.gather_objects(lora.digest(lora.lora_state_dict(model)))
    if len(set(digests)) > 1:
        current.reporter.warning(f"LoRA weights differ between ranks at the end ({len(set(digests))} versions); "
                                 "rank 0's were saved")
    finite = [x[1] for x in state.loss_history if math.isfinite(x[1])]
    summary = {"lora": str(final), "steps": state.step, "ranks_agree": len(set(digests)) == 1,
               "final_loss": finite[-1] if finite else None, **timings, "elapsed_s": time.time() - t_start,
               "host_peak_rss_mib_per_rank": session.gather_objects(memory.host_peak_rss_mib())}
    if state.best.history:
        summary["best"] = {"path": str(current.out / "best.safetensors"), "step": state.best.step,
                           "validation_loss": state.best.loss, "reason": state.best.reason()}
    publish(current)
    current.reporter.done(**summary)
    current.reporter.info(f"LoRA written to {final}")
    return summary


def publish(current: Run) -> None:
    """--push-to-hub: rank 0 uploads the finished run; a failure is a warning (the LoRA is written)."""
    repo = current.cfg.output.push_to_hub
    if not repo or not current.di.is_main:
        return
    try:
        url = model_card.push_to_hub(current.out, repo)
        current.reporter.info(f"pushed to {url}")
    except OSError as e:
        current.reporter.warning(f"could not push to {repo} ({e}); the run is complete in {current.out}: "
                                 f"`hf auth login`, then `hf upload {repo} {current.out}`")


def card_info(current: Run) -> model_card.CardInfo:
    """What the model card says: the base, the trigger word and resolution the cache was built
    with, the settings that shaped the LoRA, the latest preview, the files."""
    cfg, out = current.cfg, current.out
    cache_dir = Path(cfg.data.cache_dir)
    built = load_yaml(cache_dir / "config.yaml") if (cache_dir / "config.yaml").is_file() else {}
    trigger = str((built.get("data") or {}).get("trigger_word") or "")
    built_with = files.read_json(cache_dir / "settings.json") or {"resolution": cfg.data.resolution}
    resolution = ", ".join(map(str, cache.resolutions_of(built_with)))
    settings = {"steps": current.state.step, "global batch": current.sampler.global_batch, "resolution": resolution,
                "learning rate": cfg.train.lr, "LoRA rank / alpha": f"{cfg.lora.rank} / {cfg.lora.alpha:g}",
                "LoRA targets": cfg.lora.targets, "images": len(current.train_items), "GPUs": current.di.world_size}
    if current.state.best.history:
        settings["best validation loss"] = f"{current.state.best.loss:.5f} at step {current.state.best.step}"
    previews = sorted((out / "samples").glob("step-*.png"))
    lora_files = [p.name for p in (out / "lora.safetensors", out / "lora-kohya.safetensors", out / "best.safetensors")
                  if p.is_file()]
    return model_card.CardInfo(cfg.model.path, current.family.title, current.family.pipeline_class, trigger, settings,
                               f"samples/{previews[-1].name}" if previews else None, lora_files,
                               "lora-kohya.safetensors" in lora_files, current.family.paired)


def baseline(current: Run) -> None:
    """Step 0 of a fresh run: what the base model gives, to compare every later figure with
    (the validation loss, and preview images at the same seeds)."""
    evaluate(current)
    if current.previews:
        with optim.averaged_weights(current.trainee.opt):
            current.previews(0)


def evaluate(current: Run) -> None:
    """Validation loss at this step (once per step), its event, and best.safetensors when it is
    the lowest so far (the step's LoRA: the checkpoint written at this step holds the same)."""
    state, tc = current.state, current.cfg.train
    if not current.validation_items or any(s == state.step for s, _ in state.best.history):
        return
    with optim.averaged_weights(current.trainee.opt):
        loss = validation.validation_loss(current.trainee.model, current.dataset, current.validation_items,
                                          validation.timesteps(tc.validation_timesteps), current.inputs.guidance,
                                          current.inputs.device, current.inputs.dtype, current.family)
    is_best = state.best.record(state.step, loss)
    current.reporter.emit("validation", step=state.step, loss=loss, items=len(current.validation_items), best=is_best)
    if is_best:
        export_everywhere(current, current.out / "best.safetensors")


def _collective(error: FluxLoraError) -> FluxLoraError:
    """Mark an error that every rank raises together (decided through a collective)."""
    error.shared = True
    return error


# ---------------------------------------------------------------- checkpoints

def resume(path: str, trainee: Trainee, current_settings: dict) -> RunState:
    saved = checkpoint.load_checkpoint(Path(path))
    diffs = checkpoint.config_differences(saved["state"].get("math", {}), current_settings)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: settings changed ({'; '.join(diffs)}); "
                          "restore them, or pass --no-resume --overwrite to start over")
    checkpoint.resume_into(saved, trainee.model, trainee.opt, trainee.sched, trainee.ema)
    return RunState(step=saved["state"]["step"], loss_history=[tuple(x) for x in saved["state"].get("loss_history", [])],
                    best=validation.Best.from_state(saved["state"].get("validation")))


def open_trackers(cfg: Config, out: Path, reporter) -> None:
    """output.log_to's trackers, on the rank that writes the events; one that cannot start (its
    package missing, wandb not logged in) stops every rank with its one line."""
    failure = None
    if cfg.output.log_to and isinstance(reporter, Reporter):
        try:
            reporter.trackers = trackers.open_trackers(cfg.output.log_to, out, cfg.output.wandb_project, reporter.info)
        except ConfigError as e:
            failure = str(e)
        except Exception as e:  # noqa: BLE001 - a tracker library's own failure, told to every rank
            failure = f"output.log_to: {type(e).__name__}: {e}"
    failure = session.broadcast_object(failure)
    if failure:
        raise _collective(ConfigError(failure))


def shared_outcome(write, what: str):
    """Run a write that every rank calls and rank 0 performs; a failure on rank 0 (a full disk, a
    permission) becomes every rank's error, naming the file, instead of rank 0 dying alone."""
    failure, result = None, None
    try:
        result = write()
    except CheckpointError as e:
        failure = str(e)
    except OSError as e:
        failure = f"cannot write {what} ({e.strerror or e}); free disk space or fix permissions, then rerun to resume"
    failure = session.broadcast_object(failure)
    if failure:
        raise _collective(CheckpointError(failure))
    return result


def export_everywhere(current: Run, path: Path) -> None:
    with optim.averaged_weights(current.trainee.opt):
        shared_outcome(lambda: lora.export_lora(path, current.trainee.model, current.cfg.output.export_format,
                                                current.family, current.cfg.output.save_dtype), str(path))


def save_state(current: Run) -> None:
    """A checkpoint of the current step (rank 0 writes; every rank learns if it failed). The
    global RNG state is kept for completeness: noise and timesteps come from (seed, step, sample
    position) and the data order from (seed, epoch), so an exact resume does not need it."""
    trainee, state = current.trainee, current.state
    evaluate(current)
    about = {"math": current.resume_settings, "loss_history": state.loss_history, "validation": state.best.to_state(),
             "sampler": {"step": state.step, "global_batch": current.sampler.global_batch,
                         "batches_per_epoch": current.sampler.batches_per_epoch},
             "world_size": current.di.world_size}
    keep = current.cfg.train.keep_checkpoints
    if is_sharded(trainee.model):
        path = shared_outcome(lambda: checkpoint.save_sharded_checkpoint(
            current.out, state.step, trainee.model, trainee.opt, {**about, "scheduler": trainee.sched.state_dict()},
            keep, trainee.ema.state() if trainee.ema else None), f"the checkpoint of step {state.step}")
    else:
        path = shared_outcome(lambda: checkpoint.save_checkpoint(
            current.out, state.step, lora.lora_state_dict(trainee.model),
            {"optimizer": trainee.opt.state_dict(), "scheduler": trainee.sched.state_dict(),
             "rng": {"cpu": torch.get_rng_state()},
             **({"ema": {n: t.detach().cpu() for n, t in trainee.ema.state().items()}} if trainee.ema else {})},
            about, keep), f"the checkpoint of step {state.step}")
    if path:
        current.reporter.emit("checkpoint", step=state.step, path=str(path))
        write_loss_plot(current.out / "loss.png", state.loss_history, state.best.history)
