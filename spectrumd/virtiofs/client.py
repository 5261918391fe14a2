"""The daemon's side of a backend's control socket (the protocol is in control.py).

Usage::

    client = ControlClient(timeout=10)
    await client.connect(run_dir / "fs-control.sock")
    await client.add_export("docs", dir_fd, writable=False)
    settle = await client.remove_export("docs")  # then wait that long: see control.py
    names = await client.list_exports()
    client.close()

Commands go one at a time (a lock orders concurrent callers): the backend
matches passed fds to the command line they came with.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spectrumd.aio import held


class ControlError(Exception):
    """The backend refused a command, or the control connection failed."""


# The most a backend may ask the daemon to wait after a removal (its own
# attribute timeout is 0.2 s by default): a wrong answer cannot stall a caller.
MAX_SETTLE = 5.0


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


class ControlClient:
    def __init__(self, *, timeout: float) -> None:
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._lock = asyncio.Lock()
        self.timeout = timeout

    async def connect(self, path: Path) -> None:
        """Connect to the backend's listening control socket. Raises ControlError."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.get_running_loop().sock_connect(sock, str(path))
        except (OSError, TimeoutError) as e:
            sock.close()
            raise ControlError(f"cannot connect to the file server at {path}: {e!r}") from None
        self.close()
        self._sock = sock
        self._buf.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def add_export(self, name: str, fd: int, writable: bool) -> None:
        """A new root entry ``name`` for the directory ``fd`` (the caller keeps its fd)."""
        await self._call({"op": "add_export", "name": name, "writable": writable}, [fd])

    async def remove_export(self, name: str) -> float:
        """Remove ``name`` at once; returns how long the guest may still show
        attributes it holds of it (at most MAX_SETTLE seconds)."""
        reply = await self._call({"op": "remove_export", "name": name})
        settle = reply.get("settle", 0.0)
        if isinstance(settle, bool) or not isinstance(settle, int | float) or not settle >= 0:
            raise ControlError(f"remove_export: a settle that is not a duration: {settle!r:.100}")
        return min(float(settle), MAX_SETTLE)

    async def list_exports(self) -> list[str]:
        reply = await self._call({"op": "list_exports"})
        names = reply.get("exports")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ControlError(f"list_exports: a reply that is not a list of names: {reply!r:.200}")
        return names

    async def _call(self, command: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        """Raises ControlError naming the refusal or the failure."""
        # A command and its reply are one exchange that a cancelled caller (a
        # Kill during a start) must not cut in two: the next command would read
        # this one's reply. It runs on, shielded, with copies of the fds (the
        # caller may close its own as it unwinds).
        copies = [os.dup(fd) for fd in fds]
        line = await asyncio.shield(held(self._exchange(command, copies)))
        try:
            reply = json.loads(line)
        except ValueError:
            raise ControlError(f"garbled reply from the file server: {line[:200]!r}") from None
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise ControlError(f"{command['op']}: {error or 'refused'}")
        return reply

    async def _exchange(self, command: dict[str, Any], fds: list[int]) -> bytes:
        try:
            async with self._lock:
                sock = self._sock
                if sock is None:
                    raise ControlError("not connected to the file server")
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._send(sock, json.dumps(command).encode() + b"\n", fds)
                        return await self._readline(sock)
                except (OSError, TimeoutError) as e:
                    # The stream may hold half a command or a late reply now.
                    self.close()
                    raise ControlError(f"file server control connection failed: {e!r}") from e
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
            if len(self._buf) > 1 << 20:
                raise ConnectionError("an over-long reply line from the file server")
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionResetError("the file server closed the control connection")
            self._buf += chunk
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        return line
