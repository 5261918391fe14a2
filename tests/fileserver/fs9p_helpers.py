"""Test-side 9P clients built on the codec: one over a Session, one over a socket."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from spectrumd.fileserver.codec import Decoder, encode
from spectrumd.fileserver.exports import ExportSpec, ExportTable
from spectrumd.fileserver.messages import (
    NOFID,
    Message,
    Rlerror,
    Tattach,
    Tclunk,
    Tgetattr,
    Tlcreate,
    Tlopen,
    Tread,
    Treaddir,
    Tversion,
    Twalk,
    Twrite,
)
from spectrumd.fileserver.session import Session

O_RDONLY, O_WRONLY, O_RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR


class NinePError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.errno = code


def make_table(**exports: tuple[str, bool]) -> ExportTable:
    table = ExportTable()
    table.replace({n: ExportSpec(str(p), w) for n, (p, w) in exports.items()})
    return table


class _Calls:
    """Convenience calls shared by both clients; ``rpc`` does the transport."""

    _tag = 0

    def _next_tag(self) -> int:
        self._tag = (self._tag + 1) % 0xFFFF
        return self._tag

    @staticmethod
    def _check(reply: Message) -> Any:
        if isinstance(reply, Rlerror):
            raise NinePError(reply.ecode)
        return reply


class SessionClient(_Calls):
    """Drives a Session in process, through encode/decode both ways."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def raw(self, msg: Message) -> Message:
        dec = Decoder(1 << 21)
        dec.feed(encode(msg))
        request = dec.next_message()
        assert request is not None
        reply = self.session.handle(request)
        dec.feed(encode(reply))
        out = dec.next_message()
        assert out == reply
        return reply

    def rpc(self, cls: type[Message], *args: Any) -> Any:
        return self._check(self.raw(cls(self._next_tag(), *args)))

    # shorthands
    def version(self, msize: int = 1 << 20) -> Any:
        return self.rpc(Tversion, msize, b"9P2000.L")

    def attach(self, fid: int = 0, aname: bytes = b"") -> Any:
        return self.rpc(Tattach, fid, NOFID, b"u", aname, 0)

    def walk(self, fid: int, newfid: int, *names: bytes) -> Any:
        return self.rpc(Twalk, fid, newfid, tuple(names))

    def lopen(self, fid: int, flags: int = O_RDONLY) -> Any:
        return self.rpc(Tlopen, fid, flags)

    def lcreate(self, fid: int, name: bytes, flags: int = O_RDWR, mode: int = 0o644) -> Any:
        return self.rpc(Tlcreate, fid, name, flags, mode, 0)

    def read(self, fid: int, offset: int = 0, count: int = 1 << 16) -> bytes:
        data: bytes = self.rpc(Tread, fid, offset, count).data
        return data

    def write(self, fid: int, data: bytes, offset: int = 0) -> int:
        count: int = self.rpc(Twrite, fid, offset, data).count
        return count

    def getattr(self, fid: int) -> Any:
        return self.rpc(Tgetattr, fid, 0x7FF)

    def readdir(self, fid: int, offset: int = 0, count: int = 8192) -> bytes:
        data: bytes = self.rpc(Treaddir, fid, offset, count).data
        return data

    def clunk(self, fid: int) -> Any:
        return self.rpc(Tclunk, fid)


def session_client(table: ExportTable, **kw: Any) -> SessionClient:
    c = SessionClient(Session(table, **kw))
    c.version()
    c.attach(0)
    return c


class StreamClient(_Calls):
    """A minimal asyncio 9P client over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.decoder = Decoder(1 << 22)

    async def raw(self, msg: Message) -> Message:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, encode(msg))
        while (reply := self.decoder.next_message()) is None:
            data = await loop.sock_recv(self.sock, 1 << 20)
            if not data:
                raise ConnectionResetError("server closed the 9P stream")
            self.decoder.feed(data)
        assert reply.tag == msg.tag
        return reply

    async def rpc(self, cls: type[Message], *args: Any) -> Any:
        return self._check(await self.raw(cls(self._next_tag(), *args)))
