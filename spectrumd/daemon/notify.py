"""sd_notify and the watchdog in a few lines of pure Python (no libsystemd needed)."""

import asyncio
import os
import socket
from collections.abc import Sequence

LISTEN_FDS_START = 3


def sd_notify(*fields: str, fds: Sequence[int] = ()) -> bool:
    """Send ``KEY=VALUE`` fields (and descriptors) to $NOTIFY_SOCKET.

    False when not run by systemd, or when the message could not be sent.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            data = "\n".join(fields).encode()
            if fds:
                socket.send_fds(s, [data], list(fds))
            else:
                s.sendall(data)
        except OSError:
            return False
    return True


class FdStore:
    """Descriptors the service manager keeps across restarts of the daemon.

    systemd's file descriptor store (``FileDescriptorStoreMax=`` in the unit):
    ``FDSTORE=1`` with ``FDNAME=`` hands it a descriptor, and the next daemon
    of the unit gets every stored one back through ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` (sd_listen_fds_with_names(3)). systemd drops a stored
    socket by itself once its peer hangs up. Without systemd the store is
    inert: :attr:`active` is False and nothing is kept.
    """

    def __init__(self, inherited: dict[str, list[int]], active: bool) -> None:
        self._inherited = inherited
        self.active = active

    @classmethod
    def from_environment(cls) -> "FdStore":
        """The descriptors this process was started with; clears LISTEN_* from the environment."""
        inherited: dict[str, list[int]] = {}
        pid = os.environ.pop("LISTEN_PID", "")
        count = os.environ.pop("LISTEN_FDS", "")
        names = os.environ.pop("LISTEN_FDNAMES", "")
        if pid == str(os.getpid()) and count.isdigit():
            labels = names.split(":") if names else []
            for i in range(int(count)):
                fd = LISTEN_FDS_START + i
                os.set_inheritable(fd, False)
                label = labels[i] if i < len(labels) else "unknown"
                inherited.setdefault(label, []).append(fd)
        return cls(inherited, active=bool(os.environ.get("NOTIFY_SOCKET")))

    def keep(self, name: str, fd: int) -> bool:
        """Hand a copy of ``fd`` to the service manager under ``name``."""
        return self.active and sd_notify("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def forget(self, name: str) -> None:
        """Drop what is kept under ``name``."""
        if self.active:
            sd_notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def take(self, name: str) -> int | None:
        """The descriptor kept under ``name`` by an earlier daemon (now the caller's)."""
        fds = self._inherited.get(name)
        if not fds:
            return None
        fd = fds.pop(0)
        if not fds:
            del self._inherited[name]
        return fd

    def close_unclaimed(self) -> list[str]:
        """Close and forget what nobody took (their VMMs are gone); return the names."""
        names = sorted(self._inherited)
        for name, fds in self._inherited.items():
            for fd in fds:
                os.close(fd)
            self.forget(name)
        self._inherited.clear()
        return names


def start_watchdog() -> "asyncio.Task[None] | None":
    """Send WATCHDOG=1 from the event loop at half of $WATCHDOG_USEC (None if not asked).

    It runs on the loop on purpose: a loop that hangs stops the pings, and
    systemd restarts the daemon, which then re-adopts its VMMs.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    interval = int(usec) / 2e6

    async def ping() -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.ensure_future(ping())
