"""One request in, one reply out: the part both transports share.

A transport hands :func:`answer` the request's first bytes (copied once, so
the guest cannot change them while they are parsed), the rest of the
request's buffers (WRITE's payload, never copied), and the buffers the
reply goes into; it gets back the reply's header and body length, and
writes them where they belong. No exception escapes for any input: a
request that fails answers an errno.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import Any

from . import protocol as P
from .ops import FileSystem

logger = logging.getLogger(__name__)


def trim(bufs: Sequence[Any], size: int) -> list[Any]:
    """The first *size* bytes of *bufs* (buffers of one byte per item)."""
    if total(bufs) <= size:
        return list(bufs)  # the common case, with no loop in Python
    out = []
    for b in bufs:
        if size <= 0:
            break
        mv = memoryview(b)
        if len(mv) > size:
            mv = mv[:size]
        out.append(mv)
        size -= len(mv)
    return out


def total(bufs: Sequence[Any]) -> int:
    return sum(map(len, bufs))


class Reply:
    """What to send back: a header and either a body or bytes already in the buffers."""

    __slots__ = ("body", "data_len", "error", "unique")

    def __init__(self, unique: int, error: int, body: bytes = b"", data_len: int = 0) -> None:
        self.unique = unique
        self.error = error
        self.body = body
        self.data_len = data_len  # READ: bytes placed after the header in the reply buffers

    def header(self) -> bytes:
        return P.out_header(self.unique, self.error, len(self.body) + self.data_len)


def answer(
    fs: FileSystem, head: bytes, payload: Sequence[Any], read_into: Sequence[Any]
) -> Reply | None:
    """Handle one request; None when it takes no reply (FORGET, BATCH_FORGET).

    *head* holds the copied request bytes (for WRITE at least WRITE_HEADER
    of them, and *payload* the buffers after them); *read_into* are the
    reply buffers past the 16-byte header, where READ places its data.
    """
    unique = P.peek_unique(head)
    if unique is None:
        return None  # no id to answer to
    try:
        req = P.parse_request(head)
    except P.ProtocolError as e:
        return Reply(unique, e.errno)
    try:
        if req.opcode == P.READ:
            if not fs.initialized:
                raise OSError(errno.EIO, "not initialized")
            size = min(req.args.size, total(read_into))
            n = fs.read(req.args.fh, req.args.offset, trim(read_into, size))
            return Reply(unique, 0, b"", n)
        if req.opcode == P.WRITE:
            if not fs.initialized:
                raise OSError(errno.EIO, "not initialized")
            data = trim(payload, req.args.size)
            if total(data) != req.args.size:
                return Reply(unique, errno.EINVAL)
            n = fs.write(req.args.fh, req.args.offset, data)
            return Reply(unique, 0, P.encode_write(n))
        body = fs.dispatch(req)
    except OSError as e:
        return Reply(unique, e.errno or errno.EIO)
    except Exception:  # a bug must cost one request, not the guest's file system
        logger.exception("opcode %d failed", req.opcode)
        return Reply(unique, errno.EIO)
    if body is None:
        return None
    return Reply(unique, 0, body)
