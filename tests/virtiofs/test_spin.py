"""The adaptive polling window (spin.py), on a clock the test moves."""

from __future__ import annotations

from spectrumd.virtiofs.spin import MIN_WINDOW, Spin

US = 1e-6


def pace(spin: Spin, gap: float, requests: int, start: float = 0.0) -> float:
    """A guest that sends its next request *gap* after each reply; returns the clock."""
    now = start
    for _ in range(requests):
        spin.kicked(now)
        spin.served(now)
        now += gap
    spin.kicked(now)
    return now


def test_a_busy_guest_gets_a_window_that_covers_its_pace() -> None:
    spin = Spin(1000 * US)
    pace(spin, 450 * US, 10)
    assert 450 * US <= spin.window <= 1000 * US
    # Once it fits, a request caught while polling leaves it as it is.
    w = spin.window
    pace(spin, 450 * US, 10, start=1.0)
    assert spin.window == w


def test_the_window_never_passes_its_maximum() -> None:
    spin = Spin(300 * US)
    pace(spin, 290 * US, 50)
    assert spin.window == 300 * US


def test_an_idle_guest_costs_no_polling() -> None:
    spin = Spin(1000 * US)
    pace(spin, 450 * US, 10)
    assert spin.window > 0
    pace(spin, 0.5, 12, start=2.0)  # a request every half second
    assert spin.window == 0.0
    spin.served(10.0)
    assert spin.deadline() is None  # blocks at once


def test_the_deadline_runs_from_the_last_reply() -> None:
    spin = Spin(1000 * US)
    assert spin.deadline() is None  # nothing served yet
    pace(spin, 100 * US, 5)
    spin.served(7.0)
    assert spin.deadline() == 7.0 + spin.window
    spin.kicked(7.0 + spin.window / 2)
    assert spin.deadline() is None  # until the next reply


def test_no_maximum_no_polling() -> None:
    spin = Spin(0.0)
    pace(spin, 10 * US, 20)
    assert spin.window == 0.0 and spin.deadline() is None
    assert MIN_WINDOW > 0
