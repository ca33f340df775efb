"""Dataset ingest: folder / ZIP / URL discovery (safe extraction), sidecar captions, image decoding
(EXIF, alpha, CMYK, 16-bit) and aspect-ratio buckets."""

from __future__ import annotations

import math
import os
import shutil
import stat
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from flux_lora.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
MAX_ZIP_RATIO = 200  # a real image compresses 1-3x; a zip bomb compresses 1000x


@dataclass(frozen=True)
class SourceImage:
    path: Path
    name: str  # path relative to the dataset root (stable across folder / zip)
    caption: str | None  # from a sidecar .txt, None if there is none


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def discover(root: Path) -> list[SourceImage]:
    """Images under root, recursively, sorted by relative path; captions from same-stem .txt files."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = PurePosixPath(p.relative_to(root).as_posix())
            if _hidden(rel) or p.suffix.lower() not in IMAGE_SUFFIXES or p.is_symlink():
                continue
            txt = next((t for t in (p.with_suffix(".txt"), p.with_suffix(".TXT")) if t.is_file()), None)
            caption = _read_caption(txt) if txt else None
            items.append(SourceImage(p, str(rel), caption))
    items.sort(key=lambda s: s.name)
    return items


def _read_caption(path: Path) -> str | None:
    text = path.read_bytes().decode("utf-8-sig", errors="replace").strip()  # -sig: Notepad's BOM
    return text or None


def check_zip(path: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The entries to extract; raises DataError for path escapes, links and zip bombs."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable ZIP archive ({e}); re-create the archive") from None
    with zf:
        members, total = [], 0
        for info in zf.infolist():
            name = info.filename
            pure = PurePosixPath(name.replace("\\", "/"))
            if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
                raise DataError(f"{path}: entry '{name}' would write outside the extraction folder; refusing this ZIP")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"{path}: entry '{name}' is a symbolic link; refusing this ZIP (store real files)")
            if info.is_dir() or _hidden(pure):
                continue
            total += info.file_size
            if total > max_bytes:
                raise DataError(f"{path} unpacks to more than {max_bytes} bytes (zip bomb?); "
                                "split the dataset or raise preprocess.max_zip_bytes")
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > 2**20:
                raise DataError(f"{path}: entry '{name}' has compression ratio "
                                f"{info.file_size // info.compress_size}:1 (zip bomb?); refusing this ZIP")
            members.append(info)
        return members


def extract_zip(path: Path, dest: Path, max_bytes: int) -> Path:
    """Extract a checked ZIP into dest (once: a marker file records completion)."""
    marker = dest / ".extracted"
    if marker.is_file() and marker.read_text() == _zip_identity(path):
        return dest
    members = check_zip(path, max_bytes)
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    with zipfile.ZipFile(path) as zf:
        for info in members:
            target = (tmp / info.filename.replace("\\", "/")).resolve()  # Windows tools write backslashes
            if root not in target.parents:  # belt and braces after check_zip
                raise DataError(f"{path}: entry '{info.filename}' escapes the extraction folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(2**20):
                    written += len(chunk)
                    if written > info.file_size:  # the header lied about the size
                        raise DataError(f"{path}: entry '{info.filename}' is larger than its header says; refusing")
                    dst.write(chunk)
    (tmp / ".extracted").write_text(_zip_identity(path))
    os.replace(tmp, dest)
    return dest


def _zip_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def download(url: str, dest: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Download url to dest once (a complete file is reused), via a temp name."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while chunk := resp.read(2**20):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {e}; check the URL or download it and pass the file") from None
    os.replace(tmp, dest)
    return dest


def resolve_source(source: str, work_dir: Path, max_zip_bytes: int,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """A local folder holding the images: the folder itself, or a ZIP (local or URL) extracted
    under work_dir. Call on one rank only; the others wait at a barrier."""
    if not source:
        raise DataError("no images given; pass --data FOLDER, --data FILE.zip or --data https://.../FILE.zip")
    if source.startswith(("http://", "https://")):
        name = PurePosixPath(source.split("?")[0]).name or "dataset.zip"
        source = str(download(source, work_dir / "download" / name, progress))
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and zipfile.is_zipfile(p):
        return extract_zip(p, work_dir / "extracted", max_zip_bytes)
    if p.is_file():
        raise DataError(f"{p} is neither a folder nor a ZIP archive; pass a folder of images or a .zip")
    raise DataError(f"data source {p} does not exist; pass a folder of images, a .zip or an http(s) URL")


# ---------------------------------------------------------------- decoding

def load_rgb(path: Path):
    """Decode any supported image to 8-bit RGB: EXIF orientation applied, alpha composited on
    white, CMYK / 16-bit / greyscale / palette converted. Raises DataError if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path.name}: image is too large ({e}); downscale it first") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path.name}: not a readable image ({type(e).__name__}: {str(e)[:120]})") from None


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if a.max() > 255 else 255.0
        im = Image.fromarray((a / scale * 255).clip(0, 255).astype("uint8"), "L")
    if im.mode == "F":
        im = im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------- buckets

def make_buckets(resolution: int, square: bool = False, step: int = 16,
                 max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiple of `step` and area about resolution²."""
    if square:
        return [(resolution, resolution)]
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * 4:
        h = int(area / w) // step * step
        if h >= step and 1 / max_ratio <= w / h <= max_ratio:
            buckets.add((w, h))
        w += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_to_bucket(im, bucket: tuple[int, int]):
    """Scale to cover the bucket, then center-crop to exactly (width, height)."""
    from PIL import Image

    bw, bh = bucket
    scale = max(bw / im.width, bh / im.height)
    nw, nh = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return im.crop((left, top, left + bw, top + bh))
