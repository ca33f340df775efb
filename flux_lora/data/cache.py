"""The cache contract between `preprocess` and `train`.

    CACHE/settings.json                        what the cache is being built with (claims the dir)
    CACHE/shards/rank-RRRRR-of-NNNNN-part-PPPP.pt    one chunk of rank R's items
    CACHE/shards/rank-RRRRR-of-NNNNN-part-PPPP.json  its sidecar: sha256, planned and stored items
    CACHE/manifest.json                        written last, by rank 0: the cache is complete
    CACHE/samples.pt                           embeddings of the sample prompts (may be absent)
    CACHE/captions.jsonl                       the caption used for every item, for people

A shard is a dict loaded with `torch.load(weights_only=True, mmap=True)`:
    index [n] int64, latents list of [C, h, w] float32, bucket list of [w, h], caption / source
    lists of str, text_id [n] int64 into t5 [U, L, D] and clip [U, P] (identical captions share a row).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux_lora.errors import CacheError

FORMAT_VERSION = 1


def shard_name(rank: int, world: int, part: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}-part-{part:04d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: a crash leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- writing

def pack_shard(items: list[dict], t5: torch.Tensor, clip: torch.Tensor) -> dict:
    """items: dicts with index, latents, bucket, caption, source, text_id."""
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "latents": [it["latents"].contiguous() for it in items],
        "bucket": [list(it["bucket"]) for it in items],
        "caption": [it["caption"] for it in items],
        "source": [it["source"] for it in items],
        "text_id": torch.tensor([it["text_id"] for it in items], dtype=torch.int64),
        "t5": t5.contiguous(),
        "clip": clip.contiguous(),
    }


def write_shard(shards_dir: Path, name: str, shard: dict, planned: list[int], skipped: list[dict]) -> dict:
    """Write one chunk and then its sidecar; the sidecar is what marks the chunk complete."""
    buf = io.BytesIO()
    torch.save(shard, buf)
    data = buf.getvalue()
    atomic_write_bytes(shards_dir / f"{name}.pt", data)
    side = {"file": f"{name}.pt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "planned": planned, "items": len(shard["index"]), "index": shard["index"].tolist(),
            "bucket": shard["bucket"], "caption": shard["caption"], "source": shard["source"],
            "skipped": skipped}
    atomic_write_json(shards_dir / f"{name}.json", side)
    return side


def valid_sidecar(shards_dir: Path, name: str, planned: list[int]) -> dict | None:
    """The sidecar of a finished chunk with these planned items whose file checks out, else None."""
    side = read_json(shards_dir / f"{name}.json")
    pt = shards_dir / f"{name}.pt"
    if not side or side.get("planned") != planned or not pt.is_file() or pt.stat().st_size != side.get("bytes"):
        return None
    return side if sha256_file(pt) == side["sha256"] else None


def build_manifest(settings: dict, sidecars: list[dict]) -> dict:
    shards, items = [], []
    for s_idx, side in enumerate(sidecars):
        shards.append({"file": side["file"], "items": side["items"], "sha256": side["sha256"], "bytes": side["bytes"]})
        for pos, (index, bucket) in enumerate(zip(side["index"], side["bucket"])):
            items.append([index, s_idx, pos, bucket[0], bucket[1]])
    items.sort()
    return {**settings, "format_version": FORMAT_VERSION, "shards": shards, "total_items": len(items),
            "items_columns": ["index", "shard", "position", "width", "height"], "items": items}


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class CacheItem:
    index: int
    shard: int
    position: int
    bucket: tuple[int, int]


def load_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not Path(cache_dir).is_dir():
        raise CacheError(f"cache directory {cache_dir} does not exist; run `flux_lora preprocess --cache-dir {cache_dir}` first")
    if not path.is_file():
        raise CacheError(f"{cache_dir} has no manifest.json (preprocess did not finish); rerun preprocess to complete it")
    manifest = read_json(path)
    if manifest is None:
        raise CacheError(f"{path} is not valid JSON; rerun preprocess with --overwrite")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{cache_dir} has cache format {manifest.get('format_version')}, this flux_lora reads "
                         f"{FORMAT_VERSION}; rerun preprocess with --overwrite")
    return manifest


def check_shard_files(cache_dir: Path, manifest: dict, rank: int = 0, world: int = 1,
                      hashes: bool = True) -> list[str]:
    """Problems with the shards: every file's presence and size; with `hashes`, the sha256 of the
    shards this rank checks (rank r of W hashes shards r, r+W, ...)."""
    problems = []
    for i, shard in enumerate(manifest["shards"]):
        path = Path(cache_dir) / "shards" / shard["file"]
        if not path.is_file():
            problems.append(f"shard {shard['file']} is missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"shard {shard['file']} has the wrong size (truncated?)")
        elif hashes and i % world == rank and sha256_file(path) != shard["sha256"]:
            problems.append(f"shard {shard['file']} fails its sha256 check (corrupt)")
    return problems


class CachedDataset:
    """Items of a finished cache, read lazily: each shard is memory-mapped on first use."""

    def __init__(self, cache_dir: Path, manifest: dict):
        self.dir = Path(cache_dir) / "shards"
        self.files = [s["file"] for s in manifest["shards"]]
        self.items = [CacheItem(r[0], r[1], r[2], (r[3], r[4])) for r in manifest["items"]]
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _shard(self, i: int) -> dict:
        if i not in self._open:
            path = self.dir / self.files[i]
            try:
                self._open[i] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt shard
                raise CacheError(f"cannot read shard {path.name} ({type(e).__name__}); rerun preprocess with --overwrite") from None
        return self._open[i]

    def __getitem__(self, k: int) -> dict:
        item = self.items[k]
        shard = self._shard(item.shard)
        text = int(shard["text_id"][item.position])
        return {"latents": shard["latents"][item.position], "t5": shard["t5"][text], "clip": shard["clip"][text],
                "index": item.index, "bucket": item.bucket}

    def collate(self, positions: list[int]) -> dict:
        """Stack items of one bucket into a batch (latents [B, C, h, w], t5 [B, L, D], clip [B, P])."""
        rows = [self[p] for p in positions]
        return {k: torch.stack([r[k] for r in rows]) for k in ("latents", "t5", "clip")}


class Prefetcher:
    """load(step) for the next step runs on a background thread while this step trains, so reading
    the memory-mapped shards, stacking and pinning stay off the GPU's critical path. Errors (a
    corrupt shard) surface on the step that needs the data."""

    def __init__(self, load, end_step: int):
        from concurrent.futures import ThreadPoolExecutor

        self.load, self.end_step = load, end_step
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-lora-prefetch")
        self.pending: dict = {}

    def get(self, step: int):
        future = self.pending.pop(step, None) or self.pool.submit(self.load, step)
        if step + 1 < self.end_step:
            self.pending[step + 1] = self.pool.submit(self.load, step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def pinned(batch: dict) -> dict:
    """Page-locked copies, so host-to-GPU copies run asynchronously (non_blocking)."""
    return {k: v.pin_memory() for k, v in batch.items()}


def load_sample_prompts(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / "samples.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
