"""The control protocol: the daemon changes an instance's exports while it runs.

One JSON object per line, each answered by one line, ``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``. File descriptors travel as
SCM_RIGHTS with the command's bytes and are matched to the line they
arrived with; unclaimed ones are closed.

* ``{"op": "add_export", "name": NAME, "writable": BOOL}`` + one directory
  fd (opened by the daemon; we never see a path): a new root entry, at once;
* ``{"op": "remove_export", "name": NAME}``: unreachable at once (see tree.py);
* ``{"op": "list_exports"}``: ``{"ok": true, "exports": [NAME, ...]}``.

:class:`ControlConnection` is the byte-level state (lines and their fds);
:func:`command` acts on one line. Both are free of I/O.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

from .tree import ExportError, Tree

MAX_LINE = 1 << 16
MAX_FDS = 8


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
            raise ValueError(f"control line over {MAX_LINE} bytes")
        return lines

    def close(self) -> None:
        for _, group in self.pending:
            for fd in group:
                os.close(fd)
        self.pending = []


def command(tree: Tree, line: bytes, fds: list[int]) -> dict[str, Any]:
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
                return {"ok": False, "error": f"no export {name!r}"}
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}
    finally:
        for fd in fds:
            os.close(fd)


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
    """Client side (the daemon, tests): send one command, wait for its reply line."""
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
