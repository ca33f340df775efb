"""Where a dataset comes from (flux_lora.data.sources): discovery (and what it leaves out, named),
captions and their encodings, containment (no symbolic link followed out of the dataset), safe ZIP
extraction, downloads keyed by URL.   pytest -q tests/test_sources.py"""

import io
import stat
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image, features

from flux_lora.data.sources import check_zip, discover, download, extract_zip, read_caption, resolve_source, scan
from flux_lora.errors import DataError


def _png(path, size=(20, 10), mode="RGB", color=(10, 20, 30)):
    Image.new(mode, size, color).save(path)
    return path


def test_discover_sorted_recursive_with_captions(tmp_path):
    (tmp_path / "b").mkdir()
    _png(tmp_path / "b" / "z.png")
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a caption \n")
    _png(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    (tmp_path / "__MACOSX").mkdir()
    _png(tmp_path / "__MACOSX" / "x.png")
    items = discover(tmp_path)
    assert [i.name for i in items] == ["a.png", "b/z.png"]
    assert items[0].caption == "a caption" and items[1].caption is None

def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            if isinstance(name, zipfile.ZipInfo):
                zf.writestr(name, data)
            else:
                zf.writestr(name, data)
    return path

def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf.getvalue()

@pytest.mark.parametrize("bad", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_zip_slip_refused_and_nothing_written(tmp_path, bad):
    z = _zip(tmp_path / "d.zip", [("ok.png", _png_bytes()), (bad, _png_bytes())])
    dest = tmp_path / "cache" / "extracted"
    with pytest.raises(DataError, match="outside the extraction folder"):
        extract_zip(z, dest, 2**30)
    assert not dest.exists() and not (tmp_path / "evil.png").exists() and not (tmp_path / "cache" / "evil.png").exists()

def test_zip_symlink_refused(tmp_path):
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = _zip(tmp_path / "d.zip", [(info, "/etc/passwd")])
    with pytest.raises(DataError, match="symbolic link"):
        check_zip(z, 2**30)

def test_zip_bomb_refused(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * (20 * 2**20))
    with pytest.raises(DataError, match="zip bomb"):
        check_zip(z, 2**30)
    with pytest.raises(DataError, match="zip bomb"):
        check_zip(z, 2**20)  # total size limit alone

def test_zip_extraction_skips_junk_and_is_done_once(tmp_path):
    z = _zip(tmp_path / "d.zip", [("imgs/a.png", _png_bytes()), ("imgs/a.txt", "cap"), ("__MACOSX/imgs/._a.png", "x"),
                                  ("imgs/._a.png", "x")])
    dest = extract_zip(z, tmp_path / "x", 2**30)
    names = [i.name for i in discover(dest)]
    assert names == ["imgs/a.png"]
    marker_time = (dest / ".extracted").stat().st_mtime_ns
    extract_zip(z, tmp_path / "x", 2**30)
    assert (dest / ".extracted").stat().st_mtime_ns == marker_time

def test_resolve_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"), tmp_path, 2**30)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="neither a folder nor a ZIP"):
        resolve_source(str(tmp_path / "f.txt"), tmp_path, 2**30)
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError):
        resolve_source(str(tmp_path / "bad.zip"), tmp_path, 2**30)

def test_awkward_names_bom_and_windows_zips(tmp_path):
    _png(tmp_path / "Ünïcode name (1).PNG")
    (tmp_path / "Ünïcode name (1).txt").write_bytes("\ufeffa caption with BOM\r\n".encode("utf-8"))
    _png(tmp_path / "UPPER.JPG".replace(".JPG", ".png"))
    (tmp_path / "UPPER.TXT").write_text("upper caption")
    items = {i.name: i.caption for i in discover(tmp_path)}
    assert items == {"UPPER.png": "upper caption", "Ünïcode name (1).PNG": "a caption with BOM"}
    z = _zip(tmp_path / "win.zip", [("photos\\a.png", _png_bytes())])
    dest = extract_zip(z, tmp_path / "x", 2**30)
    assert [i.name for i in discover(dest)] == ["photos/a.png"]


def test_caption_symlink_is_not_followed_out_of_the_dataset(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "a.png")
    (data / "a.txt").symlink_to(secret)
    _png(data / "b.png")
    (data / "b.txt").symlink_to(data / "c.txt")  # inside, but still a link: not followed either
    (data / "c.txt").write_text("fine")
    _png(data / "c.png")
    items = {i.name: i for i in discover(data)}
    assert items["a.png"].caption is None and "symbolic link" in items["a.png"].note
    assert items["b.png"].caption is None and items["c.png"].caption == "fine"
    assert all("root:x" not in (i.caption or "") for i in items.values())


@pytest.mark.parametrize("raw, text, warned", [
    ("a café".encode("utf-8"), "a café", False),
    (b"\xef\xbb\xbf" + "a café".encode("utf-8"), "a café", False),  # Notepad's BOM
    ("a café".encode("utf-16"), "a café", False),  # with its BOM
    ("a café".encode("utf-16-le"), "a café", True),  # without a BOM
    ("a café".encode("latin-1"), "a café", True),
])
def test_caption_encodings_are_read_or_named(tmp_path, raw, text, warned):
    path = tmp_path / "a.txt"
    path.write_bytes(raw)
    caption, note = read_caption(path)
    assert caption == text and (note is not None) == warned


def _encrypted_zip(path):
    """A ZIP whose entry says it is encrypted (zipfile cannot write one; the flag is what readers see)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", _png_bytes())
    data = bytearray(path.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        data[at + flag_at] |= 0x1
    path.write_bytes(bytes(data))
    return path


def test_encrypted_zip_is_one_line_and_leaves_nothing(tmp_path):
    z = _encrypted_zip(tmp_path / "secret.zip")
    work = tmp_path / "cache"
    with pytest.raises(DataError, match="encrypted"):
        resolve_source(str(z), work, 2**30)
    assert not work.exists() or not any(p.name.endswith(".tmp") or p.name == "extracted" for p in work.iterdir())


def test_many_small_highly_compressed_entries_are_refused_as_a_whole(tmp_path):
    z = tmp_path / "small-bombs.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(300):
            zf.writestr(f"f{i}.png", b"\0" * 8192)  # each under the per-entry check's 1 MiB
    with pytest.raises(DataError, match="as a whole.*zip bomb"):
        check_zip(z, 2**30)


def test_failed_extraction_leaves_the_previous_extraction_and_no_temp(tmp_path):
    good = _zip(tmp_path / "good.zip", [("a.png", _png_bytes())])
    dest = tmp_path / "extracted"
    extract_zip(good, dest, 2**30)
    bad = _zip(tmp_path / "bad.zip", [("b.png", _png_bytes())])
    data = bytearray(bad.read_bytes())
    at = data.find(b"PK\x03\x04") + 30 + len("b.png")
    data[at:at + 8] = b"\xff" * 8  # corrupt the deflated stream
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError):
        extract_zip(bad, dest, 2**30)
    assert (dest / "a.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


@pytest.fixture()
def web(tmp_path):
    root = tmp_path / "www"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_downloads_are_keyed_by_url_checked_and_refreshed(tmp_path, web):
    root, base = web
    work = tmp_path / "dl"
    (root / "a" / "data.zip").write_bytes(b"<html>502 Bad Gateway</html>")  # a failed first try
    with pytest.raises(DataError, match="did not return a ZIP"):
        download(f"{base}/a/data.zip", work)
    assert not any(work.iterdir())  # nothing kept that a rerun would trust
    _zip(root / "a" / "data.zip", [("a.png", _png_bytes())])
    _zip(root / "b" / "data.zip", [("b1.png", _png_bytes()), ("b2.png", _png_bytes())])
    first = download(f"{base}/a/data.zip", work)
    other = download(f"{base}/b/data.zip", work)  # same file name, another URL
    assert first != other and len(zipfile.ZipFile(other).namelist()) == 2
    _zip(root / "a" / "data.zip", [("a.png", _png_bytes()), ("new.png", _png_bytes())])
    assert len(zipfile.ZipFile(download(f"{base}/a/data.zip", work)).namelist()) == 1  # reused
    assert len(zipfile.ZipFile(download(f"{base}/a/data.zip", work, refresh=True)).namelist()) == 2
    first.write_bytes(b"tampered")  # a record that no longer matches its file is not trusted
    assert len(zipfile.ZipFile(download(f"{base}/a/data.zip", work)).namelist()) == 2


def _skips_folder(tmp_path):
    """A dataset with readable images of every taken type beside what discovery must leave out."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    _png(data / "a.png")
    Image.new("RGB", (12, 8), (200, 0, 0)).save(data / "b.jfif", "JPEG")
    frames = [Image.new("RGB", (10, 6), c) for c in ((0, 200, 0), (0, 0, 200))]
    frames[0].save(data / "c.gif", save_all=True, append_images=frames[1:])
    if features.check("avif"):  # Pillow's wheels read AVIF from 11.3 on
        Image.new("RGB", (16, 8), (0, 0, 200)).save(data / "d.avif")
    (data / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (data / "link.png").symlink_to(data / "a.png")
    _png(outside / "e.png")
    (data / "linked").symlink_to(outside, target_is_directory=True)
    return data


def test_discovery_takes_jfif_gif_avif_and_names_what_it_leaves_out(tmp_path):
    from flux_lora.data.images import load_rgb

    data = _skips_folder(tmp_path)
    items, skipped = scan(data)
    avif = features.check("avif")
    assert [i.name for i in items] == ["a.png", "b.jfif", "c.gif"] + ["d.avif"] * avif
    assert [load_rgb(i.path).size for i in items[1:]] == [(12, 8), (10, 6)] + [(16, 8)] * avif
    assert load_rgb(items[2].path).getpixel((0, 0)) == (0, 200, 0)  # a GIF's first frame
    why = dict(skipped)
    assert sorted(why) == ["link.png", "linked", "phone.HEIC"]
    assert "symbolic link" in why["link.png"] and "copy the file" in why["link.png"]
    assert "symbolic link to a folder" in why["linked"]
    assert "HEIC" in why["phone.HEIC"] and "convert it to JPEG or PNG" in why["phone.HEIC"]
    assert discover(data) == items


class _Warnings:
    def __init__(self):
        self.lines, self.infos = [], []

    def warning(self, text, file=None):
        self.lines.append(text)

    def info(self, text):
        self.infos.append(text)


def test_find_sources_warns_of_each_skip_fails_under_strict_and_explains_an_empty_folder(tmp_path):
    from types import SimpleNamespace

    from flux_lora.data.preprocess import SKIPS_NAMED, find_sources

    family = SimpleNamespace(paired=False, title="FLUX.1")
    data = _skips_folder(tmp_path)
    reporter = _Warnings()
    assert len(find_sources(data, family, False, reporter)) == len(scan(data)[0])
    assert reporter.lines == [f"skipping {name}: {why}" for name, why in scan(data)[1]]
    with pytest.raises(DataError, match=r"link\.png: a symbolic link.*\(--strict\)"):
        find_sources(data, family, True, _Warnings())

    links = tmp_path / "links"
    links.mkdir()
    for k in range(SKIPS_NAMED + 3):
        (links / f"{k:02d}.png").symlink_to(data / "a.png")
    reporter = _Warnings()
    with pytest.raises(DataError, match=r"no images \(.*gif.*\) found in .*13 files left out, e.g. 00\.png: a symbolic link"):
        find_sources(links, family, False, reporter)
    assert len(reporter.lines) == SKIPS_NAMED + 1
    assert reporter.lines[-1] == f"skipping 3 more files in {links}: 3 symbolic links, 0 of types flux_lora cannot read"


def test_caption_files_of_another_extension(tmp_path):
    """kohya's .caption sidecars with data.caption_extension; a bad extension is one line."""
    from types import SimpleNamespace

    from flux_lora.config import build_config
    from flux_lora.data.preprocess import find_sources
    from flux_lora.errors import ConfigError

    for stem in ("a", "b", "c"):
        _png(tmp_path / f"{stem}.png")
    (tmp_path / "a.caption").write_text("a from kohya\n")
    (tmp_path / "b.CAPTION").write_text("b shouted")
    (tmp_path / "c.txt").write_text("c's .txt is not read now")
    assert {i.name: i.caption for i in discover(tmp_path, ".caption")} == {"a.png": "a from kohya", "b.png": "b shouted",
                                                                          "c.png": None}
    assert {i.name: i.caption for i in discover(tmp_path)}["c.png"] == "c's .txt is not read now"
    assert build_config(None, {"data.caption_extension": ".caption"}).data.caption_extension == ".caption"
    for bad in ("caption", ".", "a/b", ""):
        with pytest.raises(ConfigError, match=rf"data.caption_extension={bad!r} is not a file extension"):
            build_config(None, {"data.caption_extension": bad})
    with pytest.raises(ConfigError, match=r"data.caption_extension='.PNG' is an image type"):
        find_sources(tmp_path, SimpleNamespace(paired=False), False, None, caption_extension=".PNG")


def test_an_empty_caption_file_is_the_empty_caption_not_a_missing_one(tmp_path):
    """kohya's and ai-toolkit's meaning: the image trains on the trigger word alone; said once."""
    from types import SimpleNamespace

    from flux_lora.config import build_config
    from flux_lora.data.preprocess import final_captions, find_sources

    for stem in ("a", "b", "c", "d"):
        _png(tmp_path / f"{stem}.png")
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n")
    (tmp_path / "d.txt").write_text("")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "d.png", "text": "d from metadata"}\n')
    reporter = _Warnings()
    items = find_sources(tmp_path, SimpleNamespace(paired=False), False, reporter)
    assert {i.name: i.caption for i in items} == {"a.png": "", "b.png": "", "c.png": None, "d.png": "d from metadata"}
    assert reporter.infos == ["2 image(s) have an empty caption file (e.g. a.png): their caption is the trigger word "
                              "alone (empty without one); delete the file to have the image auto-captioned"]
    cfg = build_config(None, {"data.trigger_word": "sks"})
    captions = final_captions(cfg, list(enumerate(items)), auto={2: "auto caption"})
    assert captions == {0: ["sks"], 1: ["sks"], 2: ["sks, auto caption"], 3: ["sks, d from metadata"]}


def test_follow_symlinks_reads_a_folder_of_links_once_and_names_broken_ones(tmp_path):
    """--follow-symlinks: a dataset made of links into a shared store (files, captions, folders);
    a link back up the tree is walked once; links to nothing are named, not fatal."""
    store, data = tmp_path / "store", tmp_path / "data"
    (store / "more").mkdir(parents=True)
    data.mkdir()
    _png(store / "a.png")
    (store / "a.txt").write_text("a from the store")
    _png(store / "more" / "b.png")
    (data / "a.png").symlink_to(store / "a.png")
    (data / "a.txt").symlink_to(store / "a.txt")
    (data / "more").symlink_to(store / "more", target_is_directory=True)
    (data / "up").symlink_to(data, target_is_directory=True)  # a loop
    (data / "gone.png").symlink_to(store / "gone.png")
    items, skipped = scan(data, follow_symlinks=True)
    assert {i.name: i.caption for i in items} == {"a.png": "a from the store", "more/b.png": None}
    assert [name for name, _ in skipped] == ["gone.png"] and "symbolic link to nothing" in skipped[0][1]
    items, skipped = scan(data)  # the default: nothing of it read
    assert items == [] and sorted(n for n, _ in skipped) == ["a.png", "gone.png", "more", "up"]
    assert all("--follow-symlinks" in why for _, why in skipped)
