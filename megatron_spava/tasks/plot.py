"""Line plots as PNG with Pillow only (matplotlib is not a dependency of this project)."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
DASHES = [None, (8, 4), (2, 3)]


def _dashed(draw, p, q, fill, width, dash):
    if dash is None:
        draw.line([p, q], fill=fill, width=width)
        return
    (x0, y0), (x1, y1) = p, q
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    on, off = dash
    t = 0.0
    while t < length:
        a, b = t / length, min(t + on, length) / length
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=fill, width=width)
        t += on + off


def line_panels(panels: Sequence[Tuple[str, Dict[str, List[Tuple[float, float]]]]], path: str, *,
                xlabel: str = "", ylabel: str = "", ylim=(0.0, 100.0), log_x: bool = True,
                cols: int = 5, panel_size=(330, 250)) -> None:
    """A grid of panels (title, {series name: [(x, y), ...]}) sharing one legend; x on a
    log2 scale when log_x. Writes a PNG to `path`."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    names = list(dict.fromkeys(n for _, series in panels for n in series))
    style = {n: (PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]) for i, n in enumerate(names)}
    rows = max(1, math.ceil(len(panels) / cols))
    pw, ph = panel_size
    legend_h = 16 * math.ceil(len(names) / 4) + 30
    img = Image.new("RGB", (cols * pw, rows * ph + legend_h), "white")
    draw = ImageDraw.Draw(img)
    xs = sorted({x for _, series in panels for pts in series.values() for x, _ in pts})
    fx = (lambda x: math.log2(x)) if log_x else (lambda x: x)
    lo, hi = (fx(xs[0]), fx(xs[-1])) if xs else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    for k, (title, series) in enumerate(panels):
        ox, oy = (k % cols) * pw, (k // cols) * ph
        left, top, right, bottom = ox + 48, oy + 22, ox + pw - 12, oy + ph - 34
        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        draw.text((left, oy + 6), title, fill=(0, 0, 0), font=font)
        to_px = lambda x, y: (left + (fx(x) - lo) / (hi - lo) * (right - left),
                              bottom - (y - ylim[0]) / (ylim[1] - ylim[0]) * (bottom - top))
        for tick in range(5):
            y = ylim[0] + tick * (ylim[1] - ylim[0]) / 4
            _, py = to_px(xs[0] if xs else 1, y)
            draw.line([(left - 3, py), (left, py)], fill=(0, 0, 0))
            draw.line([(left, py), (right, py)], fill=(235, 235, 235))
            draw.text((ox + 8, py - 6), f"{y:g}", fill=(0, 0, 0), font=font)
        for x in xs:
            px, _ = to_px(x, ylim[0])
            draw.line([(px, bottom), (px, bottom + 3)], fill=(0, 0, 0))
            label = f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"
            draw.text((px - 3 * len(label), bottom + 5), label, fill=(0, 0, 0), font=font)
        draw.text((left + (right - left) // 2 - 3 * len(xlabel), bottom + 18), xlabel, fill=(90, 90, 90), font=font)
        for name, pts in series.items():
            colour, dash = style[name]
            pix = [to_px(x, y) for x, y in pts]
            for p, q in zip(pix, pix[1:]):
                _dashed(draw, p, q, colour, 2, dash)
            for px, py in pix:
                draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
    ly = rows * ph + 8
    draw.text((8, ly), ylabel, fill=(0, 0, 0), font=font)
    for i, name in enumerate(names):
        colour, dash = style[name]
        lx, lyy = 8 + (i % 4) * 300, ly + 16 + 16 * (i // 4)
        _dashed(draw, (lx, lyy + 6), (lx + 30, lyy + 6), colour, 2, dash)
        draw.text((lx + 36, lyy), name, fill=(0, 0, 0), font=font)
    img.save(path)
