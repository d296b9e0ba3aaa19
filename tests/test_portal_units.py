"""The portal's pure parts by table: the chart's series, scale and stacks (integers, pieces that meet), the
form fields' parsing into micro-credits and minor units, and the amounts as the pages print them."""

from __future__ import annotations

import datetime as dt

import pytest

from sidecar.errors import BadRequest
from sidecar.portal import chart, forms
from sidecar.portal.render import credits, when
from sidecar.portal.usage_page import points

D1, D2 = dt.date(2026, 12, 1), dt.date(2026, 12, 2)


def test_fold_keeps_the_largest_series_and_sums_the_rest() -> None:
    pts = [(D1, f"m{i}", (i + 1) * 10) for i in range(8)] + [(D2, "m7", 5), (D2, "", 3)]
    order, values = chart.fold(pts, top=3)
    assert order == ["m7", "m6", "m5", chart.OTHER]
    assert values[D1.isoformat(), chart.OTHER] == 10 + 20 + 30 + 40 + 50
    assert values[D2.isoformat(), chart.OTHER] == 3  # usage without a value folds with the rest
    assert values[D2.isoformat(), "m7"] == 5
    assert chart.fold([(D1, "a", 1)]) == (["a"], {(D1.isoformat(), "a"): 1})


@pytest.mark.parametrize(
    ("peak", "top", "step"),
    [(0, 1_000_000, 250_000), (1, 1, 1), (7, 8, 2), (10, 10, 2), (11, 15, 5), (999_999, 1_000_000, 200_000),
     (1_000_001, 1_500_000, 500_000), (3_000_000, 3_000_000, 1_000_000)],
)  # fmt: skip
def test_the_scale_is_round_and_covers_the_peak(peak: int, top: int, step: int) -> None:
    assert chart.nice_top(peak) == (top, step)
    assert top >= peak
    assert 1 <= top // step <= 5


def test_stacks_meet_without_gaps_and_reach_their_totals() -> None:
    days = [D1, D2]
    values = {(D1.isoformat(), "a"): 333_333, (D1.isoformat(), "b"): 333_334, (D2.isoformat(), "b"): 1}
    drawn = chart.stacked(days, ["a", "b"], values)
    assert drawn.top == 800_000  # 0.2 a step
    assert drawn.total == 666_668
    day1 = sorted((b for b in drawn.bars if b.day == D1.isoformat()), key=lambda b: -b.y)
    assert [b.series for b in day1] == ["a", "b"]  # the first series at the bottom
    assert day1[0].y + day1[0].height == drawn.base
    assert day1[1].y + day1[1].height == day1[0].y  # no gap, no overlap
    assert all(isinstance(v, int) for b in drawn.bars for v in (b.x, b.y, b.width, b.height))
    (tiny,) = [b for b in drawn.bars if b.day == D2.isoformat()]
    assert tiny.height == 1  # a sliver is still drawn
    assert drawn.rows == [(D1.isoformat(), [333_333, 333_334], 666_667), (D2.isoformat(), [0, 1], 1)]
    assert drawn.labels[-1][1] == "Dec 02"  # the last day is always labelled
    assert chart.stacked(days, [], {}).bars == []


def test_points_add_the_usage_no_value_covers() -> None:
    rows = [(D1, "total", "", 10), (D1, "key", "k1", 7), (D2, "total", "", 4), (D2, "tag", "a=b", 4)]
    assert sorted(points(rows, "key")) == [(D1, chart.NONE, 3), (D1, "k1", 7), (D2, chart.NONE, 4)]
    assert points(rows, "tag") == [(D2, "a=b", 4)]  # tags overlap: no remainder


@pytest.mark.parametrize(
    ("raw", "micro"), [("1", 1_000_000), ("12.5", 12_500_000), ("0.000001", 1), ("1,000", 1_000_000_000)]
)
def test_credits_fields(raw: str, micro: int) -> None:
    assert forms.credits({"x": raw}, "x") == micro


@pytest.mark.parametrize("raw", ["", "abc", "1e999999", "NaN", "Infinity", "0.0000001", "-1", "0", "9" * 30])
def test_bad_credits_fields_name_the_field(raw: str) -> None:
    with pytest.raises(BadRequest) as err:
        forms.credits({"x": raw}, "x")
    assert err.value.param == "x"


def test_money_fields_are_exact_minor_units() -> None:
    assert forms.money({"a": "25.00"}, "a", "usd") == 2500
    assert forms.money({"a": "1,000"}, "a", "jpy") == 1000
    for bad in ("25.001", "0", "-5", "x"):
        with pytest.raises(BadRequest):
            forms.money({"a": bad}, "a", "usd")
    with pytest.raises(BadRequest):
        forms.money({"a": "1.5"}, "a", "jpy")


def test_printed_amounts_and_instants() -> None:
    assert credits(1_234_567_890) == "1,234.56789"
    assert credits(-500_000) == "-0.5"
    assert credits(0) == "0"
    with pytest.raises(TypeError):
        credits(1.5)
    assert when("2026-12-07T08:00:00.123Z") == "2026-12-07 08:00 UTC"
    assert when(0) == "1970-01-01 00:00 UTC"
    assert when(None) == ""
    assert forms.end_of_day_iso(D1) == "2026-12-02T00:00:00+00:00"
