"""Several datasets in one run: `--data datasets.yaml` lists them, each with its own captions
options, how often it is seen per epoch, and whether it holds regularization images.

    datasets:
      - path: photos/              # a folder, a .zip or an http(s) URL (relative: to this file)
        trigger_word: sks          # this dataset's trigger word (default: data.trigger_word)
        repeats: 4                 # each image 4 times per epoch (kohya's num_repeats; default 1)
      - path: /data/person-class/
        default_caption: a photo of a person   # for images without a .txt (default: data.default_caption)
        regularization: true       # class images against concept bleeding (DreamBooth's prior
                                   # preservation): trained with their own captions, the loss
                                   # weighted by train.prior_loss_weight

The ratio of regularization to concept images is set by their counts and repeats (e.g. 20 photos ×
repeats 5 against 100 class images: one class image per concept image). One cache holds every
dataset; its manifest records them and which items each holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flux_lora.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    trigger_word: str | None = None  # None: data.trigger_word
    default_caption: str | None = None  # None: data.default_caption
    repeats: int = 1
    regularization: bool = False


KEYS = {f.name for f in dataclasses.fields(DatasetSpec)}


def is_datasets_file(source: str) -> bool:
    return source.lower().endswith((".yaml", ".yml")) and not source.startswith(("http://", "https://"))


def _spec(entry, k: int, where: str, base: Path) -> DatasetSpec:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}, dataset {k + 1}: expected a mapping with a path, got {type(entry).__name__}")
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise ConfigError(f"{where}, dataset {k + 1}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(KEYS))}")
    if not entry.get("path") or not isinstance(entry["path"], str):
        raise ConfigError(f"{where}, dataset {k + 1}: no path; give each dataset a path (folder, .zip or URL)")
    repeats = entry.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"{where}, dataset {k + 1}: repeats={repeats!r} must be a whole number >= 1")
    if not isinstance(entry.get("regularization", False), bool):
        raise ConfigError(f"{where}, dataset {k + 1}: regularization must be true or false")
    for key in ("trigger_word", "default_caption"):
        if key in entry and not isinstance(entry[key], str):
            raise ConfigError(f"{where}, dataset {k + 1}: {key} must be text")
    path = entry["path"]
    if not path.startswith(("http://", "https://")) and not Path(path).expanduser().is_absolute():
        path = str(base / path)  # relative to the datasets file, wherever train runs from
    return DatasetSpec(**{**entry, "path": path})


def load_datasets(source: str) -> list[DatasetSpec]:
    """The datasets a `--data FILE.yaml` lists, checked: one line per problem, naming the entry."""
    import yaml

    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"datasets file {source} does not exist; pass --data FOLDER, a .zip, a URL or a datasets .yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"datasets file {source} is not valid YAML ({type(e).__name__}); see flux_lora/data/datasets.py") from None
    entries = raw.get("datasets") if isinstance(raw, dict) else raw
    if isinstance(raw, dict) and set(raw) - {"datasets"}:
        raise ConfigError(f"datasets file {source}: unknown top-level key {sorted(set(raw) - {'datasets'})[0]!r}; "
                          "it holds `datasets:` and a list")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"datasets file {source} lists no datasets; write `datasets:` and a list of entries with a path")
    specs = [_spec(entry, k, f"datasets file {source}", path.parent) for k, entry in enumerate(entries)]
    if all(s.regularization for s in specs):
        raise ConfigError(f"datasets file {source}: every dataset is regularization; at least one must hold the concept")
    return specs


def manifest_entry(spec: DatasetSpec, first: int, count: int) -> dict:
    """What the cache's manifest records of a dataset: its settings and its items' index range."""
    return {**dataclasses.asdict(spec), "first": first, "count": count}


def dataset_of(datasets: list[dict], index: int) -> int:
    """Which dataset (position in the manifest's list) holds the item with this index."""
    for k, d in enumerate(datasets):
        if d["first"] <= index < d["first"] + d["count"]:
            return k
    raise IndexError(f"item {index} is in no dataset of the manifest")


def repeated(positions: list[int], indices: list[int], datasets: list[dict] | None) -> list[int]:
    """The training positions of an epoch with each dataset's repeats: position p appears as often
    as its item's dataset says, in order (the sampler shuffles from the seed)."""
    if not datasets:
        return positions
    return [p for p, i in zip(positions, indices) for _ in range(datasets[dataset_of(datasets, i)]["repeats"])]
