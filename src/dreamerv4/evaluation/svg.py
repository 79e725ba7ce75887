"""Inline SVG plots for the run report (evaluation/report.py), written as text: no plotting library.

    svg_line_plot({"loss": [(step, value), ...]}, "tokenizer: loss")
    svg_interval_chart([("behaviour cloning", 2.1, (1.7, 2.5), "#1f77b4"), ...], "return", "mean return")

Each returns one <svg class="plot"> element; its look comes from the page's stylesheet (classes title,
axis, grid, frame, tick, legend, label, value, missing, zero).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

MAX_PLOT_POINTS = 400  # a longer series is thinned to about this many points, keeping its last

def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [low, high], about `count` of them (at least 2)."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.4g}"


def _thin(points: Sequence[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return list(points)
    stride = math.ceil(len(points) / limit)
    return list(points[::stride]) + ([points[-1]] if (len(points) - 1) % stride else [])


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def svg_line_plot(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "step",
                  width: int = 340, height: int = 210, log_y: bool | None = None) -> str:
    """An inline <svg> line plot of (x, y) series. Non-finite points are dropped; `log_y` None picks a log
    axis when every value is positive and they span at least two decades."""
    clean = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    left, right, top, bottom = 52, 10, 24, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    legend_top = height + 2  # several series: a legend below the x label, one line each
    full_height = height + (13 * len(clean) + 6 if len(clean) > 1 else 0)
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{full_height}" '
           f'viewBox="0 0 {width} {full_height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="15" class="title" text-anchor="middle">{html.escape(title)}</text>']
    if not clean:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no finite values</text>')
        return "".join(out) + "</svg>"
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) >= 100
    if log_y and min(ys) <= 0:
        log_y = False
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(xs), max(xs)
    y0, y1 = ty(min(ys)), ty(max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (ty(y) - y0) / (y1 - y0)) * plot_h

    if log_y:
        yticks = [10.0 ** k for k in range(math.ceil(y0), math.floor(y1) + 1)]
        if len(yticks) < 2:
            yticks = [10 ** t for t in _nice_ticks(y0, y1)]
    else:
        yticks = _nice_ticks(y0, y1)
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for tick in yticks:
        y = py(tick)
        if top - 0.5 <= y <= top + plot_h + 0.5:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                       f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" class="axis">{_fmt_tick(tick)}</text>')
    for tick in _nice_ticks(x0, x1, 4):
        x = px(tick)
        if left - 0.5 <= x <= left + plot_w + 0.5:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" class="tick"/>'
                       f'<text x="{x:.1f}" y="{top + plot_h + 15}" text-anchor="middle" class="axis">{_fmt_tick(tick)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" class="axis">'
               f'{html.escape(xlabel)}{" (log y)" if log_y else ""}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = _thin(pts, MAX_PLOT_POINTS)
        if len(pts) == 1:
            out.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(clean) > 1:
            y = legend_top + 13 * i + 8
            out.append(f'<line x1="{left}" x2="{left + 16}" y1="{y - 3}" y2="{y - 3}" stroke="{color}" '
                       'stroke-width="2"/>'
                       f'<text x="{left + 21}" y="{y + 1}" class="legend">{html.escape(name)}</text>')
    return "".join(out) + "</svg>"


def svg_interval_chart(rows: Sequence[tuple[str, float | None, tuple[float, float] | None, str]], title: str,
                       xlabel: str, width: int = 760, element_id: str | None = None, missing: str = "not run") -> str:
    """A horizontal bar chart: one row per (label, value, 95% interval or None, colour), the interval as a
    whisker, the value and interval written at the right; a row whose value is None says `missing`."""
    left, right, top, row_h, bottom = 150, 170, 30, 42, 40
    height = top + row_h * len(rows) + bottom
    plot_w = width - left - right
    ident = f' id="{html.escape(element_id)}"' if element_id else ""
    out = [f'<svg class="plot chart"{ident} xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{left}" y="18" class="title">{html.escape(title)}</text>']
    ends = [0.0] + [v for _, v, _, _ in rows if v is not None] + [c for _, _, ci, _ in rows if ci for c in ci]
    low, high = min(ends), max(ends)
    if high <= low:
        high = low + 1.0
    ticks = _nice_ticks(low, high, 5)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else (high - low)
    x0 = min(low, math.floor(low / step + 1e-9) * step)
    x1 = max(high, math.ceil(high / step - 1e-9) * step)
    ticks = [t for t in _nice_ticks(x0, x1, 5) if x0 - 1e-9 <= t <= x1 + 1e-9]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    base_y = top + row_h * len(rows)
    for tick in ticks:
        x = px(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{base_y}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{base_y + 14}" text-anchor="middle" class="axis">{_fmt_tick(tick)}</text>')
    out.append(f'<line x1="{px(0):.1f}" x2="{px(0):.1f}" y1="{top}" y2="{base_y}" class="zero"/>'
               f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" class="axis">'
               f'{html.escape(xlabel)}</text>')
    for i, (label, value, ci, color) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<text x="{left - 10}" y="{y + 4:.1f}" text-anchor="end" class="label">{html.escape(label)}</text>')
        if value is None:
            out.append(f'<text x="{px(0) + 6:.1f}" y="{y + 4:.1f}" class="axis missing">{html.escape(missing)}</text>')
            continue
        a, b = sorted((px(0), px(value)))
        out.append(f'<rect x="{a:.1f}" y="{y - 9:.1f}" width="{max(b - a, 1):.1f}" height="18" fill="{color}" '
                   f'fill-opacity="0.3" stroke="{color}"/>')
        text = f"{value:.2f}"
        if ci is not None:
            lo, hi = px(ci[0]), px(ci[1])
            out.append(f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                       'stroke-width="2"/>'
                       + "".join(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 7:.1f}" y2="{y + 7:.1f}" stroke="{color}" '
                                 'stroke-width="2"/>' for x in (lo, hi)))
            text += f"  [{ci[0]:.2f}, {ci[1]:.2f}]"
        out.append(f'<circle cx="{px(value):.1f}" cy="{y:.1f}" r="4.5" fill="{color}"/>'
                   f'<text x="{left + plot_w + 12}" y="{y + 4:.1f}" class="value">{html.escape(text)}</text>')
    return "".join(out) + "</svg>"
