"""OUTPUT/loss.png: loss and its moving average against step, learning rate on a second axis.

Drawn with Pillow: a plotting library costs rank 0 ~1.3 s to import and ~0.4 s a figure, at every
checkpoint, while the other ranks wait at the next collective; these lines take ~30 ms.
"""

from __future__ import annotations

import math
from pathlib import Path

from flux_lora.outputs import files

SIZE = (800, 450)
SCALE = 2  # drawn at twice the size, then downsampled: smooth lines without an antialiasing renderer
MARGIN = dict(left=72, right=86, top=16, bottom=48)  # pixels of the final image
COLORS = dict(loss=(178, 178, 178), average=(31, 119, 180), validation=(44, 160, 44), lr=(255, 127, 14),
              axis=(40, 40, 40), grid=(232, 232, 232))


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        if math.isfinite(v):
            acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc) if acc else float("nan"))
    return out


def nice_ticks(low: float, high: float, most: int = 6, finest: float = 0.0) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart, at least `finest`) within [low, high]
    (a span of _span's or render's: never empty)."""
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        return []
    raw = (high - low) / max(1, most - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = max(finest, next(m * power for m in (1, 2, 5, 10) if m * power >= raw))
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _span(values) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.04 if high > low else abs(low) * 0.05 or 1.0  # lines clear of the frame
    return low - pad, high + pad


def _label(value: float, tick_step: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        return f"{value:.1e}"
    digits = max(0, -math.floor(math.log10(tick_step) + 1e-6)) if tick_step > 0 else 2
    return f"{value:.{digits}f}"


class _Canvas:
    """Pixel mapping of one plot area, drawn at SCALE."""

    def __init__(self, x_span, y_span, lr_span):
        from PIL import Image, ImageDraw, ImageFont

        self.image = Image.new("RGB", (SIZE[0] * SCALE, SIZE[1] * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image)
        try:
            self.font = ImageFont.load_default(size=11 * SCALE)
        except (TypeError, OSError, ImportError):  # a Pillow without FreeType: its bitmap font
            self.font = ImageFont.load_default()
        self.left, self.top = MARGIN["left"] * SCALE, MARGIN["top"] * SCALE
        self.right, self.bottom = (SIZE[0] - MARGIN["right"]) * SCALE, (SIZE[1] - MARGIN["bottom"]) * SCALE
        self.x_span, self.y_span, self.lr_span = x_span, y_span, lr_span

    def point(self, x: float, y: float, span) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_span, span
        return (self.left + (x - x0) / (x1 - x0) * (self.right - self.left),
                self.bottom - (y - y0) / (y1 - y0) * (self.bottom - self.top))

    def line(self, xs, ys, span, color, width: float, dashed: bool = False) -> None:
        """A polyline, broken where a value is not finite."""
        run = []
        for x, y in list(zip(xs, ys)) + [(None, float("nan"))]:
            if x is not None and math.isfinite(y):
                run.append(self.point(x, y, span))
                continue
            if dashed:
                self.dashes(run, color, width)
            elif len(run) > 1:
                self.draw.line(run, fill=color, width=round(width * SCALE), joint="curve")
            elif run:
                self.dot(run[0], color, width)
            run = []

    def dashes(self, points, color, width: float, on: float = 6.0, off: float = 4.0) -> None:
        """A dashed polyline: `on` pixels drawn, `off` left, continued across the points."""
        position = 0.0
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            length = math.hypot(xb - xa, yb - ya)
            t = 0.0
            while t < length:
                phase = position % ((on + off) * SCALE)
                stretch = min(length - t, (on * SCALE - phase) if phase < on * SCALE else (on + off) * SCALE - phase)
                if phase < on * SCALE:
                    a, b = t / length, (t + stretch) / length
                    self.draw.line([(xa + (xb - xa) * a, ya + (yb - ya) * a), (xa + (xb - xa) * b, ya + (yb - ya) * b)],
                                   fill=color, width=round(width * SCALE))
                t += stretch
                position += stretch

    def dot(self, center, color, radius: float) -> None:
        x, y = center
        r = radius * SCALE
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=color)

    def text(self, xy, words: str, anchor: str, color=COLORS["axis"], rotate: bool = False) -> None:
        if not rotate:
            self.draw.text(xy, words, fill=color, font=self.font, anchor=anchor)
            return
        from PIL import Image, ImageDraw

        box = self.draw.textbbox((0, 0), words, font=self.font)
        strip = Image.new("RGB", (box[2] - box[0] + 2, box[3] - box[1] + 2), "white")
        ImageDraw.Draw(strip).text((-box[0] + 1, -box[1] + 1), words, fill=color, font=self.font)
        strip = strip.rotate(90, expand=True)
        self.image.paste(strip, (round(xy[0] - strip.width / 2), round(xy[1] - strip.height / 2)))


def _axes(canvas: _Canvas) -> None:
    """Grid, frame, ticks and labels of the step, loss and learning-rate axes."""
    draw, axis = canvas.draw, COLORS["axis"]
    x_ticks = nice_ticks(*canvas.x_span, most=8, finest=1)
    y_ticks = nice_ticks(*canvas.y_span)
    lr_ticks = nice_ticks(*canvas.lr_span)
    tick = 4 * SCALE
    for t in x_ticks:
        x, _ = canvas.point(t, canvas.y_span[0], canvas.y_span)
        draw.line([(x, canvas.top), (x, canvas.bottom)], fill=COLORS["grid"], width=SCALE)
        draw.line([(x, canvas.bottom), (x, canvas.bottom + tick)], fill=axis, width=SCALE)
        canvas.text((x, canvas.bottom + tick + 2 * SCALE), f"{t:g}", "mt")
    for t in y_ticks:
        _, y = canvas.point(canvas.x_span[0], t, canvas.y_span)
        draw.line([(canvas.left, y), (canvas.right, y)], fill=COLORS["grid"], width=SCALE)
        draw.line([(canvas.left - tick, y), (canvas.left, y)], fill=axis, width=SCALE)
        canvas.text((canvas.left - tick - 2 * SCALE, y), _label(t, _step(y_ticks)), "rm")
    for t in lr_ticks:
        _, y = canvas.point(canvas.x_span[0], t, canvas.lr_span)
        draw.line([(canvas.right, y), (canvas.right + tick, y)], fill=axis, width=SCALE)
        canvas.text((canvas.right + tick + 2 * SCALE, y), f"{t:.1e}" if t else "0", "lm")
    draw.rectangle([canvas.left, canvas.top, canvas.right, canvas.bottom], outline=axis, width=SCALE)
    canvas.text(((canvas.left + canvas.right) / 2, SIZE[1] * SCALE - 6 * SCALE), "step", "md")
    canvas.text((12 * SCALE, (canvas.top + canvas.bottom) / 2), "loss", "mm", rotate=True)
    canvas.text((SIZE[0] * SCALE - 10 * SCALE, (canvas.top + canvas.bottom) / 2), "learning rate", "mm", rotate=True)


def _step(ticks: list[float]) -> float:
    return ticks[1] - ticks[0] if len(ticks) > 1 else 1.0


def _legend(canvas: _Canvas, entries: list[tuple[str, tuple, bool]]) -> None:
    """Upper right, inside the plot area: a short line of each colour and its name."""
    row, swatch, pad = 16 * SCALE, 22 * SCALE, 6 * SCALE
    width = max(canvas.draw.textlength(name, font=canvas.font) for name, _, _ in entries) + swatch + 3 * pad
    x0, y0 = canvas.right - width - pad, canvas.top + pad
    canvas.draw.rectangle([x0, y0, x0 + width, y0 + row * len(entries) + pad], fill="white", outline=COLORS["grid"],
                          width=SCALE)
    for i, (name, color, dashed) in enumerate(entries):
        y = y0 + pad / 2 + row * i + row / 2
        start = (x0 + pad, y)
        end = (x0 + pad + swatch, y)
        if dashed:
            canvas.dashes([start, end], color, 1.2)
        else:
            canvas.draw.line([start, end], fill=color, width=round(1.6 * SCALE))
        canvas.text((x0 + 2 * pad + swatch, y), name, "lm")


def render(history: list, validation: list = ()):
    """The plot as a PIL image (SIZE): history (step, loss, lr), validation (step, loss)."""
    from PIL import Image

    steps = [h[0] for h in history]
    losses = [float(h[1]) for h in history]
    lrs = [float(h[2]) for h in history]
    average = moving_average(losses, max(5, len(losses) // 20))
    x_span = (min(steps), max(steps)) if max(steps) > min(steps) else (min(steps) - 1, max(steps) + 1)
    y_span = _span(losses + [v[1] for v in validation])
    lr_span = _span(lrs)
    if lr_span[0] >= 0:  # a non-negative rate: its axis starts at zero
        lr_span = (0.0, lr_span[1])
    canvas = _Canvas(x_span, y_span, lr_span)
    _axes(canvas)
    canvas.line(steps, losses, y_span, COLORS["loss"], 0.8)
    canvas.line(steps, average, y_span, COLORS["average"], 1.6)
    entries = [("loss", COLORS["loss"], False), ("moving average", COLORS["average"], False)]
    if validation:
        canvas.line([v[0] for v in validation], [v[1] for v in validation], y_span, COLORS["validation"], 1.2)
        for step, loss in validation:
            if math.isfinite(loss):
                canvas.dot(canvas.point(step, loss, y_span), COLORS["validation"], 3)
        entries.append(("validation (fixed t and noise)", COLORS["validation"], False))
    canvas.line(steps, lrs, lr_span, COLORS["lr"], 1.0, dashed=True)
    entries.append(("learning rate", COLORS["lr"], True))
    _legend(canvas, entries)
    return canvas.image.resize(SIZE, Image.LANCZOS)


def write_loss_plot(path: Path, history: list, validation: list = ()) -> None:
    """history: (step, loss, lr) tuples; validation: (step, loss) of the held-out items. Written
    atomically by rank 0; an empty history writes nothing."""
    if not history or not files.writes_here():
        return
    image = render(history, validation)
    files.write_atomic(path, lambda f: image.save(f, format="PNG", optimize=False))
