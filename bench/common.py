"""What the benchmarks share: children ended by pid, our VMMs' last-resort
cleanup, /proc readings, and D-Bus calls that raise on an error reply."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus


class CallFailed(Exception):
    pass


async def checked_call(bus: MessageBus, msg: Message, what: str = "") -> Message:
    """``bus.call`` that raises CallFailed (naming the error) on an error reply."""
    reply = await bus.call(msg)
    if reply is None or reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply is not None and reply.body else ""
        name = reply.error_name if reply is not None else "no reply"
        raise CallFailed(f"{what + ': ' if what else ''}{name}: {detail}")
    return reply


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


@contextlib.contextmanager
def child(argv: list[str], name: str, **kw: Any) -> Iterator[subprocess.Popen[str]]:
    """A child process ended by pid (SIGTERM, then SIGKILL) on the way out."""
    proc = subprocess.Popen(argv, text=True, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} ignored SIGTERM, killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


def kill_our_vmms(state_dir: Path) -> None:
    """Last resort: SIGKILL VMMs that our spectrumd recorded and that still run.

    Only pids that carry their run's token (vmm.pid: "PID TOKEN") are touched
    (spectrumd leaves its VMMs running when it exits, for the next one to adopt).
    """
    for pidfile in (state_dir / "run").glob("*/vmm.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid_text, token = pidfile.read_text().split()
            pid = int(pid_text)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"SPECTRUM_RUN={token}".encode() in environ:
                os.kill(pid, signal.SIGKILL)
                print(f"bench: killed leftover VMM {pid}", file=sys.stderr)


@contextlib.contextmanager
def private_bus(workdir: Path) -> Iterator[str]:
    """A private session-type dbus-daemon in ``workdir``; yields its address."""
    argv = [
        "dbus-daemon",
        "--session",
        "--nofork",
        "--nopidfile",
        f"--address=unix:path={workdir / 'bus'}",
        "--print-address=1",
    ]
    log = workdir / "dbus-daemon.log"
    with (
        open(log, "w") as err,
        child(argv, "dbus-daemon", stdout=subprocess.PIPE, stderr=err) as dbus,
    ):
        assert dbus.stdout is not None
        address = dbus.stdout.readline().strip()
        if not address.startswith("unix:"):
            raise RuntimeError(f"dbus-daemon gave no address: {address!r}\n{log.read_text()}")
        yield address
