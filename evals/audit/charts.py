"""The report's charts as geometry: lists of SVG primitives (rect, line, text) with coordinates, drawn by the template.

The numbers (where a bar ends, where a whisker goes) are computed and tested here in Python; how they look (colours,
fonts, strokes) is the template's: ``templates/report.html.j2`` turns each primitive into one SVG element, escaping
every text. No markup is built in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Bar", "Chart", "Group", "bar_chart", "grouped_chart", "series_colour"]

#: One colour per column of the audit: the original first (grey-blue), then each erasure.
_PALETTE = ("#8c9bb5", "#d9662b", "#3f8f5a", "#8a4fb0", "#c23b5a", "#2f7fa8")


def series_colour(index: int) -> str:
    """The colour of the audit's ``index``-th model (0 = the original), the same in every chart and legend."""
    return _PALETTE[index % len(_PALETTE)]


@dataclass
class Chart:
    """An SVG canvas and its primitives: ``rects`` / ``lines`` are dicts of SVG attributes plus ``cls`` (a CSS class);
    ``texts`` add ``text`` and ``anchor``. ``legend`` is ``[(label, colour)]``, drawn above the chart in HTML."""

    title: str
    width: int
    height: int
    rects: list[dict[str, Any]] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""

    def rect(self, x: float, y: float, w: float, h: float, fill: str, cls: str = "bar") -> None:
        self.rects.append({"x": _r(x), "y": _r(y), "width": _r(max(w, 0.0)), "height": _r(max(h, 0.0)), "fill": fill})
        self.rects[-1]["cls"] = cls

    def line(self, x1: float, y1: float, x2: float, y2: float, cls: str = "axis") -> None:
        self.lines.append({"x1": _r(x1), "y1": _r(y1), "x2": _r(x2), "y2": _r(y2), "cls": cls})

    def text(self, x: float, y: float, text: str, anchor: str = "start", cls: str = "label") -> None:
        self.texts.append({"x": _r(x), "y": _r(y), "text": text, "anchor": anchor, "cls": cls})


@dataclass(frozen=True)
class Bar:
    """One bar: ``value`` (None: no data, drawn as "n/a") with an optional interval ``low .. high``."""

    label: str
    value: float | None
    low: float | None = None
    high: float | None = None
    text: str = ""  # the number written beside the bar; ``value`` formatted with 3 significant digits when empty
    colour: str = _PALETTE[0]


@dataclass(frozen=True)
class Group:
    """A group of vertical bars (one per model) and its limit: a dashed line at ``limit`` over the bars in
    ``limit_bars`` (indices into ``bars``; all of them when None)."""

    label: str
    sublabel: str
    bars: Sequence[Bar]
    limit: float | None = None
    limit_bars: Sequence[int] | None = None


def _r(value: float) -> float:
    return round(float(value), 1)


def bar_chart(title: str, bars: Sequence[Bar], vmax: float) -> Chart:
    """Horizontal bars, one per model, whiskers from ``low`` to ``high``; ``vmax`` is the right edge of the scale."""
    row_h, label_w, plot_w, top = 22, 170, 260, 24
    chart = Chart(title, label_w + plot_w + 70, top + row_h * len(bars) + 8)
    chart.text(4, 15, title, cls="title")
    scale = plot_w / vmax if vmax > 0 else 0.0
    for i, bar in enumerate(bars):
        y = top + i * row_h
        chart.text(4, y + 14, bar.label[:28])
        chart.line(label_w, y, label_w, y + row_h - 4)
        if bar.value is None:
            chart.text(label_w + 4, y + 14, bar.text or "n/a", cls="muted")
            continue
        chart.rect(label_w, y + 3, max(0.0, bar.value) * scale, row_h - 10, bar.colour)
        if bar.low is not None and bar.high is not None:
            x1, x2, ym = label_w + bar.low * scale, label_w + bar.high * scale, y + 3 + (row_h - 10) / 2
            chart.line(x1, ym, x2, ym, cls="whisker")
            for x in (x1, x2):
                chart.line(x, ym - 5, x, ym + 5, cls="whisker")
        chart.text(label_w + plot_w + 6, y + 14, bar.text or f"{bar.value:.3g}")
    return chart


def grouped_chart(title: str, groups: Sequence[Group], legend: Sequence[tuple[str, str]], note: str = "") -> Chart:
    """Vertical bars on a 0 .. 100% scale, in groups (one per prompt role), one bar per model, Wilson whiskers and
    each group's limit as a dashed line: the verdict at a glance."""
    bar_w, bar_gap, group_gap, left, top, plot_h, bottom = 30, 6, 34, 44, 40, 170, 46
    widths = [len(g.bars) * bar_w + (len(g.bars) - 1) * bar_gap for g in groups]
    width = left + sum(widths) + group_gap * len(groups) + 10
    chart = Chart(title, width, top + plot_h + bottom, legend=list(legend), note=note)
    chart.text(left, 14, title, cls="title")

    def y_of(value: float) -> float:
        return top + plot_h * (1.0 - min(max(value, 0.0), 1.0))

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        chart.line(left, y_of(tick), width - 6, y_of(tick), cls="grid" if tick else "axis")
        chart.text(left - 6, y_of(tick) + 4, f"{tick:.0%}", anchor="end", cls="tick")
    x = left + group_gap / 2
    for group, group_w in zip(groups, widths, strict=True):
        for i, bar in enumerate(group.bars):
            bx = x + i * (bar_w + bar_gap)
            if bar.value is None:
                chart.text(bx + bar_w / 2, y_of(0.0) - 4, "n/a", anchor="middle", cls="muted")
                continue
            chart.rect(bx, y_of(bar.value), bar_w, y_of(0.0) - y_of(bar.value), bar.colour)
            if bar.low is not None and bar.high is not None:
                cx = bx + bar_w / 2
                chart.line(cx, y_of(bar.low), cx, y_of(bar.high), cls="whisker")
                for v in (bar.low, bar.high):
                    chart.line(cx - 5, y_of(v), cx + 5, y_of(v), cls="whisker")
            # the value above the bar and its whisker
            chart.text(
                bx + bar_w / 2,
                y_of(max(bar.value, bar.high or 0.0)) - 5,
                bar.text or f"{bar.value:.0%}",
                anchor="middle",
                cls="value",
            )
        if group.limit is not None:
            picks = group.limit_bars if group.limit_bars is not None else range(len(group.bars))
            if picks:
                x1 = x + min(picks) * (bar_w + bar_gap) - 3
                x2 = x + max(picks) * (bar_w + bar_gap) + bar_w + 3
                chart.line(x1, y_of(group.limit), x2, y_of(group.limit), cls="limit")
        chart.text(x + group_w / 2, top + plot_h + 17, group.label, anchor="middle", cls="group")
        chart.text(x + group_w / 2, top + plot_h + 32, group.sublabel, anchor="middle", cls="muted")
        x += group_w + group_gap
    return chart
