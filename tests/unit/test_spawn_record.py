"""A daemon that dies in the middle of a spawn leaves a child the next daemon still ends.

Played with real processes: a "daemon" (a Python process running
``process.spawn``) is SIGKILLed while its child is between its fork and its
exec, or just after the exec; the next daemon's ``end_recorded`` must end that
child and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.supervisor import process
from tests.integration.helpers import vmm_list

ROOT = Path(__file__).resolve().parents[2]

# argv: DIR PREEXEC_SECONDS. The child sleeps in its preexec (as a slow
# confinement would), then execs `sleep 600` with the environment a VMM gets.
DAEMON = """
import asyncio, sys, time
from pathlib import Path
from spectrumd.supervisor import process
from tests.integration.helpers import vmm_list
d, slow = Path(sys.argv[1]), float(sys.argv[2])
async def main():
    await process.spawn(["sleep", "600"], (), d / "err", lambda: time.sleep(slow),
                        {"SPECTRUM_STATE_DIR": str(d), "SPECTRUM_INSTANCE": "a"},
                        pid_file=d / "vmm.pid")
    print("spawned", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def marked(d: Path) -> list[int]:
    """The daemon's live (not zombie) children, by the environment it gave them."""
    return [pid for _name, pid in vmm_list(d)]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for pid in marked(tmp_path):  # what a failed test left
        os.kill(pid, signal.SIGKILL)


def start_daemon(d: Path, slow: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(d), str(slow)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def until(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_daemon_killed_between_fork_and_exec_leaves_nothing(world: Path) -> None:
    d = world
    daemon = start_daemon(d, slow=1.5)
    until(lambda: children(daemon.pid))  # forked: the child is in its preexec now
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    # The daemon never learnt the child's pid, and the child has not exec'd yet.
    assert marked(d) == []
    t0 = time.monotonic()
    process.end_recorded(d / "vmm.pid", "test's child")
    waited = time.monotonic() - t0
    assert marked(d) == [], "the child lived on after its exec"
    assert waited > 0.5, f"read the pid file after {waited:.2f} s, before the child's exec"


def test_a_daemon_killed_after_the_exec_leaves_nothing(world: Path) -> None:
    d = world
    daemon = start_daemon(d, slow=0)
    assert daemon.stdout is not None
    assert daemon.stdout.readline() == "spawned\n"
    (child,) = marked(d)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    assert marked(d) == [child]  # a VMM outlives its daemon
    process.end_recorded(d / "vmm.pid", "test's child")
    assert marked(d) == [], "end_recorded returned before the child was gone"


def test_a_pid_that_names_another_process_now_is_left_alone(world: Path) -> None:
    d = world
    daemon = start_daemon(d, slow=0)
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline() == "spawned\n"
        (child,) = marked(d)
        pid, started = (d / "vmm.pid").read_text().split()
        assert (int(pid), int(started)) == (child, process.start_time(child))
        # The recorded process has gone and its pid names another one (same pid,
        # another start time): that one is not ours to end.
        (d / "vmm.pid").write_text(f"{pid} {int(started) + 1}\n")
        process.end_recorded(d / "vmm.pid", "test's child")
        assert marked(d) == [child]
        # Neither is garbage, a missing file, or a symlink put in its place.
        (d / "vmm.pid").write_text("garbage")
        process.end_recorded(d / "vmm.pid", "test's child")
        process.end_recorded(d / "none.pid", "test's child")
        (d / "vmm.pid").unlink()
        (d / "elsewhere").write_text(f"{pid} {started}\n")
        (d / "vmm.pid").symlink_to(d / "elsewhere")
        process.end_recorded(d / "vmm.pid", "test's child")
        assert marked(d) == [child]
    finally:
        daemon.kill()
        daemon.wait()
