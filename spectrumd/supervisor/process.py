"""VMM processes: spawned as our children, or adopted after a daemon restart.

Every spawn is paired with a reap: :meth:`VmmProcess.reap` is pushed on the
run's exit stack right after the spawn, so a failure half way still ends the
child. A VMM outlives the daemon (it runs in its own session, and its stderr
goes to a file, not a pipe that would break), so a restarted daemon adopts
it: it checks that the pid still names the same process (its start time) and
watches it through a pidfd, which also makes signals safe from pid reuse.

A daemon can also die in the middle of a spawn, between the fork and the
moment it learns the child's pid. So that the next daemon still finds that
child, the child records itself: before anything else it writes its pid and
start time into a *pid file* that the parent holds locked (flock) from before
the fork; the child shares the lock until its exec. The next daemon takes the
lock before it reads the file (:func:`end_recorded`), so it reads it only
once every child that could write it has written it or is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
# How long the next daemon waits for a spawn cut short to reach its exec (the
# lock), and for a process it ended to be gone.
LOCK_WAIT = 5.0
EXIT_WAIT = 10.0


def start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot, /proc/PID/stat field 22) of a live process.

    None if there is no such process or it has already exited: a zombie (an
    exited VMM whose parent, an earlier daemon, is gone and which nobody has
    reaped yet) is not alive.
    """
    try:
        fields = _stat_fields(Path(f"/proc/{pid}/stat").read_bytes())
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _stat_fields(stat: bytes) -> list[bytes]:
    """/proc/PID/stat's fields from the third (the state) on: the command name
    (field 2) may hold spaces and parentheses, so split after the last ')'."""
    return stat[stat.rfind(b")") + 2 :].split()


class VmmProcess:
    """A VMM we started (``child``) or adopted (``pidfd``)."""

    def __init__(
        self,
        pid: int,
        child: asyncio.subprocess.Process | None = None,
        pidfd: int | None = None,
    ) -> None:
        self.pid = pid
        self.started = start_time(pid)
        self._child = child
        self._pidfd = pidfd
        self._exited: asyncio.Future[int | None] | None = None

    @property
    def adopted(self) -> bool:
        return self._child is None

    @property
    def returncode(self) -> int | None:
        if self._child is not None:
            return self._child.returncode
        return None

    @property
    def running(self) -> bool:
        if self._child is not None:
            return self._child.returncode is None
        return self._exited is None or not self._exited.done()

    async def wait(self) -> int | None:
        """Wait for the exit; the status (None if unknown: an adopted process)."""
        if self._child is not None:
            return await self._child.wait()
        if self._exited is None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[int | None] = loop.create_future()
            assert self._pidfd is not None
            fd = self._pidfd

            def readable() -> None:
                # A pidfd becomes readable when the process has exited.
                loop.remove_reader(fd)
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, readable)
            self._exited = fut
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the process; one that has already exited is not an error."""
        with contextlib.suppress(ProcessLookupError):
            if self._child is not None:
                if self._child.returncode is None:
                    self._child.send_signal(sig)
            elif self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)

    async def reap(self) -> None:
        """End the process if it still runs (SIGKILL) and wait for it."""
        if self.running:
            self.send_signal(signal.SIGKILL)
        await self.wait()
        self.close()

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def spawn(
    argv: list[str],
    pass_fds: tuple[int, ...],
    stderr_path: Path,
    confine: Callable[[], None] | None,
    env: Mapping[str, str],
    pid_file: Path | None = None,
) -> VmmProcess:
    """Start a VMM in its own session (crosvm SIGKILLs its whole process group on exit).

    ``pass_fds`` (taps, device nodes, sockets) were opened by the daemon with
    O_CLOEXEC; the child inherits exactly these. Its stderr goes to
    ``stderr_path``. ``confine`` runs in the child before the exec (its uid,
    namespaces, Landlock: ``sandbox.Prepared.enter``). ``env`` is added to a
    minimal environment. With ``pid_file`` (in a root-only directory), the
    child records itself there first (see the module's text). Raises OSError
    from exec, SubprocessError if the confinement failed.
    """
    lock = -1
    if pid_file is not None:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        lock = os.open(pid_file, flags, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)

    def preexec() -> None:
        if lock >= 0:
            _record_self(lock)
        if confine is not None:
            confine()

    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            pass_fds=pass_fds,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            close_fds=True,
            preexec_fn=preexec if lock >= 0 or confine is not None else None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        )
    finally:
        os.close(err)
        if lock >= 0:
            os.close(lock)
    return VmmProcess(proc.pid, child=proc)


def _record_self(fd: int) -> None:
    """In the child, between its fork and its exec: "PID START_TIME" into the pid
    file ``fd``. System calls and bytes only (no imports, no locks: as
    ``sandbox.Prepared.enter``)."""
    stat_fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = os.read(stat_fd, 4096)
    finally:
        os.close(stat_fd)
    started = _stat_fields(stat)[19]  # field 22, as start_time() reads it
    os.pwrite(fd, b"%d %s\n" % (os.getpid(), started), 0)


def end_recorded(pid_file: Path, what: str) -> None:
    """End the process a pid file names, if it is still that process, and wait until
    it is gone (the next daemon, for a run that was never completed or is no
    longer wanted). A missing or unreadable file is nothing to end."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("%s: a spawn still holds it; reading it as it is", pid_file)
                    break
                time.sleep(0.01)
        text = os.pread(fd, 64, 0).decode(errors="replace").split()
    finally:
        os.close(fd)
    try:
        pid, started = int(text[0]), int(text[1])
    except (IndexError, ValueError):
        return  # the child never got as far as recording itself: it is gone
    end_if_same(pid, started, what)


def end_if_same(pid: int, started: int, what: str) -> None:
    """SIGKILL ``pid`` if it still has start time ``started``; wait until it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # Checked once the pidfd is open: the pid cannot name another process now.
        if start_time(pid) != started:
            return
        log.warning("ending %s (pid %d)", what, pid)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        # Readable once it has exited: what it held (a tap, a uid) is free then.
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(EXIT_WAIT * 1000)):
            log.error("%s (pid %d) did not exit within %.0f s of SIGKILL", what, pid, EXIT_WAIT)
    finally:
        os.close(pidfd)


def adopt(pid: int, expected_start: int, token: str, exe: str) -> VmmProcess | None:
    """Adopt a VMM left by an earlier daemon, if ``pid`` still names that very process:
    the same start time, the same executable, and ``SPECTRUM_RUN=token`` in its
    environment (what the daemon started it with)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after the pidfd is open: from now on the pid cannot be reused under us.
    if start_time(pid) != expected_start or not is_run(pid, token, exe):
        os.close(pidfd)
        return None
    return VmmProcess(pid, pidfd=pidfd)


def executable(pid: int) -> str:
    """What the kernel says ``pid`` runs ("" if it cannot be read)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def is_run(pid: int, token: str, exe: str | None = None) -> bool:
    """True if ``pid`` was started with ``SPECTRUM_RUN=token`` (and runs ``exe``)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    if exe is not None and executable(pid) != exe:
        return False
    return bool(token) and f"SPECTRUM_RUN={token}".encode() in environ


def stderr_tail(path: Path) -> str:
    """The last non-empty line the VMM wrote to stderr ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def describe_exit(returncode: int | None, what: str = "vmm") -> str:
    if returncode is None:
        return f"{what} exited (status unknown: it was adopted after a daemon restart)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"{what} exited with signal {-returncode}"
        return f"{what} exited with signal {-returncode} ({name})"
    return f"{what} exited with status {returncode}"


async def reap_child(proc: asyncio.subprocess.Process) -> None:
    """End a helper child (e.g. the file server) if it still runs, and wait for it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    await proc.wait()
