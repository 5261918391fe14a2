"""The control protocol: the daemon tells the file server what to serve.

One JSON object per line, each answered by one line, ``{"ok": true}`` or
``{"ok": false, "error": "..."}``. File descriptors travel as SCM_RIGHTS
with the command's bytes:

* ``{"op": "serve", "instance": NAME}`` + one fd, a connected stream
  socket carrying the instance's 9P stream (from the VMM's port);
* ``{"op": "set_exports", "instance": NAME, "exports": {EXPORT:
  {"path": ABS, "writable": BOOL}}}`` replaces the instance's exports,
  at once for its live connections, all or nothing;
* ``{"op": "drop", "instance": NAME}`` closes its connections and forgets
  its exports (the daemon's teardown of an instance).

A client sends one command and waits for its reply; fds are matched to
the line whose bytes they arrived with, and unclaimed fds are closed.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from .driver import serve_connection
from .exports import ExportError, ExportTable, validate_exports
from .session import DEFAULT_MAX_MSIZE, Session

logger = logging.getLogger(__name__)

MAX_LINE = 1 << 20
_MAX_FDS = 16


class CommandError(Exception):
    """A control command was refused; the message goes back to the daemon."""


@dataclass(eq=False)
class _Instance:
    name: str
    table: ExportTable = field(default_factory=ExportTable)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def recv_with_fds(sock: socket.socket, size: int = 65536) -> tuple[bytes, list[int]]:
    """Receive bytes and any SCM_RIGHTS fds (close-on-exec) from *sock*."""
    fds = array.array("i")
    while True:
        try:
            data, ancdata, _flags, _ = sock.recvmsg(
                size, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
            )
            break
        except BlockingIOError:
            await _wait_readable(sock)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _instance_name(untrusted: object) -> str:
    if not isinstance(untrusted, str) or not 0 < len(untrusted) <= 255 or "\0" in untrusted:
        raise CommandError("instance must be a non-empty string of at most 255 characters")
    return untrusted


class ControlServer:
    """Instances, their exports and their 9P connections."""

    def __init__(self, *, max_msize: int = DEFAULT_MAX_MSIZE) -> None:
        self.max_msize = max_msize
        self.instances: dict[str, _Instance] = {}

    def _instance(self, name: str) -> _Instance:
        inst = self.instances.get(name)
        if inst is None:
            inst = self.instances[name] = _Instance(name)
        return inst

    async def run_client(self, sock: socket.socket) -> None:
        """Answer commands on one control connection until it closes."""
        sock.setblocking(False)
        buf = bytearray()
        # (stream position of the chunk they came with, fds)
        pending: list[tuple[int, list[int]]] = []
        consumed = 0  # stream position of buf[0]
        try:
            while True:
                data, fds = await recv_with_fds(sock)
                if fds:
                    pending.append((consumed + len(buf), fds))
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line, end = bytes(buf[:nl]), consumed + nl + 1
                    del buf[: nl + 1]
                    consumed = end
                    mine = [fd for pos, group in pending if pos < end for fd in group]
                    pending = [(pos, group) for pos, group in pending if pos >= end]
                    reply = await self._command(line, mine)
                    await asyncio.get_running_loop().sock_sendall(
                        sock, json.dumps(reply).encode() + b"\n"
                    )
                if len(buf) > MAX_LINE:
                    logger.warning("control: command line over %d bytes; closing", MAX_LINE)
                    return
        except (ConnectionError, OSError) as e:
            logger.info("control connection lost: %s", e)
        finally:
            for _, group in pending:
                for fd in group:
                    os.close(fd)
            sock.close()

    async def _command(self, line: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            try:
                untrusted = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise CommandError("command is not valid JSON") from None
            if not isinstance(untrusted, dict):
                raise CommandError("command must be a JSON object")
            op = untrusted.get("op")
            if op == "serve":
                if len(fds) != 1:
                    raise CommandError(f"serve needs exactly one fd, got {len(fds)}")
                self.serve(_instance_name(untrusted.get("instance")), fds.pop())
            elif op == "set_exports":
                name = _instance_name(untrusted.get("instance"))
                try:
                    self._instance(name).table.replace(validate_exports(untrusted.get("exports")))
                except ExportError as e:
                    raise CommandError(str(e)) from None
            elif op == "drop":
                await self.drop(_instance_name(untrusted.get("instance")))
            else:
                raise CommandError(f"unknown op {op!r}")
        except CommandError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:
            logger.error("control command failed: %s", e)
            logger.debug("traceback", exc_info=True)
            return {"ok": False, "error": f"internal error: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        return {"ok": True}

    def serve(self, instance: str, fd: int) -> None:
        """Start serving 9P on *fd* (ownership passes here); raises CommandError."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise CommandError(f"serve: fd is not a socket: {e.strerror}") from None
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise CommandError("serve: fd is not a stream socket")
        sock.setblocking(False)
        inst = self._instance(instance)
        task = asyncio.get_running_loop().create_task(
            self._serve(inst, sock), name=f"9p-{instance}"
        )
        inst.tasks.add(task)
        task.add_done_callback(inst.tasks.discard)

    async def _serve(self, inst: _Instance, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        except OSError as e:
            logger.warning("instance %s: cannot use its 9P socket: %s", inst.name, e)
            sock.close()
            return
        logger.info("instance %s: 9P connection started", inst.name)
        session = Session(inst.table, max_msize=self.max_msize)
        await serve_connection(reader, writer, session, name=f"9p-{inst.name}")
        logger.info("instance %s: 9P connection ended", inst.name)

    async def drop(self, instance: str) -> None:
        """Close the instance's connections and revoke its exports."""
        inst = self.instances.pop(instance, None)
        if inst is None:
            return
        tasks = list(inst.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        inst.table.clear()

    async def close(self) -> None:
        for name in list(self.instances):
            await self.drop(name)
