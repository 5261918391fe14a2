"""Build FUSE requests as the kernel does, and a client that talks to the ops layer."""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

from spectrumd.virtiofs import protocol as P
from spectrumd.virtiofs.ops import FileSystem
from spectrumd.virtiofs.serve import answer
from spectrumd.virtiofs.tree import Tree


def request(opcode: int, nodeid: int, body: bytes = b"", unique: int = 7) -> bytes:
    return P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, unique, nodeid,
                            1000, 1000, 42, 0, 0) + body  # fmt: skip


def name(n: bytes) -> bytes:
    return n + b"\0"


def init_body(flags: int = P.MAX_PAGES | P.EXPORT_SUPPORT | P.DO_READDIRPLUS) -> bytes:
    return struct.pack("<IIII", 7, 38, 1 << 17, flags) + bytes(48)


def setattr_body(valid: int, *, mode: int = 0, size: int = 0, uid: int = 0, gid: int = 0,
                 fh: int = 0) -> bytes:  # fmt: skip
    return struct.pack("<IIQQQQQQIIIIIIII", valid, 0, fh, size, 0, 0, 0, 0, 0, 0, 0,
                       mode, 0, uid, gid, 0)  # fmt: skip


def read_body(fh: int, offset: int, size: int) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


class FuseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(f"{errno.errorcode.get(err, err)}")
        self.errno = err


class Client:
    """Requests in, parsed replies out, straight through ``serve.answer``."""

    def __init__(self, tree: Tree | None = None, entry_timeout: float = 1.0) -> None:
        self.fs = FileSystem(tree, entry_timeout)
        self.tree = self.fs.tree
        self.unique = 0

    def raw(self, data: bytes, payload: list[Any] | None = None, read_size: int = 1 << 20
            ) -> tuple[int, bytes]:  # fmt: skip
        """(error, body) of one request; body includes READ data."""
        out = bytearray(read_size)
        reply = answer(self.fs, data, payload or [], [memoryview(out)])
        if reply is None:
            return (0, b"")
        length, neg, _unique = P.OUT_HEADER.unpack(reply.header())
        assert length == P.OUT_HEADER.size + len(reply.body) + reply.data_len
        return (-neg, reply.body if reply.body else bytes(out[: reply.data_len]))

    def call(self, opcode: int, nodeid: int, body: bytes = b"", **kw: Any) -> bytes:
        self.unique += 1
        err, out = self.raw(request(opcode, nodeid, body, self.unique), **kw)
        if err:
            raise FuseError(err)
        return out

    def init(self) -> int:
        out = self.call(P.INIT, 0, init_body())
        return struct.unpack_from("<IIII", out)[3]

    def lookup(self, parent: int, n: bytes) -> tuple[int, Any]:
        out = self.call(P.LOOKUP, parent, name(n))
        return struct.unpack_from("<Q", out)[0], P.ATTR.unpack_from(out, P.ENTRY_HEAD.size)

    def open(self, nodeid: int, flags: int = os.O_RDONLY, op: int = P.OPEN) -> int:
        return struct.unpack_from("<Q", self.call(op, nodeid, struct.pack("<II", flags, 0)))[0]

    def create(self, parent: int, n: bytes, mode: int = 0o644, flags: int = os.O_RDWR
               ) -> tuple[int, int]:  # fmt: skip
        out = self.call(P.CREATE, parent, struct.pack("<IIII", flags, mode, 0, 0) + name(n))
        size = P.ENTRY_HEAD.size + P.ATTR.size
        return struct.unpack_from("<Q", out)[0], struct.unpack_from("<Q", out, size)[0]

    def mkdir(self, parent: int, n: bytes, mode: int = 0o755) -> int:
        return struct.unpack_from("<Q", self.call(P.MKDIR, parent, struct.pack("<II", mode, 0)
                                                  + name(n)))[0]  # fmt: skip

    def read(self, fh: int, offset: int, size: int, op: int = P.READ) -> bytes:
        return self.call(op, 0, read_body(fh, offset, size))

    def write(self, fh: int, offset: int, data: bytes) -> int:
        head = request(P.WRITE, 0, struct.pack("<QQIIQII", fh, offset, len(data), 0, 0, 0, 0))
        self.unique += 1
        err, out = self.raw(head, [memoryview(data)])
        if err:
            raise FuseError(err)
        return int(struct.unpack_from("<I", out)[0])

    def readdir(self, fh: int, op: int = P.READDIR) -> list[bytes]:
        out = self.read(fh, 0, 65536, op)
        names, pos = [], 0
        while pos < len(out):
            if op == P.READDIRPLUS:
                pos += P.ENTRY_HEAD.size + P.ATTR.size
            _ino, _off, namelen, _t = P.DIRENT.unpack_from(out, pos)
            names.append(out[pos + 24 : pos + 24 + namelen])
            pos += (24 + namelen + 7) & ~7
        return names

    def rename(self, parent: int, old: bytes, newdir: int, new: bytes, flags: int = 0) -> None:
        self.call(P.RENAME2, parent, struct.pack("<QII", newdir, flags, 0) + name(old) + name(new))

    def release(self, fh: int, op: int = P.RELEASE) -> None:
        self.call(op, 0, struct.pack("<QIIQ", fh, 0, 0, 0))
