"""A real X display for GUI tests: Xvfb, a private session bus and an AT-SPI bus.

The accessibility bus is a dbus-daemon of our own rather than the one
at-spi-bus-launcher starts: the launcher's lets only its own user in, and the
tests also run a GUI as another user (a reader of the bus, not an admin).
Everything is started here and ended by pid (also the registry daemon that the
accessibility bus activates).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

# at-spi2-core's accessibility.conf, open to every user of this machine.
A11Y_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>accessibility</type>
  <servicedir>/usr/share/dbus-1/accessibility-services</servicedir>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _end(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Display:
    def __init__(self, display: str, session_bus: str, a11y_bus: str, workdir: Path) -> None:
        self.display = display
        self.session_bus = session_bus
        self.a11y_bus = a11y_bus
        self.workdir = workdir

    @property
    def env(self) -> dict[str, str]:
        """The environment of a GUI program on this display."""
        env = dict(os.environ)
        env.update(
            DISPLAY=self.display,
            DBUS_SESSION_BUS_ADDRESS=self.session_bus,
            AT_SPI_BUS_ADDRESS=self.a11y_bus,
            GDK_BACKEND="x11",
            GSETTINGS_BACKEND="memory",
            GTK_A11Y="atspi",
            NO_AT_BRIDGE="0",
            LANG="C.UTF-8",
        )
        env.pop("WAYLAND_DISPLAY", None)
        return env

    def xdotool(self, *args: str) -> str:
        return subprocess.run(
            ["xdotool", *args], env=self.env, capture_output=True, text=True, timeout=10, check=True
        ).stdout

    def screenshot(self, path: Path, window: str = "root") -> None:
        """Save the screen, or one X window (an id from xdotool), as a PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["import", "-window", window, str(path)], env=self.env, check=True, timeout=20
        )


@contextlib.contextmanager
def virtual_display(workdir: Path, size: str = "1280x800x24") -> Iterator[Display]:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # a GUI of another user reaches the accessibility bus in it
    procs: list[subprocess.Popen[str]] = []
    read_fd, write_fd = os.pipe()
    try:
        # -displayfd: Xvfb picks a free display number and writes it to the pipe.
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_fd), "-nolisten", "tcp", "-screen", "0", size],
            pass_fds=(write_fd,),
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(xvfb)
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd, "r") as f:
            read_fd = -1
            number = f.readline().strip()
        assert number.isdigit(), f"Xvfb did not start (got {number!r})"
        display = f":{number}"
        session = subprocess.Popen(
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                f"--address=unix:path={workdir / 'session-bus'}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(session)
        assert session.stdout is not None
        session_bus = session.stdout.readline().strip()
        conf = workdir / "a11y.conf"
        conf.write_text(A11Y_CONF.format(socket=workdir / "a11y-bus"))
        a11y_proc = subprocess.Popen(
            [
                "dbus-daemon",
                f"--config-file={conf}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # The registry daemon it activates finds its bus through this variable.
            env=dict(
                os.environ,
                DISPLAY=display,
                AT_SPI_BUS_ADDRESS=f"unix:path={workdir / 'a11y-bus'}",
                DBUS_SESSION_BUS_ADDRESS=session_bus,
            ),
            text=True,
        )
        procs.append(a11y_proc)
        assert a11y_proc.stdout is not None
        a11y = a11y_proc.stdout.readline().strip()
        assert a11y.startswith("unix:"), a11y
        yield Display(display, session_bus, a11y, workdir)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        for proc in reversed(procs):
            kids = _children(proc.pid)
            _end(proc)
            for kid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGTERM)
