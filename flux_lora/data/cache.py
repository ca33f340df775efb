"""The cache contract between `preprocess` and `train`.

    CACHE/settings.json                        what the cache is being built with (claims the dir)
    CACHE/shards/rank-RRRRR-of-NNNNN-part-PPPP.pt    one chunk of rank R's items
    CACHE/shards/rank-RRRRR-of-NNNNN-part-PPPP.json  its sidecar: sha256, planned and stored items
    CACHE/shards/res-SSSSS/rank-...                  a further resolution's chunks (latents only)
    CACHE/manifest.json                        written last, by rank 0: the cache is complete
    CACHE/samples.pt                           embeddings of the sample prompts (may be absent)
    CACHE/empty_prompt.pt                      embeddings of the empty caption (caption dropout)
    CACHE/captions.jsonl                       the caption used for every item, for people
    CACHE/config.yaml, events.jsonl            the resolved config and preprocess's events
    CACHE/progress/rank-RRRRR.json             items done per rank, for live progress

Writing: rank 0 claims the directory (`claim_cache`: settings.json, or a refusal naming what
differs); each rank writes its chunks (`write_shard`: the .pt, then the sidecar that marks it
complete); after a barrier rank 0 writes captions.jsonl and manifest.json (`write_manifest`).
Reading: `open_for_training` checks the manifest against the model and every shard's checksum.

A shard is a dict loaded with `torch.load(weights_only=True, mmap=True)`:
    index [n] int64, latents list of [C, h, w] float32 (the family's latent space), bucket list of
    [w, h], caption / source lists of str, text_id [n] int64 into one [U, ...] tensor per name in
    text_keys (FLUX.1: t5 [U, L, D] and clip [U, P]; FLUX.2: text [U, L, D]; identical captions
    share a row); editing pairs add control, a list of [C, h, w] latents of the control images;
    a masked dataset adds mask, a list of float16 [h, w] loss weights at the latents' size; with
    data.class_word, preserve_id [n] points at each caption's class-word version in the same table.

Several resolutions (data.resolutions): the first is the base, whose shards hold everything above.
Each further one is a layer, shards/res-SSSSS/, whose shards hold the items' latents (control,
mask) at that size and no text: an item's text is read from its base item. The manifest lists the
base's shards and items at the top and each layer's under "layers"; `all_shards` and `all_items`
flatten them. A layer is added to a finished cache without encoding any text again.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_lora.config import Config, to_yaml
from flux_lora.data.datasets import dataset_of
from flux_lora.data.images import make_buckets
from flux_lora.data.sources import SourceImage
from flux_lora.errors import CacheError, DataError
from flux_lora.models import fingerprint as model_fingerprint
from flux_lora.outputs import files
from flux_lora.parallel import session

FORMAT_VERSION = 1


def shard_name(rank: int, world: int, part: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}-part-{part:04d}"


# ---------------------------------------------------------------- writing

def pack_shard(items: list[dict], texts: dict[str, torch.Tensor] | None) -> dict:
    """items: dicts with index, latents, bucket, source, and with text caption and text_id (and
    control for pairs); texts: the encoded unique captions, one [U, ...] tensor per text key, or
    None for a further resolution's shard (its items' text is the base's)."""
    shard = {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "latents": [it["latents"].contiguous() for it in items],
        "bucket": [list(it["bucket"]) for it in items],
        "source": [it["source"] for it in items],
    }
    if texts is not None:
        shard.update({"caption": [it["caption"] for it in items],
                      "text_id": torch.tensor([it["text_id"] for it in items], dtype=torch.int64),
                      "text_keys": list(texts), **{k: v.contiguous() for k, v in texts.items()}})
    if items and "control" in items[0]:
        shard["control"] = [it["control"].contiguous() for it in items]
    if items and "mask" in items[0]:
        shard["mask"] = [it["mask"].contiguous() for it in items]
    if items and "preserve_id" in items[0]:
        shard["preserve_id"] = torch.tensor([it["preserve_id"] for it in items], dtype=torch.int64)
    if items and "text_ids" in items[0]:  # several captions per image
        shard["text_ids"] = [list(it["text_ids"]) for it in items]
        shard["captions"] = [list(it["captions"]) for it in items]
    return shard


def write_shard(shards_dir: Path, name: str, shard: dict, planned: list[int], skipped: list[dict]) -> dict:
    """Write one chunk and then its sidecar; the sidecar is what marks the chunk complete."""
    buf = io.BytesIO()
    torch.save(shard, buf)
    data = buf.getvalue()
    files.write_atomic(shards_dir / f"{name}.pt", data, every_rank=True)
    side = {"file": f"{name}.pt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "planned": planned, "items": len(shard["index"]), "index": shard["index"].tolist(),
            "bucket": shard["bucket"], "source": shard["source"], "skipped": skipped,
            **{k: shard[k] for k in ("caption", "captions") if k in shard}}
    files.write_atomic(shards_dir / f"{name}.json", side, as_json=True, every_rank=True)
    return side


def valid_sidecar(shards_dir: Path, name: str, planned: list[int]) -> dict | None:
    """The sidecar of a finished chunk with these planned items whose file checks out, else None."""
    side = files.read_json(shards_dir / f"{name}.json")
    pt = shards_dir / f"{name}.pt"
    if not side or side.get("planned") != planned or not pt.is_file() or pt.stat().st_size != side.get("bytes"):
        return None
    return side if files.sha256_file(pt) == side["sha256"] else None


def layer_dir(resolution: int) -> str:
    """A further resolution's folder under shards/."""
    return f"res-{resolution:05d}"


def shard_entries(sidecars: list[dict], folder: str = "") -> tuple[list[dict], list[list]]:
    """The manifest's shards (files relative to shards/) and items [index, shard, position, w, h]."""
    shards, items = [], []
    for s_idx, side in enumerate(sidecars):
        shards.append({"file": folder + side["file"], "items": side["items"], "sha256": side["sha256"],
                       "bytes": side["bytes"]})
        for pos, (index, bucket) in enumerate(zip(side["index"], side["bucket"])):
            items.append([index, s_idx, pos, bucket[0], bucket[1]])
    return shards, sorted(items)


def build_manifest(settings: dict, sidecars: list[dict], layers: list[dict] | None = None) -> dict:
    shards, items = shard_entries(sidecars)
    return {**settings, "format_version": FORMAT_VERSION, "shards": shards, "total_items": len(items),
            "items_columns": ["index", "shard", "position", "width", "height"], "items": items,
            **({"layers": layers} if layers else {})}


def build_layer(resolution: int, square: bool, world: int, sidecars: list[dict]) -> dict:
    """The manifest's record of a further resolution: its buckets, shards and items."""
    shards, items = shard_entries(sidecars, layer_dir(resolution) + "/")
    return {"resolution": resolution, "buckets": [list(b) for b in make_buckets(resolution, square)],
            "world_size": world, "shards": shards, "items": items}


def resolutions_of(manifest_or_settings: dict) -> list[int]:
    """Every resolution a cache holds (or is built with), the base first."""
    return manifest_or_settings.get("resolutions") or [manifest_or_settings["resolution"]]


def all_shards(manifest: dict) -> list[dict]:
    """The base's shards, then each layer's."""
    return manifest["shards"] + [s for layer in manifest.get("layers", []) for s in layer["shards"]]


def all_items(manifest: dict) -> list[list]:
    """Every item of every resolution as [index, shard, position, w, h] over all_shards: the
    base's first (in index order), then each layer's; a layer's item whose image the base does
    not hold (it failed to read there) is left out, as it has no text."""
    items, offset = [list(r) for r in manifest["items"]], len(manifest["shards"])
    held = {r[0] for r in manifest["items"]}
    for layer in manifest.get("layers", []):
        items += [[r[0], r[1] + offset, *r[2:]] for r in layer["items"] if r[0] in held]
        offset += len(layer["shards"])
    return items


# ---------------------------------------------------------------- claiming and finishing

def dataset_identity(cfg: Config, sources: list[SourceImage]) -> str:
    """What the items and their captions depend on, so a changed dataset is not mixed with an old cache."""
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.name}\0{s.caption}\0".encode())
        if s.control is not None:
            h.update(f"{s.control.name}\0".encode())
        if s.several_captions:  # a metadata.jsonl list (only then: older caches keep their identity)
            h.update(b"several\0")
        if s.mask is not None or s.mask_from_alpha:  # (only then: older caches keep their identity)
            h.update(f"mask:{s.mask.name if s.mask else 'alpha'}\0".encode())
    d = cfg.data
    h.update(f"{d.trigger_word}\0{d.default_caption}\0{d.captioner}".encode())
    if d.caption_lines:
        h.update(b"caption_lines")
    if d.caption_prompt:  # (only then: older caches keep their identity)
        h.update(f"prompt:{d.caption_prompt}".encode())
    if d.class_word:
        h.update(f"class:{d.class_word}".encode())
    return h.hexdigest()[:32]


def cache_settings(cfg: Config, sources: list[SourceImage], world: int, family: str = "flux1",
                   resolutions: list[int] | None = None) -> dict:
    """What the cache is built with; `resolutions` (the base first) defaults to data.sizes."""
    resolutions = resolutions or cfg.data.sizes
    # a --model-transformer file is recorded (and in the fingerprint) only when given: older caches keep theirs
    file = {"transformer_file": cfg.model.transformer_file} if cfg.model.transformer_file else {}
    several = {"resolutions": resolutions} if len(resolutions) > 1 else {}  # (only then: older caches keep theirs)
    return {"model": cfg.model.path, "family": family, **file,
            "fingerprint": model_fingerprint.fingerprint(cfg.model.path, cfg.data.max_sequence_length, cfg.model.revision,
                                                         cfg.model.transformer_file),
            "resolution": resolutions[0], "square": cfg.data.square, **several,
            "buckets": [list(b) for b in make_buckets(resolutions[0], cfg.data.square)],
            "max_sequence_length": cfg.data.max_sequence_length, "dataset": dataset_identity(cfg, sources),
            "num_sources": len(sources), "world_size": world, "chunk_items": cfg.preprocess.chunk_items}


_LAYOUT_KEYS = ("world_size", "chunk_items")
_IGNORED_KEYS = ("model", "source_root", "family", "transformer_file")  # the fingerprint and dataset identity cover these


def claim_cache(cache_dir: Path, settings: dict, overwrite: bool) -> dict | None:
    """Rank 0, holding the cache's lock: record the settings this cache is built with, or refuse
    a cache built with others. Returns the manifest of a finished cache with these settings (one
    that may lack some of the resolutions asked for: those are added to it), else None."""
    old = None if overwrite else files.read_json(cache_dir / "settings.json")  # --overwrite emptied it first
    if old is None and (cache_dir / "shards").is_dir() and any((cache_dir / "shards").iterdir()):
        raise CacheError(f"{cache_dir} holds shards of an unknown cache; pass --overwrite or another --cache-dir")
    if old is not None:
        diff = [k for k in settings if k not in _LAYOUT_KEYS + _IGNORED_KEYS + ("resolutions",)
                and old.get(k) != settings[k]]
        if diff:
            raise CacheError(f"{cache_dir} holds a cache built with different {', '.join(diff)}; "
                             "pass --overwrite to rebuild it or choose another --cache-dir")
        manifest = files.read_json(cache_dir / "manifest.json")
        if manifest and manifest.get("format_version") == FORMAT_VERSION \
                and not check_shard_files(cache_dir, manifest, hashes=False):
            if resolutions_of(settings) != resolutions_of(old):  # layers to add: the finished ones stay
                files.write_atomic(cache_dir / "settings.json", {**old, "resolutions": resolutions_of(settings)},
                                   as_json=True)
            return manifest
        layout = [k for k in _LAYOUT_KEYS if old.get(k) != settings[k]]
        if layout:
            raise CacheError(f"{cache_dir} holds an unfinished cache started with "
                             + ", ".join(f"{k}={old.get(k)}" for k in layout)
                             + "; rerun with the same number of ranks to finish it, or pass --overwrite")
    (cache_dir / "shards").mkdir(parents=True, exist_ok=True)
    (cache_dir / "manifest.json").unlink(missing_ok=True)
    files.write_atomic(cache_dir / "settings.json", settings, as_json=True)
    return None


def merged_resolutions(old_settings: dict | None, requested: list[int]) -> list[int]:
    """The resolutions a cache is built with: those asked for; when a cache already in the folder
    has its base among them, that base first and every resolution it holds kept (a cache only
    gains resolutions; --overwrite starts over)."""
    if not old_settings or old_settings.get("resolution") not in requested:
        return list(requested)
    base = old_settings["resolution"]
    return [base] + [r for r in dict.fromkeys(resolutions_of(old_settings) + list(requested)) if r != base]


def plan_parts(mine: list[int], chunk: int) -> list[list[int]]:
    """This rank's items in chunks; at least one (possibly empty) chunk per rank."""
    return [mine[i:i + chunk] for i in range(0, len(mine), chunk)] or [[]]


def _sidecars(folder: Path, world: int) -> list[dict]:
    out = []
    for side_path in sorted(folder.glob(f"rank-*-of-{world:05d}-part-*.json")):
        side = files.read_json(side_path)
        if side is None:
            raise CacheError(f"{side_path} is unreadable; rerun preprocess to rebuild that chunk")
        out.append(side)
    return out


def write_manifest(cache_dir: Path, settings: dict, reporter, finished: dict | None = None) -> dict:
    """Rank 0, after every rank is done: manifest.json (the cache is complete) + captions.jsonl.
    `finished`: the manifest of the finished cache being given more resolutions; its base and
    layers are kept as they are."""
    world, resolutions = settings["world_size"], resolutions_of(settings)
    kept = {layer["resolution"]: layer for layer in (finished or {}).get("layers", [])}
    layers = [kept.get(r) or build_layer(r, settings["square"], world,
                                         _sidecars(cache_dir / "shards" / layer_dir(r), world))
              for r in resolutions[1:]]
    if finished is not None:
        manifest = {k: v for k, v in finished.items() if k not in ("resolutions", "layers")}
        manifest.update({"resolutions": resolutions, "layers": layers} if layers else {})
        files.write_atomic(cache_dir / "manifest.json", manifest, as_json=True)
        return {"total_items": manifest["total_items"], "skipped": 0, "shards": len(all_shards(manifest))}
    sidecars = _sidecars(cache_dir / "shards", world)
    manifest = build_manifest(settings, sidecars, layers)
    skipped = [s for side in sidecars for s in side.get("skipped", [])]
    if manifest["total_items"] == 0:
        raise DataError(f"no usable images: all {len(skipped)} file(s) in {settings['source_root']} were unreadable; "
                        "check the files or the --data path")
    for side in sidecars:
        if not side["file"].startswith("rank-00000-"):  # rank 0 reported its own as it went
            for s in side.get("skipped", []):
                reporter.emit("warning", message=f"skipped {s['error']}", file=s["source"])
    lines = [json.dumps({"index": i, "source": src, "caption": cap, **({"captions": alts} if len(alts) > 1 else {})})
             for side in sidecars
             for i, src, cap, alts in zip(side["index"], side["source"], side["caption"],
                                          side.get("captions", [[c] for c in side["caption"]]))]
    files.write_atomic(cache_dir / "captions.jsonl", "\n".join(sorted(lines, key=lambda line: json.loads(line)["index"])) + "\n")
    files.write_atomic(cache_dir / "manifest.json", manifest, as_json=True)
    return {"total_items": manifest["total_items"], "skipped": len(skipped), "shards": len(all_shards(manifest))}


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class CacheItem:
    index: int
    shard: int
    position: int
    bucket: tuple[int, int]
    text: tuple[int, int]  # (shard, position) of the item holding its text: itself, or its base item


def load_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not Path(cache_dir).is_dir():
        raise CacheError(f"cache directory {cache_dir} does not exist; run `flux_lora preprocess --cache-dir {cache_dir}` first")
    if not path.is_file():
        raise CacheError(f"{cache_dir} has no manifest.json (preprocess did not finish); rerun preprocess to complete it")
    manifest = files.read_json(path)
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
    for i, shard in enumerate(all_shards(manifest)):
        path = Path(cache_dir) / "shards" / shard["file"]
        if not path.is_file():
            problems.append(f"shard {shard['file']} is missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"shard {shard['file']} has the wrong size (truncated?)")
        elif hashes and i % world == rank and files.sha256_file(path) != shard["sha256"]:
            problems.append(f"shard {shard['file']} fails its sha256 check (corrupt)")
    return problems


class CachedDataset:
    """Items of a finished cache, read lazily: each shard is memory-mapped on first use."""

    def __init__(self, cache_dir: Path, manifest: dict):
        self.dir = Path(cache_dir) / "shards"
        self.files = [s["file"] for s in all_shards(manifest)]
        base = {r[0]: (r[1], r[2]) for r in manifest["items"]}
        self.items = [CacheItem(r[0], r[1], r[2], (r[3], r[4]), base[r[0]]) for r in all_items(manifest)]
        self.base_items = len(manifest["items"])  # the first ones: one per image, at the base resolution
        self.datasets = manifest.get("datasets")  # a datasets file's: each item's dataset goes into its batch
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

    def __getitem__(self, k: int, pick: int | None = None) -> dict:
        """latents [C, h, w], each text key's row, control [C, h, w] for pairs, index, bucket. An
        item with several captions gives caption `pick` (mod their number), or its first."""
        item = self.items[k]
        shard = self._shard(item.shard)
        texts, at = self._shard(item.text[0]), item.text[1]  # a further resolution's item reads its base's text
        text = int(texts["text_id"][at])
        if pick is not None and "text_ids" in texts:
            choices = texts["text_ids"][at]
            text = int(choices[pick % len(choices)])
        out = {"latents": shard["latents"][item.position], "index": item.index, "bucket": item.bucket}
        if self.datasets:
            out["dataset"] = torch.tensor(dataset_of(self.datasets, item.index))
        keys = texts.get("text_keys", ("t5", "clip"))
        out.update({key: texts[key][text] for key in keys})
        if "control" in shard:
            out["control"] = shard["control"][item.position]
        if "mask" in shard:
            out["mask"] = shard["mask"][item.position]
        if "preserve_id" in texts:  # the caption with the class word (preservation), under preserve_KEY
            row = int(texts["preserve_id"][at])
            out.update({f"preserve_{key}": texts[key][row] for key in keys})
        return out

    def collate(self, positions: list[int], picks: list[int] | None = None) -> dict:
        """Stack items of one bucket into a batch (latents [B, C, h, w], every text key [B, ...],
        control, mask); `picks` chooses among items' several captions."""
        rows = [self.__getitem__(p, None if picks is None else picks[j]) for j, p in enumerate(positions)]
        if any("mask" in r for r in rows):  # a chunk without masked images stored none: learn everywhere
            for r in rows:
                r.setdefault("mask", torch.ones(r["latents"].shape[-2:], dtype=torch.float16))
        return {k: torch.stack([r[k] for r in rows]) for k, v in rows[0].items() if isinstance(v, torch.Tensor)}


def open_for_training(cfg: Config, di: session.DistInfo) -> tuple[dict, CachedDataset]:
    """The manifest, checked against --model (fingerprint) and every shard's size and checksum
    (rank r of W hashes shards r, r+W, ...; all ranks learn every problem)."""
    cache_dir = Path(cfg.data.cache_dir)
    if not cfg.data.cache_dir:
        raise CacheError("no cache directory given; pass --cache-dir DIR (written by `flux_lora preprocess`)")
    manifest = load_manifest(cache_dir)
    # a cache built without a transformer file serves any (it holds no transformer output); one
    # built with a file serves that file only
    file = cfg.model.transformer_file if manifest.get("transformer_file") else ""
    fingerprint = model_fingerprint.fingerprint(cfg.model.path, manifest["max_sequence_length"], cfg.model.revision, file)
    if fingerprint != manifest["fingerprint"]:
        if manifest.get("transformer_file"):
            raise CacheError(f"cache {cache_dir} was built for --model-transformer {manifest['transformer_file']}, "
                             f"not {cfg.model.transformer_file or 'the transformer of ' + cfg.model.path}; pass that "
                             "file, or rerun preprocess with this one")
        raise CacheError(f"cache {cache_dir} was built for model {manifest['model']}, not {cfg.model.path} "
                         "(different VAE/text encoders); rerun preprocess with this --model")
    problems = [p for ps in session.gather_objects(check_shard_files(cache_dir, manifest, di.rank, di.world_size))
                for p in ps]
    if problems:
        raise CacheError(f"cache {cache_dir}: {problems[0]}"
                         + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                         + "; rerun preprocess (with --overwrite) to rebuild it")
    return manifest, CachedDataset(cache_dir, manifest)


def write_sample_prompts(cache_dir: Path, prompts: list[str], texts: dict[str, torch.Tensor],
                         negative: dict[str, torch.Tensor] | None = None) -> None:
    """CACHE/samples.pt: the sample prompts' embeddings (one [P, ...] tensor per text key, and the
    negative prompt's where the family's previews use true CFG), so train draws previews without
    text encoders."""
    record = {"prompts": prompts, **texts, "text_keys": list(texts)}
    if negative is not None:
        record["negative"] = negative
    files.write_atomic(Path(cache_dir) / "samples.pt", lambda f: torch.save(record, f))


def write_empty_prompt(cache_dir: Path, texts: dict[str, torch.Tensor]) -> None:
    """CACHE/empty_prompt.pt: the empty caption's embeddings ([1, ...] per text key), what a
    sample's caption becomes when caption dropout drops it."""
    record = {**{k: v.cpu() for k, v in texts.items()}, "text_keys": list(texts)}  # as the shards store them
    files.write_atomic(Path(cache_dir) / "empty_prompt.pt", lambda f: torch.save(record, f))


def load_empty_prompt(cache_dir: Path, text_keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The empty prompt's embeddings ([...] per text key, no batch dimension), or None when the
    cache has none for these text keys (one written before caption dropout existed, or unreadable)."""
    path = Path(cache_dir) / "empty_prompt.pt"
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: written again by preprocess
        return None
    if record.get("text_keys") != list(text_keys):
        return None
    return {k: record[k][0] for k in text_keys}


def write_config(cache_dir: Path, cfg: Config) -> None:
    """CACHE/config.yaml: the resolved config the cache was built with, for people."""
    files.write_atomic(Path(cache_dir) / "config.yaml", to_yaml(cfg))


def load_sample_prompts(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / "samples.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CacheError(f"{path} is unreadable ({type(e).__name__}; truncated?); rerun preprocess with the same "
                         "--sample-prompt to write it again") from None
