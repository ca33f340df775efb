"""Command line: `python -m flux_lora COMMAND` or `torchrun --nproc_per_node=N -m flux_lora COMMAND`.

Each command builds a Config (defaults < --config YAML < flags < --set) and calls one stage's
run(cfg). No torch import at module level, so --help stays fast. A FluxLoraError becomes one
stderr line and a documented exit code:
    0 done, 1 internal error, 2 bad input or config, 3 stopped on a signal (rerun to resume),
    4 training diverged, 5 another rank failed.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from flux_lora.errors import FluxLoraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train FLUX LoRA adapters (FLUX.1, Kontext, FLUX.2): preprocess images into a cache, then train with DDP.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (sections: model, data, preprocess, lora, train, output, dist)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override any key: --set train.lr=2e-4 (repeatable; wins over flags)")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks (or set FLUX_LORA_DEBUG=1)")]
JsonOpt = Annotated[Optional[bool], typer.Option("--json/--no-json", help="JSON-lines events on stdout; human text stays on stderr")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="diffusers directory or hub id: FLUX.1, FLUX.1 Kontext, FLUX.2 [klein] or [dev] (the family is read from its model_index.json)")]
CacheOpt = Annotated[Optional[str], typer.Option("--cache-dir", help="cache directory (preprocess writes, train reads)")]


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def guarded(fn: Callable[[], object], debug: bool) -> None:
    """Run a stage; turn errors into one stderr line and an exit code."""
    debug = debug or os.environ.get("FLUX_LORA_DEBUG") == "1"
    world = int(os.environ.get("WORLD_SIZE", 1))
    tag = f"rank {_rank()}: " if world > 1 else ""
    try:
        fn()
    except FluxLoraError as e:
        if debug:
            raise
        shared = getattr(e, "shared", False)  # raised alike on every rank: rank 0 speaks for all
        if not (shared and _rank() != 0):
            print(f"{tag}error: {e}", file=sys.stderr, flush=True)
        _exit(e.exit_code, world > 1)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - a crash still gets one line naming the rank and the cause
        if debug:
            raise
        hint = "; lower --batch-size or use --memory-mode fp8/nf4" if type(e).__name__ == "OutOfMemoryError" else ""
        if "deterministic implementation" in str(e):
            hint = "; that op has no deterministic kernel: set train.deterministic=false"
        msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        print(f"{tag}failed: {type(e).__name__}: {msg}{hint} (rerun with --debug for the traceback)",
              file=sys.stderr, flush=True)
        _exit(1, world > 1)


def _exit(code: int, hard: bool) -> None:
    """Leave with `code`. In a multi-rank run every failing rank exits at once: a rank that failed
    alone has peers blocked in a collective, and a normal interpreter shutdown (DDP and process
    group destructors) can wait on them forever. Its exit closes the sockets, so the peers fail
    fast and torchrun ends the job. Everything worth keeping was written before the raise."""
    if hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code) from None


def _build(config: Optional[Path], flags: dict, sets: Optional[list[str]]):
    from flux_lora.config import build_config

    return build_config(config, flags, sets or [])


@app.command("make-tiny")
def make_tiny_cmd(
    out_dir: Annotated[Path, typer.Argument(help="where to write the tiny pipeline")],
    seed: Annotated[int, typer.Option(help="weights seed")] = 0,
    family: Annotated[str, typer.Option(help="flux1, flux1-kontext, flux2 (FLUX.2 [dev]) or flux2-klein")] = "flux1",
    debug: DebugOpt = False,
) -> None:
    """Write a tiny random pipeline of a model family (diffusers layout) plus a tiny captioner in DIR/captioner."""
    def go():
        from flux_lora.models import families
        from flux_lora.models.loading import quiet_libraries
        from flux_lora.models.tiny import make_tiny

        quiet_libraries()
        title = families.by_name(family).title
        make_tiny(out_dir, seed, family)
        print(f"tiny {title} pipeline written to {out_dir}", file=sys.stderr)
    guarded(go, debug)


@app.command("demo-data")
def demo_data_cmd(
    out_dir: Annotated[Path, typer.Argument(help="where to write the images")],
    count: Annotated[int, typer.Option(help="number of images")] = 12,
    seed: int = 0,
) -> None:
    """Write a small synthetic image set (some with .txt captions, some without) for the demo."""
    from flux_lora.data.demo import make_images

    make_images(out_dir, count, seed)
    print(f"{count} demo images written to {out_dir}", file=sys.stderr)


@app.command()
def preprocess(
    model: ModelOpt = None,
    model_transformer: Annotated[Optional[str], typer.Option(help="a single-file transformer the cache is for (recorded in its fingerprint; train must pass the same)")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="image folder, .zip, or http(s) URL of a zip (Kontext: targets + control/ images of the same stem, or NAME_control.EXT)")] = None,
    cache_dir: CacheOpt = None,
    resolution: Annotated[Optional[str], typer.Option(help="target side in pixels (multiple of 16), or several: 512,768,1024 (each image cached at each; the text once)")] = None,
    add_resolution: Annotated[Optional[str], typer.Option(help="add resolution(s), e.g. 1024, to the finished cache in --cache-dir: only their latents are encoded; other settings come from the cache's config.yaml unless given")] = None,
    square: Annotated[Optional[bool], typer.Option("--square/--buckets", help="center-crop squares instead of aspect buckets")] = None,
    trigger_word: Annotated[Optional[str], typer.Option(help="word prepended to every caption")] = None,
    captioner: Annotated[Optional[str], typer.Option(help="captioner for images without .txt (BLIP, Florence-2, Qwen2.5-VL/Qwen3-VL, LLaVA/JoyCaption: id or path), or none")] = None,
    caption_prompt: Annotated[Optional[str], typer.Option(help="what the captioner is asked (Florence-2: a task such as <DETAILED_CAPTION>; Qwen-VL, JoyCaption: an instruction)")] = None,
    default_caption: Annotated[Optional[str], typer.Option(help="caption when --captioner none")] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="text tokens per caption (T5 for FLUX.1, Mistral/Qwen3 for FLUX.2)")] = None,
    sample_prompt: Annotated[Optional[list[str]], typer.Option("--sample-prompt", help="prompt for train's preview images (repeatable)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="images per encoder batch")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="image decoding worker processes")] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="fail on unreadable images")] = None,
    class_word: Annotated[Optional[str], typer.Option(help="what the trigger word stands for (e.g. person): also caches each caption with it in the trigger's place, for --preservation-weight")] = None,
    caption_lines: Annotated[Optional[bool], typer.Option("--caption-lines/--no-caption-lines", help="each line of a .txt is one caption of the image")] = None,
    caption_extension: Annotated[Optional[str], typer.Option(help="extension of the caption file beside each image (default .txt; kohya's .caption)")] = None,
    follow_symlinks: Annotated[Optional[bool], typer.Option("--follow-symlinks/--no-follow-symlinks", help="read images, captions and folders that are symbolic links (off: skipped, named)")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="rebuild an existing cache")] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code/--no-trust-remote-code", help="allow the captioner's own code")] = None,
    json_events: JsonOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Stage 1: caption, resize and encode images into CACHE (rank r handles items r, r+N, ...)."""
    flags = {"model.path": model, "model.transformer_file": model_transformer, "data.source": data, "data.cache_dir": cache_dir,
             "data.square": square, "data.trigger_word": trigger_word, "data.captioner": captioner, "data.caption_prompt": caption_prompt,
             "data.default_caption": default_caption, "data.max_sequence_length": max_sequence_length,
             "data.sample_prompts": sample_prompt or None, "preprocess.batch_size": batch_size,
             "preprocess.num_workers": num_workers, "data.strict": strict, "data.caption_lines": caption_lines,
             "data.caption_extension": caption_extension, "data.follow_symlinks": follow_symlinks, "data.class_word": class_word, "preprocess.overwrite": overwrite,
             "data.trust_remote_code": trust_remote_code, "output.json": json_events}

    def go():
        from flux_lora.config import data_resolution_flags
        from flux_lora.data import preprocess as stage

        flags.update(data_resolution_flags(resolution))
        if add_resolution is not None:
            stage.run(stage.extension_config(cache_dir, add_resolution, config, flags, set_))
        else:
            stage.run(_build(config, flags, set_))
    guarded(go, debug)


TRAIN_FLAGS = {  # train's options -> config keys
    "model": "model.path", "model_transformer": "model.transformer_file", "cache_dir": "data.cache_dir",
    "output": "output.dir", "steps": "train.steps", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "lr": "train.lr", "seed": "train.seed", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "init_lora": "lora.init", "lora_kind": "lora.kind", "targets": "lora.targets",
    "guidance": "train.guidance", "timestep_sampling": "train.timestep_sampling", "save_every": "train.save_every",
    "checkpoint_every": "train.checkpoint_every", "sample_every": "train.sample_every",
    "validation_split": "train.validation_split", "optimizer": "train.optimizer", "schedule": "train.schedule",
    "warmup_steps": "train.warmup_steps", "caption_dropout": "train.caption_dropout",
    "preservation_weight": "train.preservation_weight", "ema_decay": "train.ema_decay",
    "memory_mode": "train.memory_mode", "compile_": "train.compile", "sharding": "dist.sharding",
    "export_format": "output.export_format", "save_dtype": "output.save_dtype", "push_to_hub": "output.push_to_hub",
    "log_to": "output.log_to", "resume_from": "output.resume_from", "resume": "output.resume",
    "overwrite": "output.overwrite", "json_events": "output.json",
}


@app.command()
def train(
    model: ModelOpt = None,
    model_transformer: Annotated[Optional[str], typer.Option(help="the transformer's weights from this single .safetensors (BFL or ComfyUI layout, bf16 or fp8); the rest from --model")] = None,
    cache_dir: CacheOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="output directory")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="samples per GPU per micro-step")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="micro-steps per optimizer step")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="LoRA rank")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default: rank)")] = None,
    lora_kind: Annotated[Optional[str], typer.Option(help="lora or dora")] = None,
    init_lora: Annotated[Optional[str], typer.Option(help="start from this LoRA file (diffusers or kohya/ComfyUI format)")] = None,
    targets: Annotated[Optional[str], typer.Option(help="attention, attention-mlp, all-linear or a comma list of modules")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="guidance embedding value")] = None,
    timestep_sampling: Annotated[Optional[str], typer.Option(help="uniform, logit-normal or flux-shift")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="intermediate LoRA every N steps")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="resumable checkpoint every N steps")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="preview images every N steps (and at step 0)")] = None,
    validation_split: Annotated[Optional[float], typer.Option(help="fraction of items held out; their loss picks best.safetensors")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, adamw8bit, prodigy or adamw-schedulefree")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="LR after warm-up: constant, cosine or linear")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="linear LR warm-up steps")] = None,
    preservation_weight: Annotated[Optional[float], typer.Option(help="differential output preservation: keep the LoRA's prediction on class-word captions the base model's (e.g. 1.0)")] = None,
    caption_dropout: Annotated[Optional[float], typer.Option(help="probability of training a sample on the empty caption")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA of the LoRA weights (e.g. 0.999; writes lora-ema.safetensors)")] = None,
    memory_mode: Annotated[Optional[str], typer.Option(help="fast, fp8 or nf4")] = None,
    compile_: Annotated[Optional[str], typer.Option("--compile", help="auto, on or off")] = None,
    sharding: Annotated[Optional[str], typer.Option(help="ddp (a copy of the base per GPU, fastest), fsdp (FSDP2: base sharded across the GPUs, for a model one GPU cannot hold) or auto (ddp while it fits)")] = None,
    export_format: Annotated[Optional[str], typer.Option(help="diffusers or kohya")] = None,
    save_dtype: Annotated[Optional[str], typer.Option(help="dtype of the exported LoRA files: bf16 (default), fp16 or fp32")] = None,
    log_to: Annotated[Optional[str], typer.Option(help="also log to tensorboard and/or wandb (comma-separated; pip install 'flux_lora[trackers]')")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(help="upload the model card, LoRA and previews to this Hugging Face repo at the end (OWNER/NAME)")] = None,
    resume_from: Annotated[Optional[str], typer.Option(help="checkpoint directory to resume from")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="resume from the latest checkpoint in --output")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="delete earlier results in --output")] = None,
    json_events: JsonOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Stage 2: train a LoRA on the cached shards with DDP or FSDP2; rank 0 writes OUTPUT/lora.safetensors."""
    given = locals()  # before the comprehension, whose own scope locals() would see on Python 3.11
    flags = {key: given[name] for name, key in TRAIN_FLAGS.items()}

    def go():
        from flux_lora.training import train as stage

        stage.run(_build(config, flags, set_))
    guarded(go, debug)


@app.command()
def sample(
    model: Annotated[str, typer.Option("--model", "-m", help="diffusers directory or hub id (FLUX.1, Kontext, FLUX.2)")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write (a grid for several prompts)")],
    lora: Annotated[Optional[Path], typer.Option(help="LoRA .safetensors to apply")] = None,
    model_transformer: Annotated[Optional[str], typer.Option(help="the transformer's weights from this single .safetensors (BFL or ComfyUI layout, bf16 or fp8); the rest from --model")] = None,
    seed: int = 0,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 28,
    guidance: Annotated[Optional[float], typer.Option(help="guidance scale (default: the pipeline's, 3.5 FLUX.1, 2.5 Kontext, 4 FLUX.2)")] = None,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 1024,
    max_sequence_length: Annotated[int, typer.Option(help="text tokens")] = 512,
    image: Annotated[Optional[Path], typer.Option(help="control (input) image for an editing model (Kontext)")] = None,
    debug: DebugOpt = False,
) -> None:
    """Generate an image with the model's pipeline (+ a trained LoRA) to try a result without code."""
    def go():
        from flux_lora.outputs.previews import sample_command

        sample_command(model, lora, prompt, out, seed, steps, guidance, size, max_sequence_length, image,
                       model_transformer or "")
        print(f"wrote {out}", file=sys.stderr)
    guarded(go, debug)


@app.command()
def export(
    lora: Annotated[Path, typer.Argument(help="diffusers-format LoRA .safetensors")],
    out: Annotated[Path, typer.Option("--out", help="file to write")],
    export_format: Annotated[str, typer.Option("--format", help="kohya (ComfyUI / Forge / kohya names)")] = "kohya",
    debug: DebugOpt = False,
) -> None:
    """Convert a trained LoRA to the key names ComfyUI, Forge and kohya tools read."""
    def go():
        from flux_lora.outputs.export import export_file

        export_file(lora, out, export_format)
        print(f"wrote {out}", file=sys.stderr)
    guarded(go, debug)


@app.command()
def watch(
    run_dir: Annotated[Path, typer.Argument(help="training output dir or preprocess cache dir (holds events.jsonl)")],
    serve: Annotated[Optional[str], typer.Option(help="HOST:PORT (e.g. 127.0.0.1:8765; :8765 binds to 127.0.0.1, never to all interfaces unless you name 0.0.0.0): serve a live dashboard page at / (progress, loss chart, previews; works offline, opened mid-run or after it, or through an SSH tunnel), the events as Server-Sent Events at /events and the state as JSON at /state; only the run's events and preview images are served")] = None,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds without a done/error event (0 = never)")] = 0,
    debug: DebugOpt = False,
) -> None:
    """Follow a run's events.jsonl: live progress; exit 0 at done, 1 at error."""
    def go():
        from flux_lora.outputs.watch import serve_events, watch_events

        code = serve_events(run_dir, serve, timeout) if serve else watch_events(run_dir, timeout)
        raise typer.Exit(code)
    guarded(go, debug)


@app.command()
def plan(
    model: ModelOpt = None,
    cache_dir: CacheOpt = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="samples per GPU per micro-step")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="micro-steps per optimizer step")] = None,
    resolution: Annotated[Optional[str], typer.Option(help="without a cache: the training resolution, or several: 512,1024")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs of the run (default: this machine's)")] = 0,
    gpu: Annotated[str, typer.Option(help="GPU model for the time estimate, e.g. H100, H200, A100, L40S, RTX 4090 (default: this machine's)")] = "",
    gpu_memory_gib: Annotated[float, typer.Option(help="memory per GPU in GiB (default: dist.gpu_memory_gib, else this machine's GPU)")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="print the predictions as JSON")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Before spending GPU hours: predicted peak memory per GPU, step time, run time and GPU-hours for
    each memory mode and sharding, from the model's config and the cache's buckets; flags what will not fit."""
    def go():
        import dataclasses
        import json

        import torch

        from flux_lora.config import data_resolution_flags
        from flux_lora.training import plan as planner

        cfg = _build(config, {"model.path": model, "data.cache_dir": cache_dir, "train.steps": steps,
                              "train.batch_size": batch_size, "train.grad_accum": grad_accum,
                              **data_resolution_flags(resolution)}, set_)
        cuda = torch.cuda.is_available()
        ranks = gpus or int(os.environ.get("WORLD_SIZE", 0)) or (torch.cuda.device_count() if cuda else 1)
        name = gpu or (torch.cuda.get_device_name(0) if cuda else "")
        memory_gib = gpu_memory_gib or cfg.dist.gpu_memory_gib or (
            torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0)
        text, predictions = planner.report(cfg, ranks, name, memory_gib)
        if json_out:
            print(json.dumps([{**dataclasses.asdict(p), "setting": dataclasses.asdict(p.setting)} for p in predictions]))
        else:
            print(text)
    guarded(go, debug)


@app.command("learn-check")
def learn_check(
    out: Annotated[Path, typer.Option("--out", help="folder for the concept's images, cache, run and report.json")] = Path("runs/learn-check"),
    model: Annotated[Optional[Path], typer.Option("--model", help="the small shapes model (default: models/flux-shapes of this repo)")] = None,
    steps: Annotated[int, typer.Option(help="LoRA training steps")] = 160,
    lr: Annotated[float, typer.Option(help="learning rate")] = 3e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    nproc: Annotated[int, typer.Option(help="ranks for preprocess and train (torchrun)")] = 1,
    train_set: Annotated[Optional[list[str]], typer.Option("--train-set", help="a train setting to judge, e.g. train.fp8_compute=on (repeatable)")] = None,
    preprocess_set: Annotated[Optional[list[str]], typer.Option("--preprocess-set", help="a preprocess setting, e.g. data.class_word=coloured (repeatable)")] = None,
    debug: DebugOpt = False,
) -> None:
    """Teach the small shapes model a new colour with a LoRA (the real preprocess and train), then
    measure concept score and leakage at fixed seeds; exit 1 when it did not learn or leaked."""
    def go():
        from flux_lora.evaluation import learn_check as lc
        from flux_lora.models.shapes_model import PRETRAINED

        report = lc.check(lc.Settings(model or PRETRAINED, out, steps, lr, rank, nproc=nproc,
                                      train_sets=tuple(train_set or ()), preprocess_sets=tuple(preprocess_set or ())))
        print(lc.report_line(report), file=sys.stderr)
    guarded(go, debug)


@app.command("config-reference")
def config_reference() -> None:
    """Print every config key with its default, range and meaning (Markdown; docs/config.md is this)."""
    from flux_lora.config import reference_markdown

    print("# Configuration reference\n\nEvery key of `--config FILE.yaml` and `--set section.key=value`. Generated by\n"
          "`python -m flux_lora config-reference > docs/config.md`; a test keeps it current.\n")
    print(reference_markdown())


def main() -> None:
    # before any library import: transformers warns about torchvision at import time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app(prog_name="flux_lora")
    except SystemExit as e:  # typer ends every command so, whatever its exit code
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        _leave(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)


def _leave(code: int) -> None:
    """End the process without Python's teardown of every loaded module, which after a train run
    (torch, diffusers, transformers, peft, dynamo) takes 1.3-2 s past the done event on a CPU
    core. The parts of a normal exit that matter happen first: the other (non-daemon) threads
    finish, the exit handlers run (logging, worker processes, temporary folders), and the output
    is flushed. Every file flux_lora writes is closed before its command returns."""
    threading._shutdown()  # as the interpreter's exit begins: executors told to stop, non-daemon threads joined
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
