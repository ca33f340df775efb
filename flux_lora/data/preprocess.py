"""Stage 1: images -> cache of VAE latents and text embeddings, as the model's family encodes them
(FLUX.1/Kontext: CLIP + T5; FLUX.2: Mistral or Qwen3 hidden states; editing pairs: the control
image's latents beside the target's).

    python -m flux_lora preprocess --model M --data IMAGES --cache-dir CACHE
    torchrun --nproc_per_node=8 -m flux_lora preprocess --config configs/flux-dev-1024.yaml

Rank r of N handles items r, r+N, ... and writes them in chunks; rank 0 writes the manifest after
all ranks are done. A rerun skips chunks that are already complete and valid.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flux_lora.config import Config, build_config, parse_resolutions
from flux_lora.data import cache, datasets
from flux_lora.data.captions import Captioner, apply_trigger, replace_trigger
from flux_lora.data.images import load_for_bucket, load_mask, load_rgb, make_buckets, resize_to_bucket
from flux_lora.data.sources import (IMAGE_SUFFIXES, UNREADABLE_KINDS, SourceImage, attach_masks, pair_controls,
                                    resolve_source, scan, supported_kinds)
from flux_lora.errors import CacheError, ConfigError, DataError
from flux_lora.fast import compiled_encoders, memory, wide_attention
from flux_lora.models import families, loading, placement
from flux_lora.models.families.base import Family, host_copies_queued, to_device
from flux_lora.outputs import files
from flux_lora.outputs.display import Display
from flux_lora.outputs.events import holding
from flux_lora.parallel import session


class DecodedImages(torch.utils.data.Dataset):
    """Decode + resize in DataLoader workers so the GPU never waits for PIL."""

    def __init__(self, entries: list[tuple[int, SourceImage]], buckets: list[tuple[int, int]], max_pixels: int,
                 reduced_jpeg: bool = False):
        self.entries, self.buckets, self.max_pixels, self.reduced_jpeg = entries, buckets, max_pixels, reduced_jpeg

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, k: int) -> dict:
        index, src = self.entries[k]
        try:
            masked = src.mask is not None or src.mask_from_alpha  # a mask must match its image's full size
            im, bucket = load_for_bucket(src.path, self.buckets, self.max_pixels, self.reduced_jpeg and not masked)
            control = load_rgb(src.control, self.max_pixels) if src.control is not None else None
            mask = None
            if masked:
                mask = load_mask(src.path if src.mask_from_alpha else src.mask, im.size, src.mask_from_alpha, src.name)
        except DataError as e:
            return {"index": index, "error": str(e)}
        out = {"index": index, "pixels": _tensor(resize_to_bucket(im, bucket)), "bucket": bucket}
        if mask is not None:  # cropped exactly as its image
            out["mask"] = torch.from_numpy(np.asarray(resize_to_bucket(mask, bucket)).copy())
        if control is not None:  # the pair is bucketed by its target; the control takes the same size
            out["control"] = _tensor(resize_to_bucket(control, bucket))
        return out


def _tensor(im) -> torch.Tensor:
    """[3, H, W] uint8, contiguous: the worker pays the transpose, not the main process's stack."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))


def stacked_on(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors stacked on the device, through pinned memory on CUDA (a queued copy)."""
    staged = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=device.type == "cuda")
    return to_device(torch.stack(tensors, out=staged), device)


DECODED_AHEAD = 128  # images decoded ahead at most, whatever preprocess.chunk_items says (~400 MB at 1024 px)


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPU cores this process may use: its affinity (SLURM's and taskset's cpusets), at most
    its cgroup's CPU quota (a container's --cpus, Kubernetes' limits), which affinity does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # cgroup v1 or none: the affinity stands
    return cores


def decode_workers(setting: int, cores: int | None = None) -> int:
    """preprocess.num_workers resolved: as set, or for auto (-1) this rank's share of the usable
    CPU cores, less one for itself, at most 8 (a 12 MP JPEG takes ~0.1-0.3 s to decode and resize:
    2 workers would hold one GPU to well under its 30 images/s at 1024 px)."""
    if setting >= 0:
        return setting
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (cores or usable_cores()) // max(ranks_here, 1) - 1))


def _decoded(entries, buckets, pre_cfg, device: torch.device | None = None):
    workers = decode_workers(pre_cfg.num_workers)
    # decoded ahead: a whole chunk and the next batch, which the host takes at once when the GPU is
    # given the previous chunk (fewer, and the chunk's start waits for decoding)
    wanted = min(pre_cfg.chunk_items + pre_cfg.batch_size, DECODED_AHEAD)
    ahead = max(8, -(-wanted // workers)) if workers else None
    # pinned by the loader's own thread for a GPU: the main thread's batch stacking then reads
    # resident pages, not the workers' shared memory page by page (54 ms a batch of 8 at 1024 px)
    loader = torch.utils.data.DataLoader(DecodedImages(entries, buckets, pre_cfg.max_image_pixels, pre_cfg.reduced_jpeg),
                                         batch_size=None,
                                         shuffle=False, num_workers=workers, prefetch_factor=ahead,
                                         pin_memory=device is not None and device.type == "cuda")
    yield from loader


class Progress:
    """Items done across all ranks, through small per-rank files (no collectives: ranks may have
    different numbers of chunks)."""

    def __init__(self, cache_dir: Path, di: session.DistInfo, total: int, reporter):
        self.dir, self.di, self.total, self.reporter = cache_dir / "progress", di, total, reporter
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0, self.done_here, self.base = time.time(), 0, 0
        self.spans: list[tuple[int, float]] = []  # (items, seconds) of each finished stretch of encoding

    def restart(self) -> None:
        """Encoding starts (again) now: what was counted before is not this stretch's work."""
        self.t0, self.base = time.time(), self.done_here

    def close_span(self) -> None:
        """A stretch of encoding (one resolution's chunks) is over: keep its items and time."""
        self.spans.append((self.done_here - self.base, time.time() - self.t0))
        self.restart()

    def throughput(self) -> dict:
        """Items encoded by all ranks in this run over the longest rank's encoding time: the
        stage's rate (the live events only see the ranks' files as rank 0 finishes a chunk).
        A collective: every rank calls it."""
        spans = self.spans + [(self.done_here - self.base, time.time() - self.t0)]
        rows = session.gather_objects((sum(n for n, _ in spans), sum(t for _, t in spans)))
        items, seconds = sum(n for n, _ in rows), max(t for _, t in rows)
        return {"encoded_items": items, "encode_s": seconds,  # per rank too: a slow rank sets the stage's pace
                "encode_s_per_rank": [round(t, 3) for _, t in rows],
                "items_per_s": items / seconds if seconds > 0 and items else None}

    def add(self, n: int) -> None:
        self.done_here += n
        files.write_atomic(self.dir / f"rank-{self.di.rank:05d}.json", {"done": self.done_here}, as_json=True,
                           every_rank=True)
        if self.di.is_main:
            done = sum((files.read_json(p) or {}).get("done", 0) for p in self.dir.glob("rank-*.json"))
            elapsed = time.time() - self.t0
            rate = (done - self.base * self.di.world_size) / elapsed if elapsed > 0 else 0.0
            self.reporter.progress(done, done=done, total=self.total, progress=done / max(self.total, 1),
                                   items_per_s=rate, elapsed_s=elapsed,
                                   eta_s=(self.total - done) / rate if rate > 0 else None)


def caption_missing(cfg: Config, entries: list[tuple[int, SourceImage]], buckets, di, reporter) -> dict[int, str]:
    """Captions for this rank's items without a .txt: auto-captioned in batches, or the default."""
    missing = [(i, s) for i, s in entries if s.caption is None]
    if not missing:
        return {}
    if cfg.data.captioner.lower() == "none":
        if di.is_main:
            reporter.warning(f"{len(missing)} image(s) on rank 0 have no {cfg.data.caption_extension} caption; using the "
                             f"default caption {default_caption(cfg, missing[0][1])!r} (captioner is none)")
        return {i: default_caption(cfg, s) for i, s in missing}
    dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
    captioner = Captioner(cfg.data.captioner, di.device, dtype, cfg.data.trust_remote_code, prompt=cfg.data.caption_prompt)
    if captioner.random_weights and di.is_main:
        reporter.warning(f"captioner {cfg.data.captioner} has random weights (a test model from make-tiny): the "
                         "captions it writes are gibberish; add .txt captions or pass a real --captioner")
    out, batch = {}, []
    for rec in _decoded(missing, buckets, cfg.preprocess):
        if "error" in rec:
            continue  # reported when the chunk is encoded
        batch.append(rec)
        if len(batch) == cfg.preprocess.caption_batch_size:
            out.update(_caption_batch(captioner, batch))
            batch = []
    if batch:
        out.update(_caption_batch(captioner, batch))
    captioner.close()
    return out


def _caption_batch(captioner: Captioner, batch: list[dict]) -> dict[int, str]:
    from PIL import Image

    images = [Image.fromarray(r["pixels"].permute(1, 2, 0).numpy()) for r in batch]
    return {r["index"]: text for r, text in zip(batch, captioner(images))}


MEMO_TEXTS = 16  # encoded texts a rank keeps between chunks (T5 at 512 tokens: 4 MiB each in bf16)


class Encoders:
    """The family's VAE + text encoders on this rank's device, loaded once for all chunks."""

    def __init__(self, cfg: Config, device: torch.device, family: Family, reporter=None, text: bool = True,
                 items: int = 0):
        dtype = loading.resolve_dtype(cfg.model.dtype, device)
        self.family = family
        self.vae = family.load_vae(cfg.model.path, dtype, cfg.model.revision, device).to(device).eval()
        self.saved_tf32 = torch.backends.cuda.matmul.allow_tf32
        if dtype in (torch.bfloat16, torch.float16):
            # the encoders' fp32 matmuls are attention's on bf16 values upcast (compiled T5's, the VAE's
            # wide head): TF32 tensor cores instead of plain fp32 FMA (3 ms an image for T5). Q·K is
            # exact in TF32's 10-bit mantissa; the probabilities keep 10 bits, more than bf16's 8
            torch.backends.cuda.matmul.allow_tf32 = True
            if device.type == "cuda":  # CPU attention takes any head width
                wide_attention.use_for_wide_heads(getattr(self.vae, "encoder", self.vae))
        self.text = load_text_encoders(cfg, device, family, reporter) if text else None  # a further resolution: latents only
        if compiled_encoders.use_compile(cfg.preprocess.compile, device, items):  # items: this rank's to encode
            compiled_encoders.compile_encoders(self.vae, self.text)
        self.device, self.batch, self.max_len = device, cfg.preprocess.batch_size, cfg.data.max_sequence_length
        # where a rank's time goes: the host queueing image and text batches (tokenizers included),
        # waiting for the GPU, for decoded images, for the previous chunk's write
        self.seconds = {"images": 0.0, "text": 0.0, "gpu_wait": 0.0, "decode_wait": 0.0, "write_wait": 0.0}
        self.memo: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # recent texts' rows

    def latents(self, records: list[dict], key: str = "pixels") -> dict[int, torch.Tensor]:
        """Latents of records[key] per item index, batched within each bucket. Queued: their values
        are there after the next `wait` (shapes are known at once)."""
        by_bucket: dict[tuple, list[dict]] = {}
        for r in records:
            by_bucket.setdefault(tuple(r["bucket"]), []).append(r)
        out = {}
        t0 = time.perf_counter()
        with host_copies_queued(self.device):  # no wait: the chunk's text encoding queues behind them
            for group in by_bucket.values():
                for i in range(0, len(group), self.batch):
                    rows = group[i:i + self.batch]
                    # uint8 crosses to the GPU (4x fewer bytes than float) and is normalised there
                    pixels = stacked_on([r[key] for r in rows], self.device).float() / 127.5 - 1.0
                    for r, lat in zip(rows, self.family.encode_latents(self.vae, pixels)):
                        out[r["index"]] = lat
        self.seconds["images"] += time.perf_counter() - t0
        return out

    def prompts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{text key: [U, ...]} for unique texts, batched. A text this rank encoded in one of its
        last chunks is not encoded again (the last MEMO_TEXTS of them: a dataset captioned alike,
        one default caption or one class prompt, encodes it once, not once per chunk)."""
        if not texts:
            return {}
        new = [t for t in texts if t not in self.memo]
        t0 = time.perf_counter()
        batches = [new[i:i + self.batch] for i in range(0, len(new), self.batch)]
        with host_copies_queued(self.device):
            outputs = [self.family.encode_prompts(self.text, batch, self.max_len, self.device) for batch in batches]
        self.seconds["text"] += time.perf_counter() - t0
        self.wait()
        for batch, encoded in zip(batches, outputs):
            for j, text in enumerate(batch):
                self.memo[text] = {k: v[j].clone() for k, v in encoded.items()}  # a row, not a view of the batch
        out = {k: torch.stack([self.memo[t][k] for t in texts]) for k in self.memo[texts[0]]}
        for text in texts:  # the ones used last stay longest
            self.memo.move_to_end(text)
        while len(self.memo) > MEMO_TEXTS:
            self.memo.popitem(last=False)
        return out

    def wait(self) -> None:
        """Until every queued copy to the host is complete (their values are read after this)."""
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            torch.cuda.current_stream(self.device).synchronize()
            self.seconds["gpu_wait"] += time.perf_counter() - t0

    def close(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved_tf32
        del self.vae, self.text
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_text_encoders(cfg: Config, device: torch.device, family: Family, reporter=None):
    """The family's text pipeline on the device, or streamed to it from host memory when its
    encoders do not fit (preprocess.text_encoder_offload); rank 0 says which and why."""
    dtype = loading.resolve_dtype(cfg.model.dtype, device)
    text = family.load_text_pipeline(cfg.model.path, dtype, cfg.model.revision, device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    offload, why = placement.choose_offload(cfg.preprocess.text_encoder_offload, placement.weight_bytes(text), free)
    if offload and reporter is not None:
        reporter.info(f"text encoders streamed from host memory ({why})")
    return placement.place(text, device, offload)


def image_items(enc: Encoders, records: list[dict], sources: list[SourceImage]) -> list[dict]:
    """A chunk's items without text: latents, and the control's latents and the loss mask where
    the records have them (the mask at the latents' size: the share of each latent pixel to learn)."""
    latents = enc.latents(records)
    controls = enc.latents(records, "control") if records and "control" in records[0] else {}
    items = [{"index": r["index"], "latents": latents[r["index"]], "bucket": r["bucket"],
              "source": sources[r["index"]].name} for r in records]
    for item in items if controls else []:
        item["control"] = controls[item["index"]]
    masked = {r["index"]: r["mask"] for r in records if "mask" in r}
    for item in items if masked else []:
        item["mask"] = latent_mask(masked.get(item["index"]), item["latents"].shape[-2:])
    return items


def encode_chunk(enc: Encoders, records: list[dict], captions: dict[int, list[str]], sources: list[SourceImage],
                 preserve: dict[int, str] | None = None) -> dict:
    items = image_items(enc, records, sources)
    texts = list(dict.fromkeys([text for r in records for text in captions[r["index"]]]
                               + [preserve[r["index"]] for r in records if preserve]))
    encoded = enc.prompts(texts)
    enc.wait()  # (prompts waited already, unless every text was remembered)
    for item in items:
        item["caption"] = captions[item["index"]][0]
        item["text_id"] = texts.index(item["caption"])
    for item in items if preserve else []:  # the caption with the class word: differential output preservation
        item["preserve_id"] = texts.index(preserve[item["index"]])
    if any(len(captions[r["index"]]) > 1 for r in records):
        for item in items:
            item["captions"] = captions[item["index"]]
            item["text_ids"] = [texts.index(text) for text in item["captions"]]
    return cache.pack_shard(items, encoded)


def encode_layer_chunk(enc: Encoders, records: list[dict], sources: list[SourceImage]) -> dict:
    """A further resolution's chunk: latents (control, mask) only; the text is the base's."""
    items = image_items(enc, records, sources)
    enc.wait()
    return cache.pack_shard(items, None)


def latent_mask(mask: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (uint8 [H, W], or None: learn everything) averaged over each latent pixel's
    area: float16 [h, w] in [0, 1]."""
    if mask is None:
        return torch.ones(tuple(size), dtype=torch.float16)
    pooled = torch.nn.functional.adaptive_avg_pool2d(mask.float()[None, None] / 255.0, tuple(size))
    return pooled[0, 0].to(torch.float16)


def trigger_word(cfg: Config, source: SourceImage) -> str:
    """The item's dataset's trigger word (a datasets file's), else data.trigger_word."""
    return source.trigger_word if source.trigger_word is not None else cfg.data.trigger_word


def default_caption(cfg: Config, source: SourceImage) -> str:
    return source.default_caption if source.default_caption is not None else cfg.data.default_caption


def final_captions(cfg: Config, entries, auto: dict[int, str]) -> dict[int, list[str]]:
    """Each item's captions (one, or with data.caption_lines one per non-empty line of its .txt),
    its dataset's trigger word applied to each."""
    out = {}
    for i, s in entries:
        base = s.caption if s.caption is not None else auto.get(i, default_caption(cfg, s))
        several = cfg.data.caption_lines or s.several_captions
        lines = [line.strip() for line in base.splitlines() if line.strip()] if several else []
        out[i] = [apply_trigger(text, trigger_word(cfg, s)) for text in (lines or [base])]
    return out


@dataclass(frozen=True)
class Layer:
    """One resolution of the cache being encoded: the base (text and latents) or a further one."""
    resolution: int
    buckets: list
    shards_dir: Path
    base: bool


def layers_to_encode(cfg: Config, resolutions: list[int], finished: dict | None) -> list[Layer]:
    """The resolutions still to encode: all of them for a new cache; for a finished one, those it lacks."""
    shards = Path(cfg.data.cache_dir) / "shards"
    done = set(cache.resolutions_of(finished)) if finished else set()
    return [Layer(r, make_buckets(r, cfg.data.square), shards if k == 0 else shards / cache.layer_dir(r), k == 0)
            for k, r in enumerate(resolutions) if r not in done]


def pending_parts(layer: Layer, di, parts, progress: Progress) -> list[tuple[int, list[int]]]:
    """This rank's chunks of a layer not already complete on disk (those count as done)."""
    pending = []
    for p, planned in enumerate(parts):
        if cache.valid_sidecar(layer.shards_dir, cache.shard_name(di.rank, di.world_size, p), planned) is not None:
            progress.add(len(planned))
        else:
            pending.append((p, planned))
    return pending


def encode_pending(cfg: Config, di, parts, sources, layer: Layer, reporter, progress: Progress, family: Family) -> None:
    """Encode and write every chunk of this rank and layer that is not already complete on disk."""
    layer.shards_dir.mkdir(parents=True, exist_ok=True)
    pending = pending_parts(layer, di, parts, progress)
    if not pending:
        progress.restart()  # nothing encoded here: the chunks found complete are not this run's work
        return
    entries = [(i, sources[i]) for _, planned in pending for i in planned]
    captions = preserve = None
    if layer.base:
        captions = final_captions(cfg, entries, caption_missing(cfg, entries, layer.buckets, di, reporter))
        preserve = {i: replace_trigger(texts[0], trigger_word(cfg, sources[i]), cfg.data.class_word)
                    for i, texts in captions.items()} if cfg.data.class_word else None
    enc = Encoders(cfg, di.device, family, reporter if di.is_main else None, text=layer.base,
                   items=len(entries)) if entries else None
    progress.restart()  # throughput counts from here, not from loading the encoders
    stream = iter(_decoded(entries, layer.buckets, cfg.preprocess, di.device))
    writer = ThreadPoolExecutor(max_workers=1)  # serialising + hashing + fsync overlap the next chunk
    writing = None
    for p, planned in pending:
        records, skipped = [], []
        for _ in planned:
            t0 = time.perf_counter()
            rec = next(stream)
            enc.seconds["decode_wait"] += time.perf_counter() - t0
            if "error" in rec:
                if cfg.data.strict:
                    raise DataError(f"{rec['error']} (--strict); remove or fix the file")
                if layer.base:  # a further resolution's failures are the base's: reported once
                    reporter.warning(f"skipping {rec['error']}", file=sources[rec["index"]].name)
                skipped.append({"index": rec["index"], "source": sources[rec["index"]].name, "error": rec["error"]})
            else:
                records.append(rec)
        if not layer.base:
            shard = encode_layer_chunk(enc, records, sources)
        else:
            shard = encode_chunk(enc, records, captions, sources, preserve) if records else cache.pack_shard([], {})
        if writing is not None:
            t0 = time.perf_counter()
            writing.result()  # at most one chunk in flight: memory stays bounded, errors surface
            enc.seconds["write_wait"] += time.perf_counter() - t0
        writing = writer.submit(_write_chunk, layer.shards_dir, cache.shard_name(di.rank, di.world_size, p), shard,
                                planned, skipped, progress)
    if writing is not None:
        writing.result()
    writer.shutdown()
    progress.close_span()
    if enc is not None:
        reporter.emit("timing", rank=di.rank, resolution=layer.resolution,
                      **{f"{k}_s": round(v, 3) for k, v in enc.seconds.items()})
        enc.close()


def _write_chunk(shards_dir: Path, name: str, shard: dict, planned: list[int], skipped: list[dict], progress) -> None:
    cache.write_shard(shards_dir, name, shard, planned, skipped)
    progress.add(len(planned))


def write_samples(cfg: Config, di, family: Family) -> None:
    """Rank 0: encode the sample prompts for train's preview images (once per set of prompts), the
    negative prompt where the family's previews use true CFG, and the empty prompt (caption
    dropout's stand-in); the text encoders load only when one of them is missing."""
    cache_dir = Path(cfg.data.cache_dir)
    prompts = [apply_trigger(p, cfg.data.trigger_word) if "[trigger]" in p else p for p in cfg.data.sample_prompts]
    if not prompts:
        (cache_dir / "samples.pt").unlink(missing_ok=True)
    try:
        old = cache.load_sample_prompts(cache_dir)
    except CacheError:
        old = None  # unreadable: written again below
    keys = list(family.text_keys)
    samples_done = not prompts or (old is not None and old.get("prompts") == prompts
                                   and old.get("text_keys", ["t5", "clip"]) == keys)
    empty_done = cache.load_empty_prompt(cache_dir, keys) is not None
    if samples_done and empty_done:
        return
    text = load_text_encoders(cfg, di.device, family)
    if not empty_done:
        cache.write_empty_prompt(cache_dir, family.encode_prompts(text, [""], cfg.data.max_sequence_length, di.device))
    if not samples_done:
        encoded = family.encode_prompts(text, prompts, cfg.data.max_sequence_length, di.device)
        negative = None
        if family.preview_negative is not None:
            negative = family.encode_prompts(text, [family.preview_negative], cfg.data.max_sequence_length, di.device)
        cache.write_sample_prompts(cache_dir, prompts, encoded, negative)


def run(cfg: Config) -> dict:
    loading.quiet_libraries()
    if not cfg.data.cache_dir:
        raise CacheError("no cache directory given; pass --cache-dir DIR")
    cache_dir = Path(cfg.data.cache_dir)
    with session.process_group(cfg.dist.timeout_s) as di, \
            holding(cache_dir, "cache", "--cache-dir", cfg.preprocess.overwrite, "preprocess", cfg.output.json) as reporter, \
            session.stop_on_sigterm("preprocess stopped (SIGTERM); rerun the same command to finish: complete chunks are kept"):
        return _run(cfg, di, cache_dir, reporter)


def _download_display():
    """Progress of a dataset download (rank 0): a bar on a terminal, a line per 10% in a log."""
    state = {"display": None, "last": -1}

    def update(done: int, total: int) -> None:
        if state["display"] is None:
            state["display"] = Display(max(total, 1), "download", every=1)
        pct = int(100 * done / total) if total else 0
        if pct // 10 != state["last"] // 10 or done == total:
            state["last"] = pct
            state["display"].update(done, {"stage": "preprocess", "done": f"{done >> 20} MiB",
                                           "total": f"{total >> 20} MiB", "items_per_s": 0.0, "eta_s": None})
        if total and done >= total:
            state["display"].close()

    return update


SKIPS_NAMED = 10  # files left out that get a warning line each; the rest are counted in one


def _warn_skipped(skipped: list[tuple[str, str]], root: Path, reporter) -> None:
    """A warning for each file discovery left out (symbolic links, HEIC, ...), the first
    SKIPS_NAMED by name: a folder of 10,000 links gets 11 lines, not 10,000."""
    for name, why in skipped[:SKIPS_NAMED]:
        reporter.warning(f"skipping {name}: {why}", file=name)
    rest = skipped[SKIPS_NAMED:]
    if rest:
        links = sum("symbolic link" in why for _, why in rest)
        reporter.warning(f"skipping {len(rest)} more files in {root}: {links} symbolic links, "
                         f"{len(rest) - links} of types flux_lora cannot read")


def find_sources(root: Path, family: Family, strict: bool, reporter, masks: str = "off",
                 caption_extension: str = ".txt", follow_symlinks: bool = False) -> list[SourceImage]:
    """The dataset's items: images with captions (and loss masks), or for an editing family,
    (control, target) pairs; what does not pair is warned about (reporter: rank 0's, else None)
    or, under --strict, fails the run."""
    if caption_extension.lower() in IMAGE_SUFFIXES | UNREADABLE_KINDS.keys():
        raise ConfigError(f"data.caption_extension={caption_extension!r} is an image type; captions are text files, "
                          "e.g. .txt or .caption")
    found, skipped = scan(root, caption_extension, follow_symlinks)
    if skipped and strict:
        raise DataError(f"{root / skipped[0][0]}: {skipped[0][1]} (--strict); fix it or drop --strict")
    if reporter:
        _warn_skipped(skipped, root, reporter)
        empty = [s.name for s in found if s.caption == ""]
        if empty:
            reporter.info(f"{len(empty)} image(s) have an empty caption file (e.g. {empty[0]}): their caption is the "
                          "trigger word alone (empty without one); delete the file to have the image auto-captioned")
    sources, mask_problems = attach_masks(found, masks)
    for name, problem in mask_problems if reporter else []:
        reporter.warning(problem, file=name)
    if family.paired:
        sources, problems = pair_controls(sources)
        if problems and strict:
            raise DataError(f"{problems[0][1]} (--strict); fix the pairs or drop --strict")
        for name, problem in problems if reporter else []:
            reporter.warning(problem, file=name)
    left_out = f" ({len(skipped)} files left out, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    if family.paired and not sources:
        raise DataError(f"no editing pairs found in {root}{left_out}: {family.title} trains on a target image with a "
                        "control image of the same stem in a control/ folder beside it, or named STEM_control.EXT")
    if not sources:
        raise DataError(f"no images ({supported_kinds()}) found in {root}{left_out}; check the --data path")
    return sources


def gather_sources(cfg: Config, cache_dir: Path, family: Family, reporter) -> tuple[list[SourceImage], str, list | None]:
    """The items of --data: one dataset (folder, ZIP, URL), or each of a datasets file's in turn
    (their names prefixed with the dataset's number, their trigger word and default caption
    attached); returns (items, root, the datasets as the manifest records them, or None)."""
    def resolve(source: str, work_dir: Path) -> str:
        return session.main_then_share(lambda: str(resolve_source(source, work_dir, cfg.preprocess.max_zip_bytes,
                                                                  _download_display(), refresh=cfg.preprocess.overwrite)))

    if not datasets.is_datasets_file(cfg.data.source):
        root = resolve(cfg.data.source, cache_dir)
        return find_sources(Path(root), family, cfg.data.strict, reporter, cfg.data.masks,
                            cfg.data.caption_extension, cfg.data.follow_symlinks), root, None
    sources, recorded = [], []
    for k, spec in enumerate(datasets.load_datasets(cfg.data.source)):
        trigger = spec.trigger_word if spec.trigger_word is not None else ("" if spec.regularization else None)
        try:
            root = resolve(spec.path, cache_dir / f"dataset-{k}")  # each dataset's own download/extraction folder
            found = [dataclasses.replace(s, name=f"{k}/{s.name}", dataset=k, trigger_word=trigger,
                                         default_caption=spec.default_caption)
                     for s in find_sources(Path(root), family, cfg.data.strict, reporter, cfg.data.masks,
                                           cfg.data.caption_extension, cfg.data.follow_symlinks)]
        except DataError as e:
            kind = "regularization dataset" if spec.regularization else "dataset"
            raise DataError(f"{cfg.data.source}, {kind} {k + 1}: {e}") from None
        recorded.append(datasets.manifest_entry(spec, len(sources), len(found)))
        sources += found
    return sources, cfg.data.source, recorded


def extension_config(cache_dir: str | None, added: str, config_path, flags: dict, sets) -> Config:
    """`preprocess --add-resolution R`: the finished cache's own config (CACHE/config.yaml, or
    --config) under the flags given, with R added to the resolutions it holds."""
    if not cache_dir:
        raise ConfigError("--add-resolution adds to a finished cache; pass its --cache-dir")
    if flags.get("data.resolution") is not None:
        raise ConfigError("pass --resolution (the cache's resolutions) or --add-resolution (more of them), not both")
    if flags.get("preprocess.overwrite"):
        raise ConfigError("--add-resolution keeps the cache and --overwrite rebuilds it; pass one of them")
    manifest = cache.load_manifest(Path(cache_dir))
    added_sides = parse_resolutions([added])
    if not added_sides:
        raise ConfigError(f"--add-resolution {added!r} names no resolution; give e.g. 1024 or 768,1024")
    own = Path(cache_dir) / "config.yaml"
    base = config_path if config_path is not None else (own if own.is_file() else None)
    # the cache's config.yaml may say overwrite (the run that built it): adding keeps what is there
    flags = {**flags, "data.resolutions": cache.resolutions_of(manifest) + added_sides, "preprocess.overwrite": False}
    return build_config(base, flags, sets or [])


def _run(cfg: Config, di, cache_dir: Path, reporter) -> dict:
    loading.check_model_path(cfg.model.path)
    if (note := loading.uncompiled_bytecode_note()) and di.is_main:
        reporter.warning(note)
    family = families.of_model(cfg.model.path, cfg.model.revision)
    sources, root, recorded = gather_sources(cfg, cache_dir, family, reporter if di.is_main else None)
    for source in sources if di.is_main else []:
        if source.note:
            reporter.warning(f"{source.name}: {source.note}", file=source.name)
    old = None if cfg.preprocess.overwrite else session.main_then_share(
        lambda: files.read_json(cache_dir / "settings.json"))
    resolutions = cache.merged_resolutions(old, cfg.data.sizes)
    settings = {**cache.cache_settings(cfg, sources, di.world_size, family.name, resolutions), "source_root": str(root),
                **({"datasets": recorded} if recorded else {})}
    finished = session.main_then_share(lambda: cache.claim_cache(cache_dir, settings, cfg.preprocess.overwrite))
    todo = layers_to_encode(cfg, resolutions, finished)
    reporter.start(len(sources) * max(len(todo), 1), "preprocess", world_size=di.world_size, dataset_size=len(sources),
                   cache_dir=str(cache_dir), resolution=cfg.data.resolution, resolutions=resolutions)
    if not todo:
        reporter.info(f"cache in {cache_dir} is already complete for these settings; nothing to do")
        summary = {"total_items": finished["total_items"]}
    else:
        if finished:
            reporter.info(f"adding {', '.join(str(layer.resolution) for layer in todo)} px to the finished cache in "
                          f"{cache_dir}: latents only, its text is reused")
        parts = cache.plan_parts(session.shard_indices(len(sources), di.rank, di.world_size), cfg.preprocess.chunk_items)
        progress = Progress(cache_dir, di, len(sources) * len(todo), reporter)
        for layer in todo:
            encode_pending(cfg, di, parts, sources, layer, reporter, progress, family)
        rate = progress.throughput()  # also the barrier before rank 0 writes the manifest
        summary = {**session.main_then_share(lambda: cache.write_manifest(cache_dir, settings, reporter, finished)),
                   **rate}
    if di.is_main:
        write_samples(cfg, di, family)  # encodes: only rank 0 loads the text encoders again
    held = dataclasses.replace(cfg.data, resolutions=resolutions if len(resolutions) > 1 else [])
    cache.write_config(cache_dir, dataclasses.replace(cfg, data=held))  # what --add-resolution builds on
    summary["host_peak_rss_mib_per_rank"] = session.gather_objects(memory.host_peak_rss_mib())  # also the barrier
    reporter.done(**summary, cache_dir=str(cache_dir))
    reporter.info(f"cache ready: {summary['total_items']} items in {cache_dir}"
                  + (f" at {', '.join(map(str, resolutions))} px" if len(resolutions) > 1 else ""))
    return summary
