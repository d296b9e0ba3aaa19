"""The retry schedule (pure): doubling delays with jitter up to the cap, the same for the same inputs,
retries for the whole window and a give-up at its end."""

from __future__ import annotations

import datetime as dt

from sidecar.signals.schedule import Schedule, jitter

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)


def test_delays_double_with_jitter_up_to_the_cap() -> None:
    schedule = Schedule(30, 3600, DAY)
    for attempts, full in [(1, 30), (2, 60), (3, 120), (7, 1920), (8, 3600), (30, 3600), (500, 3600)]:
        seconds = schedule.delay(42, attempts).total_seconds()
        assert full / 2 <= seconds <= full, (attempts, seconds)
    assert schedule.delay(42, 3) == schedule.delay(42, 3)  # deterministic
    spread = {schedule.delay(d, 3) for d in range(50)}
    assert len(spread) > 40  # deliveries failing together do not retry together


def test_jitter_is_a_fraction() -> None:
    values = [jitter(d, a) for d in range(100) for a in range(1, 5)]
    assert all(0 <= v < 1 for v in values)
    assert min(values) < 0.1
    assert max(values) > 0.9


def test_retries_cover_the_window_then_give_up() -> None:
    schedule = Schedule(30, 3600, DAY)
    now, attempts, times = T0, 0, []
    while True:
        attempts += 1
        times.append(now)
        later = schedule.after_failure(7, attempts, T0, now)
        if later is None:
            break
        assert now < later <= T0 + DAY
        now = later
    assert times[-1] == T0 + DAY  # the last try is at the window's end
    assert schedule.outcome(False, 7, attempts, T0, times[-1]) == ("failed", None)
    assert schedule.outcome(True, 7, attempts, T0, times[-1]) == ("delivered", None)
    assert schedule.outcome(False, 7, 1, T0, T0)[0] == "retry"


def test_a_replay_starts_the_window_again() -> None:
    schedule = Schedule(30, 3600, DAY)
    late = T0 + DAY + dt.timedelta(hours=5)
    assert schedule.after_failure(1, 40, T0, late) is None
    assert schedule.after_failure(1, 40, late, late) is not None  # replayed at `late`
