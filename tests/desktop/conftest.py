"""Fixtures of the desktop tests: one virtual display for the session, GUI programs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.desktop.display import Display, virtual_display
from tests.desktop.ui import UI

ROOT = Path(__file__).resolve().parents[2]


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
def screenshots() -> Iterator[Path]:
    """Where the tests save their screenshots: ``$SPECTRUM_SCREENSHOTS`` (the
    README's are made with ``SPECTRUM_SCREENSHOTS=docs/screenshots``), else a
    directory removed at the end, so that a test run leaves the tree as it was."""
    wanted = os.environ.get("SPECTRUM_SCREENSHOTS")
    if wanted:
        yield Path(wanted).resolve()
        return
    d = Path(tempfile.mkdtemp(prefix="shots.", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ui(display: Display) -> Iterator[UI]:
    u = UI(display)
    yield u
    u.close()


# A traceback's first and last lines ("TypeError: ...", also for an exception
# PyGObject could not print with its traceback), and GLib's criticals.
LOG_PROBLEM = re.compile(
    r"^Traceback \(most recent call last\):$|^[\w.]*(?:Error|Exception)(?:: .*)?$"
    r"|^.*-CRITICAL \*\*.*$",
    re.MULTILINE,
)


class Gui:
    """GUI programs started by one test, ended by pid when it ends."""

    def __init__(self, display: Display, logdir: Path) -> None:
        self.display = display
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, which: str, bus: str, user: int | None = None) -> subprocess.Popen[bytes]:
        """Run ``spectrum-agent`` or ``spectrum-manager`` (``which``) on ``bus``.

        With ``user``, as that uid and without the venv: under Debian's Python,
        which has PyGObject (the desktop package needs nothing else).
        """
        log = open(self.logdir / f"{which}-{len(self.procs)}.log", "ab")  # noqa: SIM115
        argv = ["-m", "spectrumd.desktop", which, "--bus", bus, "--log-level", "debug"]
        env = self.display.env
        extra: dict[str, Any] = {}
        if user is None:
            argv.insert(0, sys.executable)
        else:
            argv.insert(0, "/usr/bin/python3")
            extra = {"user": user, "group": user, "extra_groups": [], "cwd": "/"}
            # A session bus of that user's own, as a desktop session has: GTK's
            # accessibility names its objects after the application's path there.
            session = subprocess.Popen(
                [
                    "dbus-daemon",
                    "--session",
                    "--nofork",
                    "--nopidfile",
                    "--print-address=1",
                    "--address=unix:tmpdir=/tmp",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                **extra,
            )
            self.procs.append(session)  # type: ignore[arg-type]
            assert session.stdout is not None
            env = dict(
                env,
                PYTHONPATH=str(ROOT),
                HOME="/nonexistent",
                DBUS_SESSION_BUS_ADDRESS=session.stdout.readline().strip(),
            )
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, **extra)
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logdir.glob("*.log"))
        )

    def problems(self) -> list[str]:
        """Lines of the programs' output (stdout and stderr) that a user must never
        get: a Python traceback (PyGObject prints one for an exception that escapes
        a callback, and the program goes on), or a GLib or GTK critical warning."""
        found = []
        for p in sorted(self.logdir.glob("*.log")):
            text = p.read_text(errors="replace")
            found += [f"{p.name}: {m.group(0)}" for m in LOG_PROBLEM.finditer(text)]
        return found

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
    logdir.chmod(0o755)
    g = Gui(display, logdir)
    try:
        yield g
        for p in g.procs:
            g.stop(p)
        # Every desktop test ends here: whatever it did, no program may have
        # printed a traceback or a critical warning on the way.
        problems = g.problems()
        assert not problems, "the GUI programs printed:\n" + "\n".join(problems)
    finally:
        for p in g.procs:
            g.stop(p)
        with contextlib.suppress(OSError):
            print(g.logs())
        shutil.rmtree(logdir, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pyatspi 2.46 calls Atspi functions that Atspi itself has deprecated.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(
                pytest.mark.filterwarnings("ignore:Atspi.Accessible.get_.*_iface is deprecated")
            )
