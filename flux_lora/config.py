"""Typed configuration: one dataclass per section, loaded from YAML, CLI flags and `--set a.b=c`.

Precedence: defaults < YAML file < CLI flags < --set. Unknown keys and wrong types fail with the
key name and the valid choices, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux_lora.errors import ConfigError


def doc(default: Any, text: str, low: float | None = None, high: float | None = None, open_low: bool = False) -> Any:
    """A dataclass field with a default, a one-line description (docs/config.md) and, for numbers,
    the range it must lie in: [low, high], or (low, high] with open_low. Checked when the config
    is built, before any model loads."""
    meta = {"doc": text, "low": low, "high": high, "open_low": open_low}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_ranges(section: str, obj: Any) -> None:
    """Every number finite and inside its field's range, or one line naming the key and the range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high, open_low = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("open_low")
        bad = not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) \
            or (high is not None and value > high)
        if bad:
            bounds = ("> " if open_low else ">= ") + f"{low:g}" if low is not None else ""
            if high is not None:
                bounds += (" and " if bounds else "") + f"<= {high:g}"
            raise ConfigError(f"{section}.{f.name}={value!r} is out of range; it must be a finite number"
                              + (f" {bounds}" if bounds else "") + f" ({f.metadata.get('doc', '')})")


@dataclass
class ModelConfig:
    path: str = doc("", "FLUX.1 pipeline: a local diffusers directory or a hub id (e.g. black-forest-labs/FLUX.1-dev)")
    dtype: str = doc("auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    attention: str = doc("auto", "attention kernels: auto (cuDNN's fused attention through flux_lora's own op on Hopper GPUs, else flash), cudnn, flash, efficient, math, or default (torch's choice)")
    revision: str = doc("", "hub revision (branch, tag or commit) when path is a hub id")
    transformer_file: str = doc("", "the transformer from this single .safetensors file instead of path's transformer/ (BFL or ComfyUI layout, bf16 or fp8 e4m3 incl. ComfyUI's scaled fp8, or diffusers layout); the VAE, text encoders and the transformer's config still come from path")

    def __post_init__(self) -> None:
        check_ranges("model", self)
        _choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice("model.attention", self.attention, ("auto", "cudnn", "flash", "efficient", "math", "default"))


@dataclass
class DataConfig:
    source: str = doc("", "images: a folder, a .zip file, an http(s) URL of a zip, or a datasets .yaml listing several (each with its trigger word, default caption, repeats, regularization: flux_lora/data/datasets.py)")
    cache_dir: str = doc("", "cache directory written by preprocess and read by train")
    resolution: int = doc(512, "target side in pixels (multiple of 16); buckets keep about resolution² pixels", low=16)
    resolutions: list = doc([], "several resolutions in one cache, e.g. [512, 768, 1024] (ai-toolkit's resolution list; on the command line --resolution 512,768,1024): each image is cached at each, with buckets per resolution, and training draws every batch from one bucket of one of them; the first is data.resolution (previews use it). The text is encoded once; `preprocess --add-resolution R` adds one to a finished cache")
    square: bool = doc(False, "center-crop every image to resolution×resolution instead of aspect buckets")
    trigger_word: str = doc("", "prepended to every caption (once); replaces a [trigger] placeholder")
    caption_extension: str = doc(".txt", "the extension of an image's caption file beside it (kohya's .caption: a.jpg is captioned by a.caption)")
    caption_lines: bool = doc(False, "each non-empty line of a .txt is one caption of its image (several captions per image); a step trains on one of them, drawn from the seed, the step and the sample's position")
    class_word: str = doc("", "what the trigger word stands for (e.g. person, dog): preprocess also caches each caption with the trigger replaced by it, for train.preservation_weight (differential output preservation)")
    default_caption: str = doc("", "caption for images without a .txt when captioner is none")
    captioner: str = doc("Salesforce/blip-image-captioning-large", "image-to-text model for images without a .txt caption (BLIP, Florence-2, Qwen2.5-VL / Qwen3-VL, LLaVA / JoyCaption; its kind is read from its config), or none")
    caption_prompt: str = doc("", "what the captioner is asked: Florence-2 a task (<CAPTION>, <DETAILED_CAPTION>, default <MORE_DETAILED_CAPTION>), Qwen-VL and LLaVA/JoyCaption an instruction (default: a one-paragraph training caption); BLIP takes none")
    trust_remote_code: bool = doc(False, "allow the captioner's own code from the hub (off: only natively supported models)")
    max_sequence_length: int = doc(512, "T5 tokens per caption (FLUX.1-dev: 512, schnell: 256)", low=1)
    strict: bool = doc(False, "fail on the first unreadable image instead of skipping it with a warning")
    follow_symlinks: bool = doc(False, "read images, captions and folders of a local dataset that are symbolic links (off: each is skipped with a warning, since a link can point anywhere; on for a folder of links you made)")
    masks: str = doc("auto", "loss masks (white: learn, black: ignore): folder (masks/STEM.png beside the images, each the size of its image), alpha (each image's own alpha channel; opaque: learn), off, or auto (folder when a masks/ folder exists)")
    sample_prompts: list = doc([], "prompts encoded now so train can draw preview images without text encoders")

    def __post_init__(self) -> None:
        check_ranges("data", self)
        self.resolutions = parse_resolutions(self.resolutions)
        if self.resolutions:
            self.resolution = self.resolutions[0]
        if self.resolution <= 0 or self.resolution % 16:
            raise ConfigError(f"data.resolution={self.resolution} is not a positive multiple of 16; use e.g. 512 or 1024")
        self.sample_prompts = [str(p) for p in self.sample_prompts]
        _choice("data.masks", self.masks, ("auto", "folder", "alpha", "off"))
        ext = self.caption_extension
        if not (ext.startswith(".") and len(ext) > 1 and not any(c in ext for c in "/\\ ")) or ext == ".jsonl":
            raise ConfigError(f"data.caption_extension={ext!r} is not a file extension; use e.g. .txt or .caption")
        if self.class_word and not self.trigger_word:
            raise ConfigError("data.class_word replaces the trigger word in each caption; set data.trigger_word (--trigger-word) too")

    @property
    def sizes(self) -> list[int]:
        """Every resolution asked for, the base first: data.resolutions, else data.resolution."""
        return self.resolutions or [self.resolution]


def parse_resolutions(values) -> list[int]:
    """[512, "768,1024"] -> [512, 768, 1024]: whole numbers, multiples of 16, each once, in order."""
    out: list[int] = []
    for value in values if isinstance(values, list) else [values]:
        for part in str(value).replace(" ", "").split(","):
            if not part:
                continue
            if not part.isdigit() or int(part) <= 0 or int(part) % 16:
                raise ConfigError(f"data.resolutions: {part!r} is not a positive multiple of 16; "
                                  "give sides in pixels, e.g. --resolution 512,768,1024")
            if int(part) not in out:
                out.append(int(part))
    return out


def data_resolution_flags(text: str | None) -> dict:
    """--resolution 512 or 512,768,1024 -> the config keys it sets."""
    if text is None:
        return {}
    sides = parse_resolutions([text])
    if not sides:
        raise ConfigError(f"--resolution {text!r} names no resolution; give e.g. 512 or 512,768,1024")
    # one size also empties a config file's list: the flag wins over the YAML
    return {"data.resolution": sides[0], "data.resolutions": sides if len(sides) > 1 else []}


@dataclass
class PreprocessConfig:
    batch_size: int = doc(8, "images per encoder batch on each rank", low=1)
    caption_batch_size: int = doc(8, "images per captioner batch", low=1)
    num_workers: int = doc(-1, "worker processes decoding and resizing images while the GPU encodes; -1 = auto: this rank's share of the CPU cores less one, at most 8", low=-1)
    reduced_jpeg: bool = doc(False, "decode a JPEG at 1/2, 1/4 or 1/8 scale when it still covers its bucket (libjpeg's DCT scaling), then resize as always: half the time on a 12 MP photo at 1024 px (225 -> 112 ms on one CPU core), pixels within ~1.3/255 on average of the full decode; false (default) decodes every pixel; images with loss masks always do")
    chunk_items: int = doc(64, "items per shard file (T5 embeddings are ~4 MB per item at 512 tokens)", low=1)
    overwrite: bool = doc(False, "delete an existing cache in cache_dir and rebuild it")
    max_zip_bytes: int = doc(50 * 2**30, "refuse ZIPs whose entries unpack to more than this many bytes", low=1)
    max_image_pixels: int = doc(178_956_970, "skip (or with --strict refuse) images with more pixels than this: a decompression-bomb guard (Pillow's own limit)", low=1)
    compile: str = doc("auto", "auto, on or off: torch.compile the VAE's encoder and FLUX.1's T5-XXL: 1.45x the steady encoding rate at 1024 px on an H200 after ~20 s of compiling; auto compiles on CUDA when a rank has 1,000 or more items to encode (the break-even)")
    text_encoder_offload: str = doc("auto", "auto, on or off: keep the text encoders in host memory and stream them to the GPU layer by layer (auto: when they do not fit the GPU, e.g. FLUX.2 [dev]'s 24 B Mistral on a card under ~60 GB)")

    def __post_init__(self) -> None:
        check_ranges("preprocess", self)
        _choice("preprocess.text_encoder_offload", self.text_encoder_offload, ("auto", "on", "off"))
        _choice("preprocess.compile", self.compile, ("auto", "on", "off"))


@dataclass
class LoraConfig:
    rank: int = doc(16, "LoRA rank r", low=1)
    alpha: float = doc(0.0, "LoRA alpha (0 means alpha = rank, i.e. scale 1)", low=0)
    targets: str = doc("attention-mlp", "attention, attention-mlp, all-linear, or a comma-separated list of module names")
    dropout: float = doc(0.0, "LoRA dropout", low=0, high=0.99)
    kind: str = doc("lora", "lora, or dora (weight-decomposed LoRA, peft's use_dora: a magnitude per output channel beside A and B; needs the bf16 base, memory_mode=fast without fp8 compute; diffusers loads the file)")
    init: str = doc("", "start from this LoRA file (diffusers, kohya/ComfyUI or peft format, e.g. an earlier run's lora.safetensors) instead of zero; its rank must be lora.rank, its update is kept whatever its alpha")

    def __post_init__(self) -> None:
        check_ranges("lora", self)
        _choice("lora.kind", self.kind, ("lora", "dora"))
        if self.alpha == 0:
            self.alpha = float(self.rank)


@dataclass
class TrainConfig:
    steps: int = doc(1000, "optimizer steps", low=1)
    batch_size: int = doc(1, "samples per GPU per micro-step", low=1)
    grad_accum: int = doc(1, "micro-steps per optimizer step (global batch = batch_size × ranks × grad_accum)", low=1)
    lr: float = doc(1e-4, "AdamW learning rate", low=0, open_low=True)
    lr_b_factor: float = doc(1.0, "learning-rate multiplier for the LoRA B matrices (LoRA+; 1 = off)", low=0, open_low=True)
    weight_decay: float = doc(0.0, "AdamW weight decay", low=0)
    warmup_steps: int = doc(0, "linear warm-up steps", low=0)
    schedule: str = doc("constant", "learning rate after warm-up: constant, cosine or linear (both to zero at the last step)")
    optimizer: str = doc("adamw", "adamw (fused on CUDA), adamw8bit (bitsandbytes, CUDA), prodigy (prodigyopt: sets its own step size, use lr 1.0) or adamw-schedulefree (schedulefree: no LR schedule)")
    max_grad_norm: float = doc(1.0, "gradient clipping norm (0 = off)", low=0)
    seed: int = doc(0, "seed for LoRA init, data order, noise and timesteps", low=0)
    guidance: float = doc(1.0, "guidance embedding value (used when the model has one, e.g. FLUX.1-dev)", low=0)
    timestep_sampling: str = doc("flux-shift", "uniform, logit-normal, or flux-shift (logit-normal shifted by image size, as FLUX inference)")
    logit_mean: float = doc(0.0, "mean of the logit-normal timestep distribution")
    logit_std: float = doc(1.0, "std of the logit-normal timestep distribution", low=0, open_low=True)
    masked_loss: bool = doc(True, "weight the loss by the cache's masks where it has them (data.masks); false: learn every pixel")
    preservation_weight: float = doc(0.0, "differential output preservation (ai-toolkit's DOP): also train the LoRA's prediction on each caption with the trigger replaced by data.class_word to stay the base model's, weighted by this (e.g. 1.0; 0 = off); one more forward and backward per step", low=0)
    prior_loss_weight: float = doc(1.0, "weight of a regularization image's loss (a datasets file's regularization: true dataset; DreamBooth's prior loss weight)", low=0)
    caption_dropout: float = doc(0.0, "probability that a sample trains on the empty caption instead of its own (kohya's caption_dropout_rate): the LoRA then also works without the trigger word, and classifier-free guidance keeps working", low=0, high=0.99)
    ema_decay: float = doc(0.0, "keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999; 0 = off), saved in checkpoints and written as OUTPUT/lora-ema.safetensors", low=0, high=0.99999)
    memory_mode: str = doc("fast", "fast (bf16 base), fp8 (fp8 base and matmuls + checkpointing) or nf4 (bitsandbytes NF4 base + checkpointing)")
    gradient_checkpointing: str = doc("auto", "auto (on in fp8/nf4; in fast mode only when the largest micro-batch would not fit the GPU without it, and then for as few blocks as fit), on (every block) or off")
    checkpoint_blocks: int = doc(0, "recompute the forward of only the first N transformer blocks in the backward (gradient checkpointing on for N blocks: more speed, more memory than all of them); 0 = as train.gradient_checkpointing decides", low=0)
    compile: str = doc("auto", "per-block torch.compile: auto (on with CUDA), on or off")
    compile_cache_dir: str = doc("", "a folder for torch.compile's caches (inductor, Triton, AOTAutograd; TORCHINDUCTOR_CACHE_DIR): on a shared filesystem the other nodes of a job and every later job start with compiled blocks (measured: 57 -> 38 s to the first step at 512 px on an H200); empty: torch's own per-machine folder")
    cuda_graphs: str = doc("auto", "replay each compiled block's forward and backward as CUDA graphs (no per-kernel launch cost on the host): auto (on when the blocks are compiled on CUDA without gradient checkpointing, all buckets have one token count (each new shape records every block again) and the run has at least 1,000 micro-steps (recording costs ~6-9 s before the first step)), on or off")
    deterministic: bool = doc(False, "the same bits from every run on a GPU, a resume included (on the CPU they are anyway): deterministic kernels for the attention backward (flash; model.attention=auto), inductor's reductions (chosen by shape, not by timing them) and cuBLAS; 15% slower at 512 px on an H200 (bench/README.md)")
    fuse_qkv: bool = doc(True, "compute each attention's q, k and v (base and LoRA) as one projection, in FLUX.1's single blocks with the MLP's input projection (the checkpoint's linear1): fewer, larger matmuls; same LoRA keys (DDP only: under dist.sharding=fsdp the grouped weight would be whole on every GPU)")
    gc_freeze: bool = doc(True, "collect Python's garbage and freeze start-up's objects (libraries, model) before the first step, so the warm-up's full collections skip them (half their time or more); after the warm-up steps (compile, CUDA-graph recording, DDP's bucket rebuild) collect once and freeze what survives, so later full collections skip dynamo's and inductor's objects instead of stalling a step for up to ~0.7 s (under DDP every rank waits with it)")
    fuse_lora_up: bool = doc(True, "compute each LoRA up-projection and its add to the base output as one matmul (addmm, the add in its epilogue); a bf16 base: the whole layer as one op, whose base matmul adds the LoRA's share in its epilogue, forward and backward; +3-4% samples/s on an H100, +1.3% more with the bf16 base on an H200; off = peft's forward")
    lora_triton: bool = doc(True, "with fuse_lora_up, that add as a Triton kernel on CUDA (cuBLAS runs this rank-r matmul at half the GPU's memory bandwidth: ~10 ms of a 0.32 s step at 512 px, batch 4); false or a CPU: the addmm")
    fp8_compute: str = doc("auto", "fast mode with an fp8 frozen base (fp8 matmuls, half the weight memory; LoRA stays fp32): auto (on for GPUs with fp8 tensor cores: H100/H200/Ada), on or off")
    fp8_transposed: str = doc("auto", "fp8 base: keep a transposed copy of each weight for the backward instead of making it every step (+1 byte per base parameter, 11 GiB for FLUX.1): auto (fast mode, when the step's memory estimate leaves room without checkpointing), on or off")
    save_every: int = doc(0, "write OUTPUT/lora-step-NNNNNN.safetensors every N steps (0 = only at the end)", low=0)
    checkpoint_every: int = doc(100, "write a resumable checkpoint every N steps (and on stop)", low=0)
    keep_checkpoints: int = doc(2, "how many checkpoints to keep", low=1)
    sample_every: int = doc(0, "draw preview images of the sample prompts every N steps (0 = off)", low=0)
    sample_steps: int = doc(20, "denoising steps per preview image", low=1)
    log_every: int = doc(10, "plain progress line every N steps when stderr is not a terminal", low=1)
    max_nonfinite: int = doc(5, "stop after this many non-finite losses in a row", low=1)
    validation_split: float = doc(0.0, "fraction of the cached items held out of training; their loss at fixed timesteps and noise is measured at step 0, every checkpoint and the end, and the lowest picks OUTPUT/best.safetensors", low=0, high=0.9)
    validation_timesteps: int = doc(4, "evenly spaced timesteps each held-out item is evaluated at", low=1, high=64)

    def __post_init__(self) -> None:
        check_ranges("train", self)
        _choice("train.schedule", self.schedule, ("constant", "cosine", "linear"))
        _choice("train.optimizer", self.optimizer, ("adamw", "adamw8bit", "prodigy", "adamw-schedulefree"))
        _choice("train.timestep_sampling", self.timestep_sampling, ("uniform", "logit-normal", "flux-shift"))
        _choice("train.memory_mode", self.memory_mode, ("fast", "fp8", "nf4"))
        _choice("train.gradient_checkpointing", self.gradient_checkpointing, ("auto", "on", "off"))
        if self.checkpoint_blocks and self.gradient_checkpointing == "off":
            raise ConfigError(f"train.checkpoint_blocks={self.checkpoint_blocks} checkpoints blocks but "
                              "train.gradient_checkpointing=off; drop one of the two")
        _choice("train.compile", self.compile, ("auto", "on", "off"))
        _choice("train.cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        self.fp8_compute = {"true": "on", "false": "off"}.get(self.fp8_compute.lower(), self.fp8_compute)
        _choice("train.fp8_compute", self.fp8_compute, ("auto", "on", "off"))
        _choice("train.fp8_transposed", self.fp8_transposed, ("auto", "on", "off"))
        if self.fp8_compute == "on" and self.memory_mode == "nf4":
            raise ConfigError("train.fp8_compute does not combine with memory_mode=nf4 (a 4-bit base); "
                              "use memory_mode=fp8 for an fp8 base with checkpointing")


TRACKERS = ("tensorboard", "wandb")


@dataclass
class OutputConfig:
    dir: str = doc("", "output directory: LoRA, checkpoints, events, samples")
    json: bool = doc(False, "also print JSON events on stdout (people-facing text stays on stderr)")
    export_format: str = doc("diffusers", "diffusers, or kohya (also write lora-kohya.safetensors for ComfyUI/Forge)")
    save_dtype: str = doc("bf16", "dtype of the exported LoRA files (lora*.safetensors, best.safetensors): bf16 (half the size of fp32, what other trainers write), fp16 or fp32; checkpoints keep fp32 for an exact resume")
    resume: bool = doc(True, "resume from the latest checkpoint in the output directory")
    resume_from: str = doc("", "resume from this checkpoint directory")
    overwrite: bool = doc(False, "delete earlier results in the output directory first")
    log_to: str = doc("", "also log every event's numbers to experiment trackers: a comma-separated list of tensorboard (OUTPUT/tensorboard/) and wandb (OUTPUT/wandb/; WANDB_MODE=offline keeps it local); needs pip install 'flux_lora[trackers]'")
    wandb_project: str = doc("flux_lora", "the wandb project of output.log_to=wandb (the run is named after the output folder)")
    push_to_hub: str = doc("", "at the end of a run, upload the model card, LoRA files and previews to this Hugging Face repo (OWNER/NAME; needs `hf auth login`)")

    def __post_init__(self) -> None:
        check_ranges("output", self)
        if self.push_to_hub and self.push_to_hub.count("/") != 1:
            raise ConfigError(f"output.push_to_hub={self.push_to_hub!r} is not a repo id; use OWNER/NAME")
        _choice("output.export_format", self.export_format, ("diffusers", "kohya"))
        _choice("output.save_dtype", self.save_dtype, ("bf16", "fp16", "fp32"))
        for name in (n.strip() for n in self.log_to.split(",") if n.strip()):
            _choice("output.log_to", name, TRACKERS)


@dataclass
class DistConfig:
    timeout_s: int = doc(600, "collective timeout: a dead rank ends the job after this long, not after 30 minutes", low=1)
    bucket_mb: int = doc(0, "DDP gradient bucket size in MiB. 0 (auto): one bucket for all LoRA gradients when every rank is on one host (one all-reduce after the backward), 25 across hosts (each bucket's all-reduce overlaps the rest of the backward)", low=0)
    average_per_bucket: bool = doc(True, "divide the summed gradients by the number of ranks once per bucket (one kernel over the bucket) instead of per LoRA tensor inside DDP (~840 small kernels a step for FLUX.1); same result")
    sharding: str = doc("auto", "ddp (a whole copy of the base on every GPU: fastest while it fits), fsdp (FSDP2: the frozen base, the LoRA and its optimizer state sharded block by block across the ranks, for a base that does not fit one GPU) or auto (ddp while the estimated per-GPU peak fits the GPU, else fsdp)")
    fsdp_unit_blocks: int = doc(1, "transformer blocks per FSDP2 unit (one all-gather and one reduce-scatter each): more means fewer, larger collectives and less host work per step, and that many blocks' weights gathered at once", low=1)
    fsdp_prefetch: int = doc(1, "FSDP2 units whose weights are gathered ahead of the one running, forward and backward: 1 is FSDP2's own schedule; more gives ranks that drift apart on host work slack, at that many units' weights more per GPU (units of one block only)", low=1)
    fsdp_keep_gathered: int = doc(-1, "FSDP2: transformer blocks (the last ones) whose weights stay gathered from their forward to their backward, which then gathers nothing for them (half their traffic) at a whole block's weights each per GPU until the backward frees them; with the LoRA replicated (dist.fsdp_lora) they are not sharded at all but whole on every rank, as under DDP (the frozen base never changes): no gathers, no shard beside them and none of FSDP2's per-block host work (37 ms a step for 57 blocks on a CPU). -1 (auto): as many as the memory estimate leaves room for under the GPU's size (dist.gpu_memory_gib); 0: none (the least memory)", low=-1)
    fsdp_lora: str = doc("auto", "FSDP2: replicated (the LoRA and its optimizer state whole on every rank, outside FSDP2: one all-reduce of its gradients a step, as under DDP, and any optimizer) or sharded (with the base, block by block: the least memory). auto: replicated while the LoRA's training state (16 bytes a parameter) is at most 2% of the per-GPU memory planned for, else sharded (sharded where no GPU size is known)")
    gpu_memory_gib: float = doc(0.0, "the per-GPU memory sharding=auto and gradient_checkpointing=auto plan for (0 = the GPU's own size); set it lower to leave room for another process (set, the allocator also grows its segments in place, so fragmentation does not undo the plan)", low=0)

    def __post_init__(self) -> None:
        check_ranges("dist", self)
        _choice("dist.sharding", self.sharding, ("auto", "ddp", "fsdp"))
        _choice("dist.fsdp_lora", self.fsdp_lora, ("auto", "replicated", "sharded"))
        if self.fsdp_prefetch > 1 and self.fsdp_unit_blocks > 1:
            raise ConfigError("dist.fsdp_prefetch > 1 works on units of one block; set dist.fsdp_unit_blocks=1 or fsdp_prefetch=1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        if self.train.deterministic and self.model.attention in ("cudnn", "default"):
            raise ConfigError(f"train.deterministic needs a deterministic attention backward, and model.attention="
                              f"{self.model.attention} may run cuDNN's, which has none; use model.attention=auto, "
                              "flash, efficient or math")


def _choice(key: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def section_types() -> dict[str, type]:
    return _field_types(Config)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming the key."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            if isinstance(value, bool):  # YAML reads on/off/yes/no as booleans: the on/off choices
                return "on" if value else "off"
            return "" if value is None else str(value)
        if kind is list:
            if isinstance(value, str):
                import yaml

                parsed = yaml.safe_load(value)
                value = parsed if isinstance(parsed, list) else [value]
            if not isinstance(value, list):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _merge(raw: dict, overrides: dict[str, Any], origin: str) -> None:
    """Merge dotted `section.key` overrides into the nested raw dict, checking the keys."""
    sections = section_types()
    for dotted, value in overrides.items():
        if "." not in dotted:
            raise ConfigError(f"{origin}: '{dotted}' must be section.key; sections: {', '.join(sections)}")
        section, key = dotted.split(".", 1)
        _check_key(section, key, origin)
        raw.setdefault(section, {})[key] = value


def _check_key(section: str, key: str | None, origin: str) -> None:
    sections = section_types()
    if section not in sections:
        raise ConfigError(f"{origin}: unknown section '{section}'; valid sections: {', '.join(sections)}")
    if key is not None:
        valid = [f.name for f in dataclasses.fields(sections[section])]
        if key not in valid:
            raise ConfigError(f"{origin}: unknown key '{section}.{key}'; valid keys in '{section}': {', '.join(valid)}")


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the --config path")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must be a mapping of sections (model:, data:, train:, ...)")
    for section, body in raw.items():
        _check_key(str(section), None, str(p))
        if not isinstance(body, dict):
            raise ConfigError(f"{p}: section '{section}' must be a mapping of keys")
        for key in body:
            _check_key(str(section), str(key), str(p))
    return raw


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def build_config(yaml_path: str | Path | None = None, flags: dict[str, Any] | None = None,
                 sets: list[str] | None = None) -> Config:
    """defaults < YAML < flags (already dotted, None = not given) < --set."""
    raw: dict = load_yaml(yaml_path) if yaml_path else {}
    _merge(raw, {k: v for k, v in (flags or {}).items() if v is not None}, "command line")
    _merge(raw, parse_set(sets or []), "--set")
    sections = section_types()
    built = {}
    for name, cls in sections.items():
        body = raw.get(name, {})
        types = _field_types(cls)
        kwargs = {k: _coerce(f"{name}.{k}", v, types[k]) for k, v in body.items()}
        built[name] = cls(**kwargs)
    return Config(**built)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference_markdown() -> str:
    """The config reference table for the README, generated from the field docs."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in section_types().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{name}.{f.name}` | `{default!r}` | {f.metadata.get('doc', '')} |")
    return "\n".join(lines)
