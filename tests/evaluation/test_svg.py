"""The report's inline SVG plots (src/dreamerv4/evaluation/svg.py): well-formed XML, points inside the
frame, non-finite values dropped, long series thinned, intervals drawn from zero."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from dreamerv4.evaluation.svg import svg_interval_chart, svg_line_plot


def _polyline_points(svg: str) -> list[tuple[float, float]]:
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    pts = []
    for line in root.iter(f"{ns}polyline"):
        pts += [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    return pts


def test_svg_line_plot():
    svg = svg_line_plot({"loss": [(0, 1.0), (10, float("nan")), (20, 0.5), (30, 0.25)]}, "a <b> & c")
    pts = _polyline_points(svg)
    assert len(pts) == 3  # NaN dropped
    assert all(52 <= x <= 340 - 10 and 24 <= y <= 210 - 34 for x, y in pts)
    assert pts[0][0] < pts[1][0] < pts[2][0] and pts[0][1] < pts[1][1] < pts[2][1]  # falling loss goes down
    assert "a &lt;b&gt; &amp; c" in svg

    assert "(log y)" in svg_line_plot({"lr": [(0, 1e-6), (1, 1e-3)]}, "lr")
    assert "(log y)" not in svg_line_plot({"x": [(0, -1.0), (1, 100.0)]}, "x")
    ET.fromstring(svg_line_plot({"c": [(0, 2.0), (5, 2.0)]}, "constant"))
    assert "<circle" in svg_line_plot({"one": [(3, 1.0)]}, "single point")
    assert "no finite values" in svg_line_plot({"bad": [(0, float("inf"))]}, "empty")
    two = svg_line_plot({"train": [(0, 1.0), (1, 0.5)], "eval": [(0, 0.9), (1, 0.7)]}, "two")
    assert ">train</text>" in two and ">eval</text>" in two
    # Long series are thinned, keeping the last point.
    long = _polyline_points(svg_line_plot({"l": [(i, float(i)) for i in range(5001)]}, "long"))
    assert len(long) <= 420 and long[-1][0] == pytest.approx(330.0)


def test_interval_chart_draws_bars_whiskers_and_not_run_rows():
    svg = svg_interval_chart([("random", 1.0, (0.5, 1.5), "#888"), ("bc", -0.5, None, "#00f"),
                              ("imagine", None, None, "#f80")], "returns", "return", element_id="c")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("id") == "c"
    bars = list(root.iter(f"{ns}rect"))
    assert len(bars) == 2 and len(list(root.iter(f"{ns}circle"))) == 2
    assert "not run" in svg and "1.00  [0.50, 1.50]" in svg and "-0.50" in svg
    zero = next(line for line in root.iter(f"{ns}line") if line.get("class") == "zero")
    # the negative bar ends at zero, the positive one starts there
    assert float(bars[0].get("x")) == pytest.approx(float(zero.get("x1")), abs=0.1)
    assert float(bars[1].get("x")) + float(bars[1].get("width")) == pytest.approx(float(zero.get("x1")), abs=0.2)
