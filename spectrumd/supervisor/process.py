"""Spawning and ending VMM child processes.

Every spawn is paired with a reap: :func:`reap` is pushed on the instance's
exit stack right after the spawn, so a failure half way still ends the child.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal

log = logging.getLogger(__name__)

STDERR_LINES = 20


async def spawn(argv: list[str], pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
    """Start a VMM in its own session (crosvm SIGKILLs its whole process group on exit).

    ``pass_fds`` (taps, device nodes) were opened by the daemon with
    O_CLOEXEC; the child inherits exactly these. Raises OSError from exec.
    """
    return await asyncio.create_subprocess_exec(
        *argv,
        pass_fds=pass_fds,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )


def send_signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Signal our own child by pid; a child already reaped is not an error."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


async def reap(proc: asyncio.subprocess.Process) -> None:
    """End ``proc`` if it still runs (SIGKILL) and wait for it."""
    if proc.returncode is None:
        send_signal(proc, signal.SIGKILL)
    await proc.wait()


class StderrTail:
    """Keeps the last lines a VMM wrote to stderr (for failure reasons) and logs them."""

    def __init__(self, logger: logging.Logger) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._log = logger

    async def read(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.lines.append(line)
                self._log.info("vmm: %s", line)

    def last(self) -> str:
        return self.lines[-1] if self.lines else ""


def describe_exit(returncode: int, what: str = "vmm") -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"{what} exited with signal {-returncode}"
        return f"{what} exited with signal {-returncode} ({name})"
    return f"{what} exited with status {returncode}"
