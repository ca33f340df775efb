"""Where a dataset comes from: a folder, a ZIP or a URL of a ZIP, turned into a folder of images
with their sidecar captions. Everything read from a dataset stays inside it (no symbolic links
followed, no ZIP entry written outside the extraction folder); downloads are keyed by URL and
checked; extraction and download are atomic, so a failure leaves nothing half-made behind."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import stat
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from flux_lora.errors import DataError
from flux_lora.outputs import files

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff"}
# Image files Pillow cannot decode, which users drop into datasets (phones, cameras, vector art)
UNREADABLE_KINDS = {".heic": "HEIC", ".heif": "HEIF", ".svg": "SVG", ".dng": "camera raw", ".cr2": "camera raw",
                    ".cr3": "camera raw", ".nef": "camera raw", ".arw": "camera raw", ".raf": "camera raw",
                    ".orf": "camera raw", ".rw2": "camera raw"}
MAX_ZIP_RATIO = 200  # a real image compresses 1-3x; a zip bomb compresses 1000x
RATIO_CHECK_BYTES = 2**20  # below this much unpacked data a high ratio is harmless


@dataclass(frozen=True)
class SourceImage:
    path: Path
    name: str  # path relative to the dataset root (stable across folder / zip)
    caption: str | None  # from a sidecar .txt, None if there is none
    note: str | None = None  # what a person should hear about this item's files (a warning)
    control: Path | None = None  # an editing pair's control (input) image; the item is the target
    mask: Path | None = None  # its loss mask (masks/STEM.*), or None
    mask_from_alpha: bool = False  # the loss mask is the image's own alpha channel
    dataset: int = 0  # which dataset of a datasets file (data/datasets.py) it comes from
    trigger_word: str | None = None  # its dataset's trigger word (None: data.trigger_word)
    default_caption: str | None = None  # its dataset's caption for images without one (None: data.default_caption)
    several_captions: bool = False  # caption holds one caption per line (a metadata.jsonl list)


CONTROL_DIR = "control"
CONTROL_SUFFIX = "_control"


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def contained(path: Path, root: Path) -> bool:
    """A real file inside root: not a symbolic link, and resolving to a path under root."""
    try:
        return not path.is_symlink() and path.is_file() and Path(root).resolve() in path.resolve().parents
    except OSError:
        return False


METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face's imagefolder layout
CAPTION_FIELDS = ("text", "caption", "captions")


def read_metadata(folder: Path, root: Path, follow_symlinks: bool = False) -> dict[str, tuple[str, bool]]:
    """FOLDER/metadata.jsonl or metadata.csv, where there is one (Hugging Face's imagefolder layout:
    at the root or in a folder below, its file_name relative to it): image path relative to root ->
    (caption, several). "text" or "caption" is one caption; a JSON list (or "captions") several, one
    drawn per step. One line naming the line for a row without a file_name and a caption. (A
    symbolic link is read only with follow_symlinks.)"""
    prefix = PurePosixPath(Path(folder).relative_to(root).as_posix())
    out = {}
    for path in (Path(folder) / name for name in METADATA_FILES):
        if not (path.is_file() if follow_symlinks else contained(path, root)):
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; save it as UTF-8") from None
        for file_name, texts in _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text):
            texts = [t.strip() for t in texts if t.strip()]
            if texts:
                key = (prefix / PurePosixPath(file_name.replace("\\", "/"))).as_posix()
                out[key] = ("\n".join(texts), len(texts) > 1)
    return out


def _jsonl_rows(path: Path, text: str):
    """(file_name, captions) per line of a metadata.jsonl."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        field = next((f for f in CAPTION_FIELDS if isinstance(row, dict) and f in row), None)
        value = row.get(field) if field else None
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not texts \
                or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{path} line {n} is not a JSON object with a file_name and a text (or a list of "
                            "captions); fix that line")
        yield row["file_name"], texts


def _csv_rows(path: Path, text: str):
    """(file_name, [caption]) per row of a metadata.csv with a header naming file_name and text (or caption)."""
    reader = csv.DictReader(io.StringIO(text))
    field = next((f for f in CAPTION_FIELDS[:2] if f in (reader.fieldnames or [])), None)
    if "file_name" not in (reader.fieldnames or []) or field is None:
        raise DataError(f"{path} needs a header with a file_name column and a text (or caption) column; "
                        f"its first line is {text.splitlines()[0][:80] if text.strip() else 'empty'!r}")
    for row in reader:
        if not row.get("file_name"):
            raise DataError(f"{path} line {reader.line_num} has no file_name; fix that line")
        yield row["file_name"], [row.get(field) or ""]


def discover(root: Path, caption_extension: str = ".txt", follow_symlinks: bool = False) -> list[SourceImage]:
    """Images under root, recursively, sorted by relative path (`scan`'s items)."""
    return scan(root, caption_extension, follow_symlinks)[0]


LINK_NOT_FOLLOWED = ("a symbolic link: not followed (it could read outside the dataset); copy the file into the "
                     "dataset, or pass --follow-symlinks")


def scan(root: Path, caption_extension: str = ".txt",
         follow_symlinks: bool = False) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """(images under root, recursively, sorted by relative path, with captions from same-stem
    caption files (caption_extension), else from a metadata.jsonl/.csv above them; the files left
    out that look like images, as (relative name, why)). Symbolic links (images, folders or
    captions) are not followed unless follow_symlinks: they could read outside the dataset. (For
    editing pairs, `pair_controls` then takes the control images out of the list.)"""
    items, skipped, metadata, walked = [], [], {}, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):  # top-down: metadata first
        here = Path(dirpath)
        if follow_symlinks:
            real = here.resolve()
            if real in walked:  # a link back up the tree: that folder was walked already
                dirnames[:] = []
                continue
            walked.add(real)
        metadata.update(read_metadata(here, root, follow_symlinks))
        for d in sorted(dirnames):
            if not follow_symlinks and (here / d).is_symlink() and not _hidden(PurePosixPath(d)):
                skipped.append((_relative(here / d, root), "a symbolic link to a folder: not followed (it could read "
                                "outside the dataset); move or copy the folder into the dataset, or pass --follow-symlinks"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for fn in sorted(filenames):
            p = here / fn
            rel = PurePosixPath(_relative(p, root))
            suffix = p.suffix.lower()
            if _hidden(rel) or (suffix not in IMAGE_SUFFIXES and suffix not in UNREADABLE_KINDS):
                continue
            if suffix in UNREADABLE_KINDS:
                skipped.append((str(rel), f"a {UNREADABLE_KINDS[suffix]} file, which flux_lora cannot read; "
                                          "convert it to JPEG or PNG"))
            elif p.is_symlink() and not follow_symlinks:
                skipped.append((str(rel), LINK_NOT_FOLLOWED))
            elif p.is_symlink() and not p.is_file():
                skipped.append((str(rel), "a symbolic link to nothing (its target is gone, or it loops); fix or remove it"))
            elif follow_symlinks or contained(p, root):
                items.append(_with_caption(p, rel, root, metadata, caption_extension, follow_symlinks))
    items.sort(key=lambda s: s.name)
    return items, sorted(skipped)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _with_caption(p: Path, rel: PurePosixPath, root: Path, metadata: dict, extension: str = ".txt",
                  follow_symlinks: bool = False) -> SourceImage:
    """The image at p with its caption: its caption file beside it (not a link unless
    follow_symlinks), else a metadata file's."""
    caption, note = None, None
    txt = next((t for t in (p.with_suffix(extension), p.with_suffix(extension.upper())) if t.is_file() or t.is_symlink()),
               None)
    if txt is not None and not (txt.is_file() if follow_symlinks else contained(txt, root)):
        note = (f"caption {txt.name} is a symbolic link to nothing; ignored" if follow_symlinks else
                f"caption {txt.name} is a symbolic link or lies outside the dataset; ignored (--follow-symlinks reads it)")
    elif txt is not None:
        caption, note = read_caption(txt)
    several = False
    if not caption and str(rel) in metadata:
        caption, several = metadata[str(rel)]
    return SourceImage(p, str(rel), caption, note, several_captions=several)


def supported_kinds() -> str:
    """The image types discovery takes, for messages: "jpg, jpeg, ..."."""
    return ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))


MASK_DIR = "masks"


def is_mask(name: str) -> bool:
    return MASK_DIR in PurePosixPath(name).parts[:-1]


def attach_masks(sources: list[SourceImage], mode: str) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """Loss masks per data.masks: `folder` (or `auto` with a masks/ folder present) takes
    DIR/masks/STEM.* out of the images and gives it to DIR/STEM.*; `alpha` marks every image to use
    its alpha channel. Returns (images, problems as (file, message)): an image without a mask
    (trained unmasked) and a mask without an image (ignored)."""
    masks = {str(PurePosixPath(s.name).parent.parent / PurePosixPath(s.name).stem): s for s in sources if is_mask(s.name)}
    images = [s for s in sources if not is_mask(s.name)]
    if mode == "alpha":
        return [dataclasses.replace(s, mask_from_alpha=True) for s in images], []
    if mode == "off" or (mode == "auto" and not masks):
        return images, []
    out, problems, used = [], [], set()
    for s in images:
        key = str(PurePosixPath(s.name).with_suffix(""))
        mask = masks.get(key)
        if mask is None:
            problems.append((s.name, f"{s.name} has no mask in {MASK_DIR}/; it trains on the whole image"))
        else:
            used.add(key)
        out.append(dataclasses.replace(s, mask=mask.path if mask else None))
    problems += [(m.name, f"{m.name} masks no image (none named {PurePosixPath(key).name}.*); ignored")
                 for key, m in masks.items() if key not in used]
    return out, problems


def is_control(name: str) -> bool:
    """A control image of an editing pair: under a `control/` folder, or named STEM_control.EXT."""
    rel = PurePosixPath(name)
    return CONTROL_DIR in rel.parts[:-1] or rel.stem.endswith(CONTROL_SUFFIX)


def _control_candidates(target: str) -> list[str]:
    """Where target DIR/STEM.EXT's control may be: DIR/control/STEM.* or DIR/STEM_control.*."""
    rel = PurePosixPath(target)
    return [str(rel.parent / CONTROL_DIR / rel.stem), str(rel.parent / (rel.stem + CONTROL_SUFFIX))]


def pair_controls(sources: list[SourceImage]) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """Editing pairs: each target image with the control image of the same stem, found in a
    `control/` folder beside it or as STEM_control.EXT. Returns (targets with their control,
    problems): a target without a control is left out, a control without a target is ignored,
    and both are named in the problems, (file, message) (the caller warns, or fails under --strict)."""
    controls = {str(PurePosixPath(s.name).with_suffix("")): s for s in sources if is_control(s.name)}
    used, pairs, problems = set(), [], []
    for s in sources:
        if is_control(s.name):
            continue
        found = [controls[c] for c in _control_candidates(s.name) if c in controls]
        if not found:
            stem = PurePosixPath(s.name).stem
            problems.append((s.name, f"{s.name} has no control image (control/{stem}.* or {stem}{CONTROL_SUFFIX}.* "
                                     "beside it); pair skipped"))
            continue
        if len(found) > 1:
            problems.append((s.name, f"{s.name} has two control images ({found[0].name}, {found[1].name}); "
                                     f"using {found[0].name}"))
        used.add(found[0].name)
        note = "; ".join(n for n in (s.note, _shape_mismatch(s, found[0])) if n) or None
        pairs.append(SourceImage(s.path, s.name, s.caption, note, control=found[0].path))
    for c in sorted(set(c.name for c in controls.values()) - used):
        problems.append((c, f"control image {c} matches no target image; ignored"))
    return pairs, problems


def _oriented_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF rotation applied), from the header only; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _shape_mismatch(target: SourceImage, control: SourceImage) -> str | None:
    """A note when a control's aspect ratio differs from its target's by more than 5%: it is
    resized to the target's bucket, i.e. stretched."""
    a, b = _oriented_size(target.path), _oriented_size(control.path)
    if a is None or b is None or abs(a[0] / a[1] - b[0] / b[1]) <= 0.05 * a[0] / a[1]:
        return None
    return (f"control {control.name} is {b[0]}×{b[1]}, its target {a[0]}×{a[1]}: the control is stretched to the "
            "target's size; crop it to the same aspect ratio")


def read_caption(path: Path) -> tuple[str, str | None]:
    """(caption, note): UTF-8 (with or without Notepad's BOM) or UTF-16 with its BOM as is;
    other bytes are read as Windows-1252/Latin-1, with a note saying so. An empty file gives ""."""
    raw = path.read_bytes()
    note = None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    elif raw.count(b"\x00") > len(raw) // 4:  # UTF-16 without its BOM: every other byte is zero
        text = raw.decode("utf-16-le" if raw[1:2] == b"\x00" else "utf-16-be", errors="replace")
        note = f"caption {path.name} looks like UTF-16 without a byte-order mark; read it as UTF-16 (save it as UTF-8)"
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
            note = f"caption {path.name} is not UTF-8; read it as Windows-1252/Latin-1 (save it as UTF-8 to be sure)"
    return text.strip(), note  # an empty file is an empty caption (kohya, ai-toolkit): the trigger word alone


def check_zip(path: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The entries to extract; raises DataError for path escapes, links, encryption and zip bombs."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable ZIP archive ({e}); re-create the archive") from None
    with zf:
        members, total, packed = [], 0, 0
        for info in zf.infolist():
            name = info.filename
            pure = PurePosixPath(name.replace("\\", "/"))
            if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
                raise DataError(f"{path}: entry '{name}' would write outside the extraction folder; refusing this ZIP")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{path}: entry '{name}' is a symbolic link; refusing this ZIP (store real files)")
            if info.is_dir() or _hidden(pure):
                continue
            if info.flag_bits & 0x1:
                raise DataError(f"{path}: entry '{name}' is encrypted; flux_lora reads unencrypted ZIPs only "
                                "(re-create the archive without a password)")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
                raise DataError(f"{path}: entry '{name}' uses compression method {info.compress_type}, which Python "
                                "cannot read; re-create the archive with standard (deflate) compression")
            total, packed = total + info.file_size, packed + info.compress_size
            if total > max_bytes:
                raise DataError(f"{path} unpacks to more than {max_bytes} bytes (zip bomb?); "
                                "split the dataset or raise preprocess.max_zip_bytes")
            _check_ratio(path, name, info.file_size, info.compress_size)
            members.append(info)
        _check_ratio(path, None, total, packed)  # many small entries add up
        return members


def _check_ratio(path: Path, entry: str | None, unpacked: int, packed: int) -> None:
    if packed and unpacked > RATIO_CHECK_BYTES and unpacked / packed > MAX_ZIP_RATIO:
        what = f"entry '{entry}'" if entry else "the archive as a whole"
        raise DataError(f"{path}: {what} has compression ratio {unpacked // packed}:1 (zip bomb?); refusing this ZIP")


def extract_zip(path: Path, dest: Path, max_bytes: int, refresh: bool = False) -> Path:
    """Extract a checked ZIP into dest once (a marker records which archive); atomic as a whole."""
    marker = dest / ".extracted"
    if not refresh and marker.is_file() and marker.read_text() == _zip_identity(path):
        return dest
    members = check_zip(path, max_bytes)

    def build(tmp: Path) -> None:
        root = tmp.resolve()
        with zipfile.ZipFile(path) as zf:
            for info in members:
                target = (tmp / info.filename.replace("\\", "/")).resolve()  # Windows tools write backslashes
                if root not in target.parents:  # belt and braces after check_zip
                    raise DataError(f"{path}: entry '{info.filename}' escapes the extraction folder")
                files.write_atomic(target, lambda out, info=info: _copy_entry(zf, info, out, path), every_rank=True)
        files.write_atomic(tmp / ".extracted", _zip_identity(path), every_rank=True)

    try:
        files.commit_dir(dest, build, every_rank=True)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot extract ({type(e).__name__}: {str(e)[:160]}); re-create the archive") from None
    return dest


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out, path: Path) -> None:
    written = 0
    with zf.open(info) as src:
        while chunk := src.read(2**20):
            written += len(chunk)
            if written > info.file_size:  # the header lied about the size
                raise DataError(f"{path}: entry '{info.filename}' is larger than its header says; refusing")
            out.write(chunk)


def _zip_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def download(url: str, folder: Path, progress: Callable[[int, int], None] | None = None, refresh: bool = False) -> Path:
    """Download url into folder once, keyed by the URL (two URLs with one file name do not mix).
    A finished download is reused while its record (URL, size, sha256) still matches the file;
    `refresh` (--overwrite) fetches it again. What arrives must be a ZIP archive."""
    name = PurePosixPath(url.split("?")[0]).name or "dataset.zip"
    dest = Path(folder) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    record = dest.with_name(dest.name + ".json")
    known = files.read_json(record)
    if not refresh and known and known.get("url") == url and dest.is_file() \
            and dest.stat().st_size == known.get("bytes") and files.sha256_file(dest) == known.get("sha256"):
        return dest
    record.unlink(missing_ok=True)
    try:
        files.write_atomic(dest, lambda out: _fetch(url, out, progress), every_rank=True)
    except OSError as e:
        raise DataError(f"cannot download {url}: {e}; check the URL or download it and pass the file") from None
    if not zipfile.is_zipfile(dest):
        head = dest.read_bytes()[:64].decode("utf-8", errors="replace").replace("\n", " ")
        dest.unlink(missing_ok=True)
        raise DataError(f"{url} did not return a ZIP archive (it starts with {head!r}); check the URL "
                        "(an error page or a login page is not the dataset)")
    files.write_atomic(record, {"url": url, "bytes": dest.stat().st_size, "sha256": files.sha256_file(dest)}, as_json=True,
                       every_rank=True)
    return dest


def _fetch(url: str, out, progress: Callable[[int, int], None] | None) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        while chunk := resp.read(2**20):
            out.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)


def resolve_source(source: str, work_dir: Path, max_zip_bytes: int,
                   progress: Callable[[int, int], None] | None = None, refresh: bool = False) -> Path:
    """A local folder holding the images: the folder itself, or a ZIP (local or URL) extracted
    under work_dir. `refresh` downloads and extracts again. Call on one rank only."""
    if not source:
        raise DataError("no images given; pass --data FOLDER, --data FILE.zip or --data https://.../FILE.zip")
    if source.startswith(("http://", "https://")):
        source = str(download(source, work_dir / "download", progress, refresh))
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and zipfile.is_zipfile(p):
        return extract_zip(p, work_dir / "extracted", max_zip_bytes, refresh)
    if p.is_file():
        raise DataError(f"{p} is neither a folder nor a ZIP archive; pass a folder of images or a .zip")
    raise DataError(f"data source {p} does not exist; pass a folder of images, a .zip or an http(s) URL")
