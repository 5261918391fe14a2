"""Sans-IO 9P2000.L codec: bytes in, messages out; messages in, bytes out.

Like h11, nothing here does I/O or logs. The :class:`Decoder` is fed what
arrived on the stream and hands back whole messages; :func:`encode` turns a
message into its frame. Framing errors (a size below the header, or above
the negotiated msize) raise :class:`ProtocolError`: the stream can no longer
be trusted and the caller ends the connection. A well-framed message whose
body cannot be read comes back as :class:`BadMessage`, so the server can
answer it with Rlerror and carry on, since the next frame is still known.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from typing import Any

from .messages import ALL_MESSAGES, HEADER_SIZE, BadMessage, Message, Qid

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_QID = struct.Struct("<BIQ")
_HEADER = struct.Struct("<IBH")
_DIRENT_FIXED = struct.Struct("<BIQQB")  # qid, offset, type

_Factory = Callable[..., Message]
# type number -> (constructor, body format, field names)
_TABLE: dict[int, tuple[_Factory, str, tuple[str, ...]]] = {
    cls.TYPE: (cls, cls.FMT, tuple(f.name for f in dataclasses.fields(cls))[1:])
    for cls in ALL_MESSAGES
}

DEFAULT_MAX_SIZE = 1 << 20


class ProtocolError(Exception):
    """The byte stream broke 9P framing; the connection must end."""


class _Short(Exception):
    """A body ended before its fields did (internal)."""


def _read(fmt: str, buf: memoryview) -> list[Any]:
    values: list[Any] = []
    pos = 0
    end = len(buf)

    def need(n: int) -> None:
        if pos + n > end:
            raise _Short

    for code in fmt:
        if code == "B":
            need(1)
            values.append(buf[pos])
            pos += 1
        elif code == "H":
            need(2)
            values.append(_U16.unpack_from(buf, pos)[0])
            pos += 2
        elif code == "I":
            need(4)
            values.append(_U32.unpack_from(buf, pos)[0])
            pos += 4
        elif code == "Q":
            need(8)
            values.append(_U64.unpack_from(buf, pos)[0])
            pos += 8
        elif code == "q":
            need(13)
            values.append(Qid(*_QID.unpack_from(buf, pos)))
            pos += 13
        elif code in "sD":
            width = 2 if code == "s" else 4
            need(width)
            n = (_U16 if code == "s" else _U32).unpack_from(buf, pos)[0]
            pos += width
            need(n)
            values.append(bytes(buf[pos : pos + n]))
            pos += n
        elif code == "W":
            need(2)
            count = _U16.unpack_from(buf, pos)[0]
            pos += 2
            names = []
            for _ in range(count):
                need(2)
                n = _U16.unpack_from(buf, pos)[0]
                pos += 2
                need(n)
                names.append(bytes(buf[pos : pos + n]))
                pos += n
            values.append(tuple(names))
        elif code == "X":
            need(2)
            count = _U16.unpack_from(buf, pos)[0]
            pos += 2
            need(13 * count)
            values.append(tuple(Qid(*_QID.unpack_from(buf, pos + 13 * i)) for i in range(count)))
            pos += 13 * count
        else:  # pragma: no cover - a typo in messages.py
            raise AssertionError(code)
    if pos != end:
        # Trailing bytes mean the sender and we disagree on the layout.
        raise _Short
    return values


def _write(fmt: str, values: Sequence[Any], out: list[bytes]) -> None:
    for code, value in zip(fmt, values, strict=True):
        if code == "B":
            out.append(_U8.pack(value))
        elif code == "H":
            out.append(_U16.pack(value))
        elif code == "I":
            out.append(_U32.pack(value))
        elif code == "Q":
            out.append(_U64.pack(value))
        elif code == "q":
            out.append(_QID.pack(value.type, value.version, value.path))
        elif code == "s":
            out.append(_U16.pack(len(value)))
            out.append(value)
        elif code == "D":
            out.append(_U32.pack(len(value)))
            out.append(value)
        elif code == "W":
            out.append(_U16.pack(len(value)))
            for name in value:
                out.append(_U16.pack(len(name)))
                out.append(name)
        elif code == "X":
            out.append(_U16.pack(len(value)))
            out.extend(_QID.pack(q.type, q.version, q.path) for q in value)
        else:  # pragma: no cover
            raise AssertionError(code)


def encode(msg: Message) -> bytes:
    """Frame *msg*. Raises ValueError (or struct.error) for out-of-range fields."""
    if isinstance(msg, BadMessage):
        raise ValueError("BadMessage has no wire form")
    _, fmt, names = _TABLE[msg.TYPE]
    parts: list[bytes] = [b""]
    try:
        _write(fmt, [getattr(msg, n) for n in names], parts)
    except struct.error as e:
        raise ValueError(f"{type(msg).__name__}: {e}") from None
    body_len = sum(len(p) for p in parts)
    parts[0] = _HEADER.pack(HEADER_SIZE + body_len, msg.TYPE, msg.tag)
    return b"".join(parts)


def decode_body(type_: int, tag: int, body: memoryview) -> Message:
    """One message from its type, tag and body; never raises."""
    entry = _TABLE.get(type_)
    if entry is None:
        return BadMessage(tag, type_, known=False)
    factory, fmt, _ = entry
    try:
        return factory(tag, *_read(fmt, body))
    except _Short:
        return BadMessage(tag, type_, known=True)


class Decoder:
    """Incremental frame decoder.

    ``max_size`` is the largest frame accepted, size field included; the
    server lowers it to the negotiated msize after Tversion.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf) - self._pos

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes are fed.

        Raises ProtocolError when the frame size is impossible or over
        ``max_size``; the decoder is then unusable.
        """
        if self.pending < 4:
            return None
        size = _U32.unpack_from(self._buf, self._pos)[0]
        if size < HEADER_SIZE:
            raise ProtocolError(f"frame size {size} is below the 9P header size")
        if size > self.max_size:
            raise ProtocolError(f"frame size {size} is over msize {self.max_size}")
        if self.pending < size:
            return None
        _, type_, tag = _HEADER.unpack_from(self._buf, self._pos)
        start = self._pos
        self._pos += size
        with memoryview(self._buf) as view:
            msg = decode_body(type_, tag, view[start + HEADER_SIZE : start + size])
        if self._pos > (1 << 20) and self._pos * 2 > len(self._buf):
            # Drop consumed bytes now and then so a long stream of pipelined
            # requests does not keep growing the buffer.
            del self._buf[: self._pos]
            self._pos = 0
        return msg


def encode_dirent(qid: Qid, offset: int, type_: int, name: bytes) -> bytes:
    """One Rreaddir record: qid[13] offset[8] type[1] name[s]."""
    return (
        _DIRENT_FIXED.pack(qid.type, qid.version, qid.path, offset, type_)
        + _U16.pack(len(name))
        + name
    )


def dirent_size(name: bytes) -> int:
    return _DIRENT_FIXED.size + 2 + len(name)


def decode_dirents(data: bytes) -> list[tuple[Qid, int, int, bytes]]:
    """Records of an Rreaddir payload; raises ValueError if malformed."""
    out = []
    pos = 0
    while pos < len(data):
        if pos + _DIRENT_FIXED.size + 2 > len(data):
            raise ValueError("truncated directory entry")
        qtype, qver, qpath, offset, dtype = _DIRENT_FIXED.unpack_from(data, pos)
        pos += _DIRENT_FIXED.size
        n = _U16.unpack_from(data, pos)[0]
        pos += 2
        if pos + n > len(data):
            raise ValueError("truncated directory entry name")
        out.append((Qid(qtype, qver, qpath), offset, dtype, bytes(data[pos : pos + n])))
        pos += n
    return out
