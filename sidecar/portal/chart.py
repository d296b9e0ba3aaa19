"""The usage chart, drawn on the server as SVG: a bar per day, stacked by series (models, keys, end users
or tags), with its scale. Pure and integer-only: amounts are micro-credits, positions whole units of the
SVG's viewBox (a stack's pieces are cut from its running sums, so they meet without gaps or overlaps)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from ..money import format_credits

TOP_SERIES = 6  # series drawn on their own; the rest are summed as OTHER
OTHER = "other"
NONE = "(none)"  # usage without a key, user or tag
# Distinct on white, each at least 3:1 against it (WCAG's contrast for graphics); OTHER is grey.
PALETTE = ("#1f5fa8", "#c2410c", "#047857", "#7e22ce", "#a16207", "#be123c")
OTHER_COLOR = "#6b7280"
LEFT, TOP, PLOT_HEIGHT, BOTTOM = 64, 12, 180, 28
SLOT, BAR = 20, 14  # each day's slot and its bar, in viewBox units


@dataclass(frozen=True, slots=True)
class Bar:
    x: int
    y: int
    width: int
    height: int
    color: str
    day: str
    series: str
    value: int


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    color: str
    total: int


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    days: list[str]
    series: list[Series]
    bars: list[Bar]
    ticks: list[tuple[int, str]]  # (y, label)
    labels: list[tuple[int, str]]  # (x of a bar's middle, the day's label)
    rows: list[tuple[str, list[int], int]]  # the table: day, each series' value, the day's total
    top: int  # the scale's top, micro-credits
    total: int

    @property
    def base(self) -> int:
        return TOP + PLOT_HEIGHT

    @property
    def left(self) -> int:
        return LEFT


def fold(
    points: Iterable[tuple[dt.date, str, int]], top: int = TOP_SERIES
) -> tuple[list[str], dict[tuple[str, str], int]]:
    """(day, series, charge) points -> the series in order (the `top` largest by total charge, then
    OTHER when anything is left) and each (day ISO, series) value."""
    totals: dict[str, int] = {}
    for _, name, charge in points:
        totals[name or NONE] = totals.get(name or NONE, 0) + charge
    ranked = sorted(totals, key=lambda n: (-totals[n], n))
    kept = set(ranked[:top])
    values: dict[tuple[str, str], int] = {}
    for day, name, charge in points:
        series = name or NONE
        series = series if series in kept else OTHER
        values[day.isoformat(), series] = values.get((day.isoformat(), series), 0) + charge
    order = ranked[:top] + ([OTHER] if len(ranked) > top else [])
    return order, values


def nice_top(peak: int) -> tuple[int, int]:
    """A scale top at or above `peak` and its step: 1, 2 or 5 times a power of ten, 2-5 steps."""
    if peak <= 0:
        return 1_000_000, 250_000  # an empty chart shows 0..1 credit
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step * 5 >= peak:
                s = m * step
                return -(-peak // s) * s, s
        step *= 10


def stacked(days: list[dt.date], order: list[str], values: dict[tuple[str, str], int]) -> Chart:
    names = [d.isoformat() for d in days]
    totals = [sum(values.get((n, s), 0) for s in order) for n in names]
    top, step = nice_top(max(totals, default=0))
    colors = {s: (OTHER_COLOR if s == OTHER else PALETTE[i % len(PALETTE)]) for i, s in enumerate(order)}
    base = TOP + PLOT_HEIGHT
    bars: list[Bar] = []
    for i, name in enumerate(names):
        x = LEFT + i * SLOT + (SLOT - BAR) // 2
        running = 0
        for s in order:
            v = values.get((name, s), 0)
            if v <= 0:
                continue
            low = base - running * PLOT_HEIGHT // top
            running += v
            high = base - running * PLOT_HEIGHT // top
            bars.append(Bar(x, high, BAR, max(low - high, 1), colors[s], name, s, v))
    ticks = [(base - t * PLOT_HEIGHT // top, format_credits(t)) for t in range(0, top + 1, step)]
    every = max(1, len(names) // 6)  # about six day labels, the last day always among them
    labels = [
        (LEFT + i * SLOT + SLOT // 2, d.strftime("%b %d"))
        for i, d in enumerate(days)
        if (len(days) - 1 - i) % every == 0
    ]
    series = [Series(s, colors[s], sum(values.get((n, s), 0) for n in names)) for s in order]
    rows = [(n, [values.get((n, s), 0) for s in order], t) for n, t in zip(names, totals, strict=True)]
    return Chart(
        width=LEFT + len(names) * SLOT + 8,
        height=base + BOTTOM,
        days=names,
        series=series,
        bars=bars,
        ticks=ticks,
        labels=labels,
        rows=rows,
        top=top,
        total=sum(totals),
    )
