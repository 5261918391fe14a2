"""A byte relay between a VMM that connects and a daemon side that connects.

QEMU listens on its chardev sockets and the supervisor connects to them.
crosvm does the opposite: ``--serial type=unix-stream`` makes crosvm
*connect* to the path, once, at startup (``UnixStream::connect`` in
crosvm's devices/src/sys/linux/serial_device.rs; no retry), so something
must already listen there when crosvm is exec'd.

:class:`SerialRelay` listens on the VMM-facing path before the spawn and, once
the VMM runs, also on the path the supervisor connects to (the same path
QEMU would listen on), and copies bytes both ways. A supervisor connection
that ends (a file-server restart) leaves the VMM's connection open; the next
one picks it up. When the VMM's side ends, the supervisor's connection is
closed, as it would be when QEMU exits.

crosvm never connects again, so its connection must outlive the daemon for a
restarted daemon to re-adopt the VMM: with a :class:`Keeper` (systemd's file
descriptor store), the accepted connection is handed to the service manager
under a name, and the next daemon builds the relay from the kept descriptor
(:meth:`SerialRelay.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Protocol

_CHUNK = 64 * 1024


class Keeper(Protocol):
    """Where connections are kept across a restart of the daemon (systemd's fd store)."""

    def keep(self, name: str, fd: int) -> bool: ...

    def forget(self, name: str) -> None: ...

    def take(self, name: str) -> int | None: ...


def listen_unix(path: Path) -> socket.socket:
    """A non-blocking, close-on-exec listening unix stream socket at ``path``. Raises OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(os.fspath(path))
        sock.listen(4)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_for(path: Path, owner: int | None) -> socket.socket:
    """A listening socket at ``path`` that uid ``owner`` (== its gid) may connect to.

    ``path`` is in a directory the VMM owns: nothing is done by path there. The
    socket is bound in the parent directory (root's own), given to ``owner``
    there, and renamed into place; rename replaces whatever the VMM may have
    put under that name without following it. Raises OSError.
    """
    if owner is None:
        return listen_unix(path)
    staging = path.parent.parent / f".{path.name}.{os.getpid()}.tmp"
    sock = listen_unix(staging)
    try:
        os.chown(staging, owner, owner)
        os.chmod(staging, 0o600)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    return sock


class SerialRelay:
    """One serial device: VMM connection ⇄ successive supervisor connections."""

    def __init__(
        self,
        vmm_path: Path,
        host_path: Path,
        keeper: Keeper | None = None,
        kept_as: str = "",
        _connected: socket.socket | None = None,
        owner: int | None = None,
    ) -> None:
        self.vmm_path = vmm_path
        self.host_path = host_path
        self._keeper = keeper
        self._kept_as = kept_as
        self._vmm = _connected
        # Bound now, before the VMM is spawned: the kernel queues its connect
        # in the backlog until we accept.
        self._vmm_listener = None
        if _connected is None:
            self._vmm_listener = listen_for(vmm_path, owner)
        self._host_listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.vmm_connected = asyncio.Event()
        if _connected is not None:
            self.vmm_connected.set()

    @classmethod
    def adopt(cls, vmm_path: Path, host_path: Path, keeper: Keeper, kept_as: str) -> SerialRelay:
        """The relay of a running VMM from its connection kept as ``kept_as``. Raises OSError."""
        fd = keeper.take(kept_as)
        if fd is None:
            raise OSError(f"no connection of the VMM was kept as {kept_as}")
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return cls(vmm_path, host_path, keeper, kept_as, _connected=sock)

    def start(self) -> None:
        """Listen for the supervisor and start relaying (needs a running loop). Raises OSError."""
        self._host_listener = listen_unix(self.host_path)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._host_listener is not None
        if self._vmm is None:
            assert self._vmm_listener is not None
            self._vmm, _ = await loop.sock_accept(self._vmm_listener)
            self._vmm_listener.close()
            self._vmm_listener = None
            if self._keeper is not None:
                self._keeper.keep(self._kept_as, self._vmm.fileno())
            self.vmm_connected.set()
        vmm = self._vmm
        try:
            while True:
                host, _ = await loop.sock_accept(self._host_listener)
                try:
                    if await self._pump(vmm, host):
                        break
                finally:
                    host.close()
            if self._keeper is not None:  # the VMM's side ended: nothing to keep
                self._keeper.forget(self._kept_as)
        finally:
            vmm.close()
            self._host_listener.close()

    async def _pump(self, vmm: socket.socket, host: socket.socket) -> bool:
        """Relay until one side ends; True if it was the VMM's side."""
        from_vmm = asyncio.ensure_future(_copy(vmm, host))
        from_host = asyncio.ensure_future(_copy(host, vmm))
        try:
            done, _ = await asyncio.wait({from_vmm, from_host}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (from_vmm, from_host):
                t.cancel()
            for t in (from_vmm, from_host):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t
        return from_vmm in done

    def close(self) -> None:
        """Close the daemon's side (a kept connection stays with the service manager)."""
        if self._task is not None:
            self._task.cancel()
        elif self._vmm is not None:  # adopted, never started
            self._vmm.close()
        for sock in (self._vmm_listener, self._host_listener):
            if sock is not None:
                sock.close()
        self._vmm_listener = None


async def _copy(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(src, _CHUNK):
            await loop.sock_sendall(dst, data)
    except OSError:
        pass
