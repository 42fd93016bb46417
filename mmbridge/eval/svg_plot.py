"""Line charts as inline SVG text, for pages that must render without fetching anything (`eval/report.py`)."""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
Points = list[tuple[float, float]]


def thin(points: Points, most: int) -> Points:
    """At most `most` points: the first, the last, and between them each bucket of consecutive points keeps its
    lowest and highest, so a spike in a long run stays visible."""
    if len(points) <= most:
        return points
    inner = points[1:-1]
    size = math.ceil(len(inner) / ((most - 2) // 2))
    out = [points[0]]
    for i in range(0, len(inner), size):
        bucket = inner[i : i + size]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out += sorted({lo, hi})
    return out + [points[-1]]


def nice_ticks(lo: float, hi: float, n: int = 5, least: float = 0.0) -> list[float]:
    """About `n` round tick values covering [lo, hi], at least `least` apart (1 for steps)."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = max(least, next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def line_chart(
    title: str, series: dict[str, Points], ylabel: str = "", width: int = 320, height: int = 220, most: int = 800
) -> str:
    """An SVG chart: one `<path class="series">` per named series of (x, y) points (non-finite y dropped), with
    axes, ticks and a legend below; '' when no series has a point. The first series is drawn wide and faint, so a
    later one that equals it (a loss made of one term) stays visible on top."""
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    series = {k: thin(v, most) for k, v in series.items() if v}
    if not series:
        return ""
    legend_rows = math.ceil(len(series) / 3)
    left, right, top, bottom = 62, 14, 24, 36 + 16 * legend_rows
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = _span([x for v in series.values() for x, _ in v])
    y0, y1 = _span([y for v in series.values() for _, y in v])
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * ph  # noqa: E731
    out = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{left}" y="15" class="title">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    for t in nice_ticks(y0, y1):
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" class="tick" text-anchor="end">{t:.4g}</text>'
        )
    for t in nice_ticks(x0, x1, 6, least=1):
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 13}" class="tick" text-anchor="middle">{t:.6g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 27}" class="tick" text-anchor="middle">step</text>')
    if ylabel:
        out.append(
            f'<text transform="translate(11 {top + ph / 2}) rotate(-90)" class="tick" '
            f'text-anchor="middle">{escape(ylabel)}</text>'
        )
    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        d = "M" + " L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        wide = ' style="stroke-width:4;stroke-opacity:.45"' if i == 0 and len(series) > 1 else ""
        out.append(f'<path class="series" data-series="{escape(name)}" d="{d}" stroke="{colour}"{wide}/>')
        if len(points) == 1:  # a one-step stage: a path of one point draws nothing
            out.append(f'<circle cx="{sx(points[0][0]):.1f}" cy="{sy(points[0][1]):.1f}" r="3" fill="{colour}"/>')
        lx, ly = left + (i % 3) * (pw / 3), top + ph + 44 + 16 * (i // 3)
        out.append(
            f'<rect x="{lx:.1f}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14:.1f}" y="{ly + 1}" class="tick">{escape(name)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)
