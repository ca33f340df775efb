"""Images as the encoders need them: decoding of awkward files (EXIF rotation, alpha, CMYK, 16-bit,
palette; Pillow's size limit as one clear line) and aspect-ratio buckets."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from flux_lora.errors import DataError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 × its 89.5 MP warning threshold)


# ---------------------------------------------------------------- decoding

def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, before_decoding=None):
    """Decode any supported image to 8-bit RGB: EXIF orientation applied, alpha composited on
    white, CMYK / 16-bit / greyscale / palette converted. Raises DataError if unreadable or larger
    than max_pixels (a decompression bomb guard: the pixels are decoded into memory).
    `before_decoding(im)`: called on the opened file before its pixels are read (e.g. a draft)."""
    from PIL import Image, ImageOps

    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit speaks instead
            Image.MAX_IMAGE_PIXELS = max_pixels // 2  # Pillow refuses at twice this
            with Image.open(path) as im:
                if before_decoding is not None:
                    before_decoding(im)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except Image.DecompressionBombError:
        raise DataError(f"{path.name}: image is too large (over {max_pixels / 1e6:.0f} MP, the decompression-bomb limit); "
                        "downscale it, or raise preprocess.max_image_pixels if you trust the file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path.name}: not a readable image ({type(e).__name__}: {str(e)[:120]})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def load_for_bucket(path: Path, buckets: list[tuple[int, int]], max_pixels: int = DEFAULT_MAX_PIXELS,
                    reduced: bool = False):
    """(image, bucket): the bucket chosen from the file's full size as displayed (EXIF-oriented),
    and with `reduced` a JPEG decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, what
    Pillow's draft does) while still covering the bucket's resize: half the time on a 12 MP photo,
    within ~2/255 on average of the full decode after the LANCZOS resize."""
    chosen = []

    def choose(im) -> None:
        sideways = im.getexif().get(0x0112, 1) in _SIDEWAYS
        width, height = (im.height, im.width) if sideways else im.size
        chosen.append(nearest_bucket(width, height, buckets))
        if reduced and im.format == "JPEG":
            cover = cover_size((width, height), chosen[0])
            im.draft(None, (cover[1], cover[0]) if sideways else cover)

    im = load_rgb(path, max_pixels, choose)
    return im, chosen[0]


def load_mask(path: Path, size: tuple[int, int] | None = None, from_alpha: bool = False, image: str = ""):
    """A loss mask as an 8-bit greyscale image (255: learn, 0: ignore): a mask file, or with
    from_alpha the alpha channel of the image at `path` (all 255 where it has none). A mask file
    must have `size`, its image's (width, height). Raises DataError naming the file."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if from_alpha:
                has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                return im.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", im.size, 255)
            mask = im.convert("L")
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path.name}: not a readable mask ({type(e).__name__}: {str(e)[:120]})") from None
    if size is not None and mask.size != tuple(size):
        raise DataError(f"{image or 'image'}: its mask {path.name} is {mask.width}×{mask.height}, the image "
                        f"{size[0]}×{size[1]}; a mask must have its image's size")
    return mask


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


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image of `size` is scaled to so that it covers the bucket (before the crop)."""
    bw, bh = bucket
    scale = max(bw / size[0], bh / size[1])
    return max(bw, round(size[0] * scale)), max(bh, round(size[1] * scale))


def resize_to_bucket(im, bucket: tuple[int, int]):
    """Scale to cover the bucket, then center-crop to exactly (width, height)."""
    from PIL import Image

    bw, bh = bucket
    nw, nh = cover_size(im.size, bucket)
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return im.crop((left, top, left + bw, top + bh))
