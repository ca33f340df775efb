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


def _photo(path, size=(1600, 1200), orientation=1):
    """A smooth JPEG with some texture (a photo's statistics, not noise's), EXIF-oriented."""
    import numpy as np

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x // 7 + y // 5) % 256], -1).astype("uint8")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=92, exif=exif)
    return path


def test_a_reduced_jpeg_decode_keeps_the_bucket_and_nearly_the_pixels(tmp_path):
    """The bucket comes from the full, displayed size (a sideways photo is portrait); the reduced
    decode still covers the bucket and resizes to within 2/255 on average of the full decode; a
    PNG, or reduced=False, decodes exactly as load_rgb."""
    import numpy as np

    from flux_lora.data.images import cover_size, load_for_bucket

    buckets = make_buckets(256)
    photo = _photo(tmp_path / "p.jpg", orientation=6)  # stored 1600x1200, displayed 1200x1600
    full, bucket = load_for_bucket(photo, buckets)
    assert full.size == (1200, 1600) and bucket == nearest_bucket(1200, 1600, buckets) and bucket[0] < bucket[1]
    small, same = load_for_bucket(photo, buckets, reduced=True)
    assert same == bucket and small.size[0] < full.size[0]
    assert small.size[0] >= cover_size(full.size, bucket)[0] and small.size[1] >= cover_size(full.size, bucket)[1]
    a, b = (np.asarray(resize_to_bucket(im, bucket), dtype=np.float32) for im in (full, small))
    assert a.shape == b.shape and np.abs(a - b).mean() < 2.0
    assert np.array_equal(np.asarray(full), np.asarray(load_rgb(photo)))
    png = _png(tmp_path / "p.png", size=(1600, 1200))
    assert np.array_equal(np.asarray(load_for_bucket(png, buckets, reduced=True)[0]), np.asarray(load_rgb(png)))


def test_decode_workers_follow_the_cores_each_rank_has(monkeypatch, tmp_path):
    from flux_lora.data import preprocess

    assert preprocess.decode_workers(0) == 0 and preprocess.decode_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert preprocess.decode_workers(-1, cores=16) == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert preprocess.decode_workers(-1, cores=16) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert preprocess.decode_workers(-1, cores=2) == 1
    # a container's quota caps what the affinity shows; no quota (or no cgroup v2 file) leaves it
    monkeypatch.setattr(preprocess.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    quota = tmp_path / "cpu.max"
    quota.write_text("400000 100000\n")
    assert preprocess.usable_cores(quota) == 4
    quota.write_text("max 100000\n")
    assert preprocess.usable_cores(quota) == 64 == preprocess.usable_cores(tmp_path / "missing")
