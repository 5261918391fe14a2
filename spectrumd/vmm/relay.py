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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

_CHUNK = 64 * 1024


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


class SerialRelay:
    """One serial device: VMM connection ⇄ successive supervisor connections."""

    def __init__(self, vmm_path: Path, host_path: Path) -> None:
        self.vmm_path = vmm_path
        self.host_path = host_path
        # Bound now, before the VMM is spawned: the kernel queues its connect
        # in the backlog until we accept.
        self._vmm_listener: socket.socket | None = listen_unix(vmm_path)
        self._host_listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.vmm_connected = asyncio.Event()

    def start(self) -> None:
        """Listen for the supervisor and start relaying (needs a running loop). Raises OSError."""
        self._host_listener = listen_unix(self.host_path)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._vmm_listener is not None and self._host_listener is not None
        vmm, _ = await loop.sock_accept(self._vmm_listener)
        self._vmm_listener.close()
        self._vmm_listener = None
        self.vmm_connected.set()
        try:
            while True:
                host, _ = await loop.sock_accept(self._host_listener)
                try:
                    if await self._pump(vmm, host):
                        return
                finally:
                    host.close()
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
        if self._task is not None:
            self._task.cancel()
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
