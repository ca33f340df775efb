"""Dataset ingest: discovery, safe ZIP extraction, decoding of awkward files, buckets.
    pytest -q tests/test_images.py"""

import io

import pytest
from PIL import Image

from flux_lora.errors import DataError
from flux_lora.data.images import load_rgb, make_buckets, nearest_bucket, resize_to_bucket


def _png(path, size=(20, 10), mode="RGB", color=(10, 20, 30)):
    Image.new(mode, size, color).save(path)
    return path

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

def test_decompression_bomb_limit_is_one_line_of_ours(tmp_path):
    """Over the limit: our error naming the limit and the key that raises it. Between Pillow's
    warning threshold (half the limit) and the limit: decoded, without Pillow's raw warning."""
    import warnings

    _png(tmp_path / "big.png", size=(200, 200))
    with pytest.raises(DataError, match=r"too large .*preprocess.max_image_pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=30_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert load_rgb(tmp_path / "big.png", max_pixels=60_000).size == (200, 200)

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
