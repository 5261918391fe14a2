"""A worker thread inside a network namespace, and taps opened from it.

Python 3.11 has no ``os.setns``, so :func:`setns` calls libc through ctypes.
A network namespace is per thread: the worker thread joins the namespace
once and stays in it, and everything that must happen in the namespace runs
there (opening ``/dev/net/tun``, netlink sockets). The event loop's thread
never changes namespace, so the VMMs it spawns stay in the host's.

The worker also keeps blocking work off the daemon's loop: the kernel runs a
netlink request inside the ``sendmsg`` of the caller (removing a bridge takes
~50 ms), and closing a tap's last descriptor unregisters the device. The
worker runs its own asyncio loop, so pyroute2's asyncio API works there
without pyroute2 forking a child per socket, as it does for ``netns=``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# Fail with EBUSY if a device of that name exists, instead of attaching to it.
IFF_TUN_EXCL = 0x8000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """The namespace does not exist or cannot be entered."""


def namespace_path(name: str) -> Path:
    """``ip netns`` name → its file; an absolute path (``/proc/PID/ns/net``) is kept."""
    if name.startswith("/"):
        return Path(name)
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"bad network namespace name {name!r}")
    return NETNS_DIR / name


def open_namespace(name: str) -> int:
    """Open a network namespace by ``ip netns`` name or path. Raises NetnsError."""
    path = namespace_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(
            f"network namespace {name!r} does not exist ({path}); create it first "
            f"(ip netns add {name})"
        ) from None
    except OSError as e:
        raise NetnsError(f"cannot open network namespace {name!r}: {e.strerror}") from None
    return fd


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd``. Raises OSError."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tap(name: str) -> int:
    """Create the tap ``name`` in the caller's namespace; return its fd (O_CLOEXEC).

    The tap is not persistent: it goes away with the last descriptor. Raises
    OSError: EBUSY if an interface of that name exists (IFF_TUN_EXCL).
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


class NetnsThread:
    """A thread with its own event loop, in a network namespace (or the daemon's).

    ``await worker.run(fn)`` runs the coroutine ``fn()`` on the worker's loop
    and returns its result on the caller's loop. Calls run one at a time in
    the order they were made only as far as their own awaits allow: callers
    serialize what must not interleave.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread and enter the namespace. Raises NetnsError."""
        nsfd = open_namespace(self.netns) if self.netns is not None else None
        ready: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(nsfd, ready), name="spectrumd-netns", daemon=True
        )
        self._thread.start()
        try:
            self._loop = ready.result(timeout=10)
        except OSError as e:
            self._thread.join()
            if e.errno == errno.EINVAL:
                raise NetnsError(f"{self.netns} is not a network namespace") from None
            raise NetnsError(f"cannot enter network namespace {self.netns}: {e}") from None

    @staticmethod
    def _main(
        nsfd: int | None, ready: concurrent.futures.Future[asyncio.AbstractEventLoop]
    ) -> None:
        try:
            if nsfd is not None:
                setns(nsfd)
        except OSError as e:
            ready.set_exception(e)
            return
        finally:
            if nsfd is not None:
                os.close(nsfd)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        ready.set_result(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` in the worker; raises what it raises, or NetnsError if stopped."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise NetnsError("the network worker is not running")

        async def call() -> T:
            return await fn()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop))

    def stop(self) -> None:
        """End the worker's loop and wait for the thread (work in flight is abandoned)."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
