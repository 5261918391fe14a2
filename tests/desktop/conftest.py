"""Fixtures of the desktop tests: one virtual display for the session, GUI programs."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.desktop.display import Display, virtual_display
from tests.desktop.ui import UI

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def _have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


@pytest.fixture(scope="session")
def display() -> Iterator[Display]:
    if not _have("Xvfb", "xdotool", "import", "dbus-daemon"):
        pytest.fail(
            "the desktop tests need xvfb, xdotool and imagemagick (scripts/install-deps.sh)"
        )
    work = Path(tempfile.mkdtemp(prefix="spx.", dir="/tmp"))
    try:
        with virtual_display(work) as d:
            yield d
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def ui(display: Display) -> Iterator[UI]:
    u = UI(display)
    yield u
    u.close()


class Gui:
    """GUI programs started by one test, ended by pid when it ends."""

    def __init__(self, display: Display, logdir: Path) -> None:
        self.display = display
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, which: str, bus: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{which}-{len(self.procs)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spectrumd.desktop",
                which,
                "--bus",
                bus,
                "--log-level",
                "debug",
            ],
            env=self.display.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logdir.glob("*.log"))
        )

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
async def gui(display: Display, short_tmp: Path) -> AsyncIterator[Gui]:
    logdir = Path(tempfile.mkdtemp(prefix="gui.", dir=short_tmp))
    g = Gui(display, logdir)
    try:
        yield g
    finally:
        for p in g.procs:
            g.stop(p)
        with contextlib.suppress(OSError):
            print(g.logs())
        shutil.rmtree(logdir, ignore_errors=True)
