"""Inline SVG charts for the report: no script, no external asset, nothing to download.

Each chart carries its numbers as ``data-`` attributes as well as shapes, so a test (or a
reader with the page's source) can check the drawing against the computation behind it.
"""

from __future__ import annotations

import html
import json

import numpy as np

#: one colour per line (matplotlib's tab10, which the retention PNG also uses)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
WIDTH, HEIGHT = 460, 260
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 14, 38


def _scale(values: np.ndarray, lo: float, hi: float, out_lo: float, out_hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    return out_lo + (np.asarray(values, dtype=float) - lo) / span * (out_hi - out_lo)


def _axes(x_label: str, y_label: str, x_range: tuple[float, float],
          y_range: tuple[float, float]) -> list[str]:
    """Frame, four ticks per axis and the axis labels."""
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    parts = [f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" class="frame"/>']
    for value in np.linspace(*x_range, 5):
        x = _scale(value, *x_range, x0, x1)
        parts.append(f'<text x="{x:.1f}" y="{y0 + 14}" class="tick" text-anchor="middle">'
                     f'{value:.3g}</text>')
    for value in np.linspace(*y_range, 5):
        y = _scale(value, *y_range, y0, y1)
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{x0 - 5}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                     f'{value:.3g}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 6}" class="label" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(f'<text transform="translate(12 {(y0 + y1) / 2}) rotate(-90)" class="label" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    return parts


def _svg(parts: list[str], title: str) -> str:
    return (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'role="img" aria-label="{html.escape(title)}">' + "".join(parts) + "</svg>")


def line_chart(curves: dict[str, tuple[np.ndarray, np.ndarray]], *, baseline: float,
               x_label: str, y_label: str, title: str) -> str:
    """One polyline per curve and a dashed horizontal baseline (the random ranking's expected
    value); each polyline holds its values in ``data-x`` / ``data-y``."""
    ys = np.concatenate([y for _, y in curves.values()] + [np.array([baseline])])
    lo, hi = float(np.nanmin(ys)), float(np.nanmax(ys))
    pad = 0.05 * (hi - lo or 1.0)
    y_range = (lo - pad, hi + pad)
    x_range = (0.0, 1.0)
    parts = _axes(x_label, y_label, x_range, y_range)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    by = _scale(baseline, *y_range, y0, y1)
    parts.append(f'<line x1="{x0}" x2="{x1}" y1="{by:.1f}" y2="{by:.1f}" class="baseline" '
                 f'data-baseline="{baseline!r}"><title>random ranking (expected): '
                 f'{baseline:.3f}</title></line>')
    for k, (name, (x, y)) in enumerate(curves.items()):
        px, py = _scale(x, *x_range, x0, x1), _scale(y, *y_range, y0, y1)
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{PALETTE[k % 10]}" '
                     f'stroke-width="2" data-curve="{html.escape(name)}" '
                     f"data-x='{json.dumps([float(v) for v in x])}' "
                     f"data-y='{json.dumps([float(v) for v in y])}'>"
                     f"<title>{html.escape(name)}</title></polyline>")
    return _svg(parts, title)


def histogram(values: np.ndarray, failed: np.ndarray | None, *, x_label: str, title: str,
              bins: int = 30) -> str:
    """Counts of the score in `bins` equal bins; with `failed`, passing and failing samples as
    two overlaid bar sets, so where the failures sit along the score shows at a glance."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    groups = {"all": np.ones(len(values), bool)} if failed is None else \
        {"pass": ~np.asarray(failed, bool), "fail": np.asarray(failed, bool)}
    counts = {name: np.histogram(values[mask], edges)[0] for name, mask in groups.items()}
    top = max(1, max(int(c.max()) for c in counts.values()))
    parts = _axes(x_label, "samples", (edges[0], edges[-1]), (0.0, float(top)))
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    xs = _scale(edges, edges[0], edges[-1], x0, x1)
    for name, count in counts.items():
        heights = _scale(count, 0.0, float(top), 0.0, y0 - y1)
        bars = "".join(f'<rect x="{xs[i]:.1f}" y="{y0 - h:.1f}" width="{xs[i + 1] - xs[i]:.1f}" '
                       f'height="{h:.1f}"/>' for i, h in enumerate(heights) if h > 0)
        parts.append(f'<g class="bars {name}" data-group="{name}" '
                     f"data-counts='{json.dumps(count.tolist())}'>{bars}</g>")
    return _svg(parts, title)
