"""The daemon's side of the file server's control socket.

Usage::

    client = FileServerClient()
    await client.connect("/run/spectrumd/fileserver.sock")
    await client.set_exports("work-shell", {"docs": ("/srv/docs", False)})
    await client.serve("work-shell", vmm_port_socket)  # then close your copy
    ...
    await client.drop("work-shell")
    client.close()

Commands are sent one at a time (a lock orders concurrent callers): the
server matches passed fds to the command they came with.
"""

from __future__ import annotations

import array
import asyncio
import errno
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

_RETRY_ERRNOS = (errno.ENOENT, errno.ECONNREFUSED)


async def _wait_writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_writer(sock.fileno())


class FileServerError(Exception):
    """The file server refused a command, or the control connection failed."""


ExportValue = tuple[str, bool] | Mapping[str, Any]


class FileServerClient:
    def __init__(self, *, timeout: float = 30.0) -> None:
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._lock = asyncio.Lock()
        self.timeout = timeout

    async def connect(self, path: str, *, timeout: float = 10.0) -> None:
        """Connect to the server's control socket, waiting up to *timeout*
        seconds for a just-started server to bind it.

        Raises FileServerError.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, path)
            except OSError as e:
                sock.close()
                if e.errno not in _RETRY_ERRNOS or time.monotonic() > deadline:
                    raise FileServerError(f"cannot connect to file server at {path}: {e}") from e
                await asyncio.sleep(0.05)
                continue
            self._sock = sock
            return

    def attach(self, sock: socket.socket) -> None:
        """Use an already-connected control socket (e.g. from a socketpair)."""
        sock.setblocking(False)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def serve(self, instance: str, conn: socket.socket | int) -> None:
        """Hand the instance's 9P stream socket to the server.

        The server gets its own copy of the fd; the caller still owns (and
        should close) *conn*. Raises FileServerError.
        """
        fd = conn if isinstance(conn, int) else conn.fileno()
        await self._call({"op": "serve", "instance": instance}, [fd])

    async def set_exports(self, instance: str, exports: Mapping[str, ExportValue]) -> None:
        """Replace the instance's exports: ``{name: (path, writable)}`` or
        ``{name: {"path": ..., "writable": ...}}``. Live connections see the
        change at once. Raises FileServerError naming a bad export.
        """
        body: dict[str, Any] = {}
        for name, value in exports.items():
            if isinstance(value, tuple):
                body[name] = {"path": value[0], "writable": value[1]}
            else:
                body[name] = dict(value)
        await self._call({"op": "set_exports", "instance": instance, "exports": body})

    async def drop(self, instance: str) -> None:
        """Close the instance's connections and forget its exports.

        Raises FileServerError.
        """
        await self._call({"op": "drop", "instance": instance})

    async def _call(self, command: dict[str, Any], fds: Sequence[int] = ()) -> None:
        # A command and its reply are one exchange that a cancelled caller (a
        # Kill during a start) must not cut in two: the next command would read
        # this one's reply. It runs on, shielded, with copies of the fds (the
        # caller may close its own as it unwinds).
        copies = [os.dup(fd) for fd in fds]
        exchange = asyncio.ensure_future(self._exchange(command, copies))
        line = await asyncio.shield(exchange)
        try:
            reply = json.loads(line)
        except ValueError:
            raise FileServerError(f"garbled reply from file server: {line[:200]!r}") from None
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise FileServerError(f"{command['op']}: {error or 'refused'}")

    async def _exchange(self, command: dict[str, Any], fds: list[int]) -> bytes:
        try:
            async with self._lock:
                sock = self._sock
                if sock is None:
                    raise FileServerError("not connected to the file server")
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._send(sock, json.dumps(command).encode() + b"\n", fds)
                        return await self._readline(sock)
                except (OSError, TimeoutError) as e:
                    # The stream may hold half a command or a late reply now.
                    self.close()
                    raise FileServerError(f"file server control connection failed: {e!r}") from e
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    async def _send(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                sent = sock.sendmsg([data], anc)
                break
            except BlockingIOError:
                await _wait_writable(sock)
        if sent < len(data):
            # The fds went with the first bytes; the rest is plain data.
            await loop.sock_sendall(sock, data[sent:])

    async def _readline(self, sock: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        while (nl := self._buf.find(b"\n")) < 0:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionResetError("file server closed the control connection")
            self._buf += chunk
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        return line
