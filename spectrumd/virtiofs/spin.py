"""Adaptive polling: keep a CPU awake a little after a request, as QEMU's
own event loops do (``poll-max-ns``).

A guest's next request often comes soon after the reply to its last one (a
``dd`` or a ``find``: one request at a time). If the server's CPU goes idle
in between, the next request waits for it to wake: on a machine that is
itself a VM, an idle CPU is slow to wake (its host must run it again). So
after serving a kick the server keeps a CPU busy for a *window*: not
itself, which sleeps in epoll_wait as before, but a companion process
(:class:`KeepAwake`) that spins at ``SCHED_IDLE`` until the window's end.
The scheduler counts a CPU that runs only ``SCHED_IDLE`` work as idle: any
task that wakes, the server on its next kick or QEMU's threads, takes it at
once, and never waits for the spinner. Nothing the server does waits for
the companion either: if it is gone, nothing polls.

The window adapts to what the guest does. When the next request came later
than the window but within ``max_window``, the window doubles (from
``MIN_WINDOW``); when it came later than ``max_window``, or not at all, the
window halves, down to nothing. A busy guest thus gets a window that covers
its pace; an idle one costs no polling.

A CPU nobody else wants is all polling is for. The server reads how long
it waited for a CPU between two kicks (``run_delay``, /proc/self/schedstat,
see :class:`RunDelay`); above ``SHARED`` the CPU is shared, and no window
opens for a quiet time that doubles while that goes on, from
``MIN_BACKOFF`` up to ``MAX_BACKOFF``, and halves with each window opened
without such a wait. Nothing speculative then runs (warm.py neither).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import resource
import signal
import struct
import time
from collections.abc import Callable

from . import resolve

logger = logging.getLogger(__name__)

MIN_WINDOW = 32e-6
# A guest under TCG sends its next request some 0.5 ms after a reply; under
# KVM far sooner, and the adaptive window stays that short.
DEFAULT_POLL_MAX_US = 1000
# Waited this long for a CPU between two kicks: it is shared. On an idle
# machine here 1 in 500 kicks finds such a wait (the hypervisor, QEMU's own
# threads); with a busy process on each core, 2 in 5.
SHARED = 1e-3
MIN_BACKOFF = 10e-3
MAX_BACKOFF = 1.0


class Spin:
    def __init__(self, max_window: float) -> None:
        self.max_window = max(0.0, max_window)
        self.window = 0.0
        self._idle_since: float | None = None  # when the last requests were answered
        self.backoff = 0.0  # the quiet time after a wait for the CPU (0: none)
        self._quiet_until = 0.0  # windows that start before then do not poll

    def deadline(self) -> float | None:
        """Poll without blocking until then; None: block."""
        if self._idle_since is None or self.window <= 0.0 or self._idle_since < self._quiet_until:
            return None
        return self._idle_since + self.window

    def shared(self, now: float) -> bool:
        """Whether the CPU is taken as shared at *now* (in a quiet time):
        nothing speculative (polling, warming) should run then."""
        return now < self._quiet_until

    def served(self, now: float) -> None:
        """A kick's requests were answered at *now*: the window starts."""
        self._idle_since = now

    def kicked(self, now: float, waited: float = 0.0) -> None:
        """A kick came at *now*: learn from how long the queue was idle, and
        from *waited*, the seconds this process waited for a CPU since the
        last kick."""
        if waited > SHARED:
            self.backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, 2 * self.backoff))
            self._quiet_until = now + self.backoff
        elif self.deadline() is not None:  # this window polled, and waited for nothing
            self.backoff = self.backoff / 2 if self.backoff > MIN_BACKOFF else 0.0
        if self._idle_since is None:
            return
        idle = now - self._idle_since
        self._idle_since = None
        if idle <= self.window:
            return  # caught while polling: the window fits
        if idle <= self.max_window:
            self.window = min(self.max_window, max(2 * self.window, MIN_WINDOW))
        else:
            self.window = self.window / 2 if self.window > MIN_WINDOW else 0.0


class RunDelay:
    """How long this process waited for a CPU: the kernel's ``run_delay``
    (the second field of /proc/self/schedstat, nanoseconds spent runnable
    but not running). Without the file (a kernel without
    CONFIG_SCHED_INFO), or not *enabled* (a loop that never polls), it
    reads 0: polling then never backs off."""

    def __init__(self, enabled: bool = True) -> None:
        self.fd = -1
        self._last = 0
        if not enabled:
            return
        try:
            # Through the /proc/self/fd the jail keeps (resolve.proc_fd).
            self.fd = os.open("../schedstat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=resolve.proc_fd())
            self._last = self._read()
        except (OSError, ValueError, IndexError) as e:
            logger.debug("no run_delay (polling will not back off): %s", e)
            self.close()

    def _read(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1])

    def since_last(self) -> float:
        """Seconds waited for a CPU since the last call."""
        if self.fd < 0:
            return 0.0
        try:
            now = self._read()
        except (OSError, ValueError, IndexError):
            self.close()  # as if it never opened: no failing read at every kick
            return 0.0
        waited, self._last = now - self._last, now
        return waited / 1e9

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


# The page the server and its companion share: the window's end (monotonic
# seconds), and whether the companion sleeps (then a byte down the pipe wakes it).
_DEADLINE = struct.Struct("d")
_PARKED = _DEADLINE.size
# What SCHED_IDLE → SCHED_OTHER needs without privilege: RLIMIT_NICE of at
# least 20 - nice (nice 0 here); it allows no nice below 0.
_NICE_LIMIT = 20
# How long close() waits to reap the companion.
REAP_WAIT = 0.5
# Spins between two looks whether the server still lives (a few hundred µs).
_LOOK_EVERY = 0x3FF


class KeepAwake:
    """The server's companion: a process that spins at ``SCHED_IDLE`` while
    a window is open, and sleeps otherwise (see the module docstring).

    :meth:`start` forks it; call it before the server confines itself
    (``confine`` then makes the companion enter the same jail). The
    companion keeps no descriptor but the read end of a pipe from the
    server: a byte wakes it, end of file (the server closed it or died)
    ends it. It shares one page with the server, and reads nothing from
    it but a deadline. It sleeps at ``SCHED_OTHER`` and spins at
    ``SCHED_IDLE``, so that it ends at once when the server does, however
    busy the CPUs are.
    """

    def __init__(self, pid: int, shm: mmap.mmap, wake_fd: int) -> None:
        self.pid = pid
        self._shm = shm
        self._wake_fd = wake_fd
        self._until = 0.0

    @classmethod
    def start(cls, confine: Callable[[], None] | None = None) -> KeepAwake | None:
        """Fork the companion; None (logged) if it cannot be."""
        shm = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED, anonymous: shared with the child
        shm[_PARKED] = 1
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            logger.warning("no polling: cannot make the companion's pipe: %s", e)
            return None
        server = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            logger.warning("no polling: cannot fork the companion: %s", e)
            return None
        if pid == 0:  # the child; tested through what it does
            code = 0
            try:
                _become_companion(r, confine)
            except BaseException as e:
                code = 1
                with contextlib.suppress(BaseException):
                    logger.warning("the polling companion cannot start (no polling): %s", e)
            else:
                with contextlib.suppress(BaseException):
                    _companion(shm, 0, server)
            os._exit(code)
        os.close(r)
        os.set_blocking(w, False)
        return cls(pid, shm, w)

    def until(self, deadline: float) -> None:
        """Keep a CPU awake until *deadline* (``time.monotonic``)."""
        if deadline == self._until or self._wake_fd < 0:
            return
        self._until = deadline
        _DEADLINE.pack_into(self._shm, 0, deadline)
        if self._shm[_PARKED]:
            try:
                os.write(self._wake_fd, b"\0")
            except BlockingIOError:
                pass  # wake-ups pending: it will look anyway
            except OSError as e:  # BrokenPipeError: it is gone
                logger.warning("the polling companion is gone (%s): no polling from here", e)
                self.close()

    def close(self) -> None:
        """End the companion (no window, then its pipe's end of file) and reap
        it if it ends within ``REAP_WAIT`` (else init will: a companion left
        spinning at SCHED_IDLE on a busy host may take a while to run)."""
        if self._wake_fd < 0:
            return
        _DEADLINE.pack_into(self._shm, 0, 0.0)
        os.close(self._wake_fd)
        self._wake_fd = -1
        end = time.monotonic() + REAP_WAIT
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0) and time.monotonic() < end:
                time.sleep(0.001)


def _become_companion(pipe: int, confine: Callable[[], None] | None) -> None:
    """In the fresh child: nothing held but *pipe* (as fd 0), then the jail."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    os.dup2(pipe, 0)  # dup2 clears O_CLOEXEC; nothing is executed anyway
    os.closerange(3, top)  # exports, sockets, the pipe's other end
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NICE, (_NICE_LIMIT, _NICE_LIMIT))
    if confine is not None:
        confine()
    # Then its output (an orphan must not keep a log's reader waiting) and
    # what the jail opened (its /proc/self/fd).
    os.closerange(1, top)


def _companion(shm: mmap.mmap, pipe: int, server: int) -> None:
    """Sleep until woken, spin at SCHED_IDLE until the deadline, again; until
    EOF on *pipe*, or until *server* is no longer the parent (it died while
    a window was open, however long)."""
    deadline = _DEADLINE.unpack_from
    now = time.monotonic
    param = os.sched_param(0)
    can_unidle = True
    while True:
        if not os.read(pipe, 64):
            return  # the server is gone
        shm[_PARKED] = 0
        os.sched_setscheduler(0, os.SCHED_IDLE, param)
        while True:
            spins = 0
            while now() < deadline(shm, 0)[0]:
                spins += 1
                if not spins & _LOOK_EVERY and os.getppid() != server:
                    return
            shm[_PARKED] = 1
            if now() >= deadline(shm, 0)[0]:
                break  # no window opened meanwhile: sleep
            shm[_PARKED] = 0
        if can_unidle:
            try:
                os.sched_setscheduler(0, os.SCHED_OTHER, param)
            except PermissionError:  # no RLIMIT_NICE of 20 (started unprivileged)
                can_unidle = False
