"""Dataset ingest: discovery, safe ZIP extraction, decoding of awkward files, buckets.
    pytest -q tests/test_images.py"""

import io
import stat
import zipfile

import pytest
from PIL import Image

from flux_lora.errors import DataError
from flux_lora.data.images import (check_zip, discover, extract_zip, load_rgb, make_buckets, nearest_bucket,
                              resize_to_bucket, resolve_source)


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


@pytest.mark.parametrize("mode,color", [("RGBA", (255, 0, 0, 0)), ("LA", (0, 0)), ("L", 128), ("CMYK", (0, 0, 0, 0)),
                                        ("P", 3), ("I;16", 65535), ("1", 1)])
def test_modes_become_rgb(tmp_path, mode, color):
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (6, 4), color).save(path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (6, 4)
    if mode in ("RGBA", "LA"):
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    if mode == "I;16":
        assert im.getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (10, 30)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_raise_data_error(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # truncated PNG
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
        content = buf.getvalue()[:60]
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.png"):
        load_rgb(path)


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    _png(tmp_path / "big.png", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="too large"):
        load_rgb(tmp_path / "big.png")


def test_buckets():
    buckets = make_buckets(512)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(0.85 * 512**2 <= w * h <= 512**2 for w, h in buckets)
    assert (512, 512) in buckets
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    w, h = nearest_bucket(1600, 900, buckets)
    assert w > h and abs(w / h - 16 / 9) < 0.1
    assert make_buckets(512, square=True) == [(512, 512)]
    out = resize_to_bucket(Image.new("RGB", (1600, 900)), (w, h))
    assert out.size == (w, h)


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
