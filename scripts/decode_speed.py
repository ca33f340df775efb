"""How fast preprocess's workers turn a camera photo into a bucket-sized image, with the full
JPEG decode and with the reduced one (preprocess.reduced_jpeg), on this machine's CPU: the
decode/resize side that must keep ahead of the GPU encoders (30 images/s per GPU at 1024 px).

    python scripts/decode_speed.py --out bench/results/DATE_cpu_decode-speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux_lora.data.images import load_for_bucket, make_buckets, resize_to_bucket  # noqa: E402


def camera_photo(path: Path, width: int, height: int) -> None:
    """Smooth gradients under sensor-like noise, saved as a quality-92 JPEG (a phone photo's size)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], -1)
    Image.fromarray((rgb + rng.normal(0, 20, rgb.shape)).clip(0, 255).astype("uint8")).save(path, quality=92)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--size", default="4032x3024", help="the photo's WIDTHxHEIGHT (12 MP: a phone camera's)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default="")
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    buckets = make_buckets(args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "photo.jpg"
        camera_photo(photo, width, height)
        seconds, outputs = {}, {}
        for reduced in (False, True, False, True):  # interleaved: the second pass of each is timed
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                im, bucket = load_for_bucket(photo, buckets, reduced=reduced)
                out = resize_to_bucket(im, bucket)
                times.append(time.perf_counter() - t0)
            seconds[reduced], outputs[reduced] = statistics.median(times), np.asarray(out, dtype=np.float32)
    diff = np.abs(outputs[True] - outputs[False])
    report = {"kind": "decode", "photo": args.size, "resolution": args.resolution, "bucket": list(bucket),
              "full_decode_ms": round(1000 * seconds[False], 1), "reduced_decode_ms": round(1000 * seconds[True], 1),
              "speedup": round(seconds[False] / seconds[True], 2),
              "workers_for_30_images_per_s": {"full": round(30 * seconds[False], 1), "reduced": round(30 * seconds[True], 1)},
              "mean_abs_diff_of_255": round(float(diff.mean()), 3), "max_abs_diff_of_255": float(diff.max()),
              "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(["scripts/decode_speed.py"] + sys.argv[1:])}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
