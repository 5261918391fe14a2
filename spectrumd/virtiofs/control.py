"""The control protocol: the daemon changes an instance's exports while it runs.

One JSON object per line, each answered by one line, ``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``. File descriptors travel as
SCM_RIGHTS with the command's bytes and are matched to the line they
arrived with; unclaimed ones are closed.

* ``{"op": "add_export", "name": NAME, "writable": BOOL}`` + one directory
  fd (opened by the daemon; we never see a path): a new root entry, at once.
  A confined server (``--confine``) takes only the root of a detached mount,
  read-only at the mount for a read-only export: the daemon passes
  ``jail.detach(fd, writable)``, not the directory fd itself (tree.py says
  why);
* ``{"op": "remove_export", "name": NAME}``: unreachable at once (see tree.py);
  the reply's ``settle`` is how many seconds the guest may still show
  attributes it holds of it (the attribute timeout, ops.py), which the
  daemon waits out before it calls the revocation done. A name not served
  is removed already (settle 0). The daemon ends a server that does not
  confirm a removal: revocation wins;
* ``{"op": "list_exports"}``: ``{"ok": true, "exports": [NAME, ...]}``.

:class:`ControlConnection` is the byte-level state (lines and their fds);
:func:`command` acts on one line. Both are free of I/O. :class:`ControlServer`
is their thin driver inside the server's poll loop: a listening socket the
daemon connects to again after its own restart, or one connected socket.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import socket
from typing import Any

from .tree import ExportError, Tree

MAX_LINE = 1 << 16
MAX_FDS = 8
# A reply the daemon does not take within this long drops the connection
# (the server goes on; the daemon connects again).
SEND_TIMEOUT = 5.0

logger = logging.getLogger(__name__)


class ControlConnection:
    """Splits a byte stream into lines, each with the fds that came with it."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pending: list[tuple[int, list[int]]] = []  # (stream position, fds)
        self.consumed = 0

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[bytes, list[int]]]:
        if fds:
            self.pending.append((self.consumed + len(self.buf), fds))
        self.buf += data
        lines = []
        while (nl := self.buf.find(b"\n")) >= 0:
            line, end = bytes(self.buf[:nl]), self.consumed + nl + 1
            del self.buf[: nl + 1]
            self.consumed = end
            mine = [fd for pos, group in self.pending if pos < end for fd in group]
            self.pending = [(pos, group) for pos, group in self.pending if pos >= end]
            lines.append((line, mine))
        if len(self.buf) > MAX_LINE:
            for _, mine in lines:
                for fd in mine:
                    os.close(fd)
            raise ValueError(f"control line over {MAX_LINE} bytes")
        return lines

    def close(self) -> None:
        for _, group in self.pending:
            for fd in group:
                os.close(fd)
        self.pending = []


def command(tree: Tree, line: bytes, fds: list[int], settle: float = 0.0) -> dict[str, Any]:
    """Act on one command line; every fd in *fds* is consumed."""
    try:
        try:
            untrusted = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "command is not valid JSON"}
        if not isinstance(untrusted, dict):
            return {"ok": False, "error": "command must be a JSON object"}
        op = untrusted.get("op")
        if op == "list_exports":
            return {"ok": True, "exports": tree.export_names()}
        name = untrusted.get("name")
        if not isinstance(name, str):
            return {"ok": False, "error": f"{op}: name must be a string"}
        if op == "add_export":
            writable = untrusted.get("writable", False)
            if not isinstance(writable, bool):
                return {"ok": False, "error": "add_export: writable must be true or false"}
            if len(fds) != 1:
                return {"ok": False, "error": f"add_export needs exactly one fd, got {len(fds)}"}
            try:
                tree.add_export(name, fds.pop(), writable)
            except ExportError as e:
                return {"ok": False, "error": str(e)}
            except OSError as e:  # e.g. out of fds: refused, the server goes on
                return {"ok": False, "error": f"add_export {name!r}: {e.strerror}"}
            return {"ok": True}
        if op == "remove_export":
            if not tree.remove_export(name):
                return {"ok": True, "settle": 0.0}  # not served: nothing to undo or wait for
            return {"ok": True, "settle": settle}
        return {"ok": False, "error": f"unknown op {op!r}"}
    finally:
        for fd in fds:
            os.close(fd)


class ControlServer:
    """The control socket of one server's poll loop; registers its fds with *poller*.

    With *listener* (``--control-listen-fd``) a connection is accepted
    whenever the daemon makes one: a new one replaces the one open (the
    daemon restarted and holds the old one no more), and after EOF the next
    is accepted. With *conn* alone (``--control-fd``) that connection is
    served until EOF. Whatever goes wrong on a connection (EOF, a reply not
    taken, a line too long) ends that connection, never the server: the
    guest is served throughout.
    """

    def __init__(
        self,
        tree: Tree,
        poller: select.poll | select.epoll,
        *,
        listener: socket.socket | None = None,
        conn: socket.socket | None = None,
        settle: float = 0.0,
    ) -> None:
        self.tree = tree
        self.settle = settle
        self.poller = poller
        self.listener = listener
        self.conn: socket.socket | None = None
        self.state = ControlConnection()
        if listener is not None:
            # Poll said readable, but the client may be gone by the accept.
            listener.setblocking(False)
            poller.register(listener.fileno(), select.POLLIN)
        if conn is not None:
            self._take(conn)

    def handle(self, fd: int) -> None:
        """Serve *fd*, which poll reported ready, if it is one of ours."""
        if self.listener is not None and fd == self.listener.fileno():
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            if self.conn is not None:
                logger.info("a new control connection replaces the open one")
            self._drop()
            self._take(conn)
            return
        if self.conn is None or fd != self.conn.fileno():
            return
        try:
            data, fds = recv_with_fds(self.conn)
            if not data:
                for extra in fds:
                    os.close(extra)
                self._drop()
                return
            lines = self.state.feed(data, fds)
            replies = (command(self.tree, text, passed, self.settle) for text, passed in lines)
            self.conn.sendall(b"".join(map(_json_line, replies)))
        except (OSError, ValueError) as e:
            logger.warning("control connection dropped: %s", e)
            self._drop()

    def _take(self, conn: socket.socket) -> None:
        conn.settimeout(SEND_TIMEOUT)
        self.conn = conn
        self.state = ControlConnection()
        self.poller.register(conn.fileno(), select.POLLIN)

    def _drop(self) -> None:
        if self.conn is not None:
            self.poller.unregister(self.conn.fileno())
            self.conn.close()
            self.conn = None
        self.state.close()

    def close(self) -> None:
        self._drop()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _json_line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def recv_with_fds(sock: socket.socket, size: int = 65536) -> tuple[bytes, list[int]]:
    """One recvmsg: bytes and any SCM_RIGHTS fds (close-on-exec)."""
    fds = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def send_command(sock: socket.socket, cmd: dict[str, Any], fds: tuple[int, ...] = ()) -> Any:
    """A blocking client (tests; the daemon has client.py): send one command, wait for
    its reply line."""
    data = json.dumps(cmd).encode() + b"\n"
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("virtiofs control connection closed")
        buf += chunk
    return json.loads(buf)
