"""The adaptive polling window (spin.py), on a clock the test moves; the
companion that keeps a CPU awake (KeepAwake), a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spectrumd.virtiofs.spin import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    MIN_WINDOW,
    SHARED,
    KeepAwake,
    RunDelay,
    Spin,
)
from tests.conftest import proc_state

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


def test_a_wait_for_the_cpu_stops_polling_for_a_quiet_time_that_doubles() -> None:
    spin = Spin(1000 * US)
    now = pace(spin, 450 * US, 10)
    spin.served(now)
    assert spin.deadline() is not None  # polling
    # The next kick finds the process waited 2 ms for a CPU: another task wants it.
    now += 450 * US
    spin.kicked(now, waited=SHARED * 2)
    assert spin.backoff == MIN_BACKOFF
    spin.served(now)
    assert spin.deadline() is None  # blocks, for the quiet time
    quiet_end = now + MIN_BACKOFF
    while now + 450 * US < quiet_end:
        now += 450 * US
        spin.kicked(now)
        spin.served(now)
        assert spin.deadline() is None
    now = quiet_end
    spin.kicked(now)
    spin.served(now)
    assert spin.deadline() is not None  # polls again
    # Still shared: the quiet time doubles, up to its maximum.
    for want in [2 * MIN_BACKOFF, 4 * MIN_BACKOFF]:
        now += 450 * US
        spin.kicked(now, waited=SHARED * 2)
        assert spin.backoff == want
    for _ in range(20):
        spin.kicked(now, waited=SHARED * 2)
    assert spin.backoff == MAX_BACKOFF


def test_windows_polled_without_a_wait_shorten_the_quiet_time() -> None:
    spin = Spin(1000 * US)
    now = pace(spin, 450 * US, 10)
    for _ in range(3):
        spin.kicked(now, waited=SHARED * 2)  # 10, 20, 40 ms
    assert spin.backoff == 4 * MIN_BACKOFF
    now += 4 * MIN_BACKOFF
    halvings = [2 * MIN_BACKOFF, MIN_BACKOFF, 0.0]
    for want in halvings:
        spin.served(now)
        assert spin.deadline() is not None
        now += 450 * US
        spin.kicked(now, waited=50 * US)  # a wait no longer than an idle machine's
        assert spin.backoff == want


def test_a_short_wait_is_not_a_shared_cpu() -> None:
    spin = Spin(1000 * US)
    now = pace(spin, 450 * US, 10)
    spin.kicked(now, waited=SHARED)
    spin.served(now)
    assert spin.backoff == 0.0 and spin.deadline() is not None


def test_run_delay_reads_the_time_this_process_waited_for_a_cpu() -> None:
    """A busy process on the CPU this one is pinned to: the wait shows."""
    waits = RunDelay()
    assert waits.fd >= 0, "no /proc/self/schedstat"
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.2)  # the hog pins itself and runs
        waits.since_last()
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # runnable all along: the hog takes about half
            pass
        waited = waits.since_last()
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
        waits.close()
    assert 0.05 < waited < 0.3


# -- the companion ---------------------------------------------------------------------------


def on_cpu(pid: int) -> float:
    """Seconds *pid* has run so far (the first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def until(what: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.fixture
def awake() -> Iterator[KeepAwake]:
    a = KeepAwake.start()
    assert a is not None
    try:
        yield a
    finally:
        a.close()
    assert proc_state(a.pid) == ""  # close() ended and reaped it


def test_the_companion_holds_nothing_and_sleeps_until_a_window_opens(awake: KeepAwake) -> None:
    until(lambda: os.listdir(f"/proc/{awake.pid}/fd") == ["0"])  # its output closed too
    assert os.readlink(f"/proc/{awake.pid}/fd/0").startswith("pipe:")
    until(lambda: proc_state(awake.pid) == "S")
    ran = on_cpu(awake.pid)
    time.sleep(0.3)
    assert on_cpu(awake.pid) - ran < 0.01


@pytest.mark.skipif(os.geteuid() != 0, reason="root: RLIMIT_NICE for the way back from SCHED_IDLE")
def test_in_a_window_the_companion_spins_at_idle_priority_then_sleeps(awake: KeepAwake) -> None:
    until(lambda: proc_state(awake.pid) == "S")
    assert os.sched_getscheduler(awake.pid) == os.SCHED_OTHER  # asleep: woken at once when it ends
    awake.until(time.monotonic() + 0.6)
    until(lambda: os.sched_getscheduler(awake.pid) == os.SCHED_IDLE)
    ran = on_cpu(awake.pid)
    time.sleep(0.2)
    assert on_cpu(awake.pid) - ran > 0.1  # of 0.2 s; this test sleeps, the CPU is free
    until(
        lambda: proc_state(awake.pid) == "S" and os.sched_getscheduler(awake.pid) == os.SCHED_OTHER
    )
    ran = on_cpu(awake.pid)
    time.sleep(0.3)
    assert on_cpu(awake.pid) - ran < 0.01  # the window has passed: no more spinning


SERVER = """
import sys, time
from spectrumd.virtiofs.spin import KeepAwake
a = KeepAwake.start()
if sys.argv[1] == "window":
    a.until(time.monotonic() + 60)
print(a.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("when", ["asleep", "window"])
def test_the_companion_ends_when_its_server_is_killed(when: str) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, when], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        companion = int(server.stdout.readline())
        policy = os.SCHED_IDLE if when == "window" else os.SCHED_OTHER
        until(lambda: os.sched_getscheduler(companion) == policy)
        server.send_signal(signal.SIGKILL)  # no close(), no end of file from it
        server.wait()
        until(lambda: proc_state(companion) in ("", "Z"), timeout=3)  # init reaps it
    finally:
        server.kill()
        server.wait()
