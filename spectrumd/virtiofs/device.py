"""The virtio-fs device: chains from the queues in, FUSE replies out.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT: no
replies), queues 1.. carry requests. A chain's readable part is the
request: its first bytes are copied once (the header, and all of it but
WRITE's payload) before they are parsed; WRITE's payload and READ's
destination stay in guest memory and go straight to pwritev / preadv.
Used-ring updates of one batch are followed by a single call-eventfd
write.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import struct

from . import protocol as P
from .memory import GuestMemory
from .ops import FileSystem
from .serve import Reply, answer, trim
from .virtqueue import Chain, ChainError, Virtqueue
from .warm import Warmer

logger = logging.getLogger(__name__)

TAG_LEN = 36
OUT_H = P.OUT_HEADER.size
_LEN_OPCODE = struct.Struct("<II")  # the first fields of the FUSE request header
WRITE_REPLY = struct.Struct("<IiQII")  # the out header and fuse_write_out (size, padding)


def fs_config(tag: str, request_queues: int) -> bytes:
    """The 40-byte virtio-fs config space: the tag (NUL-padded) and the queue count."""
    raw = tag.encode()
    if not 0 < len(raw) <= TAG_LEN:
        raise ValueError(f"tag {tag!r} must be 1..{TAG_LEN} bytes")
    return raw.ljust(TAG_LEN, b"\0") + struct.pack("<I", request_queues)


def copy_out(bufs: list[memoryview], n: int) -> bytes:
    """The first *n* bytes of *bufs*, copied."""
    if bufs and len(bufs[0]) >= n:
        return bytes(bufs[0][:n])
    parts = []
    for b in bufs:
        if n <= 0:
            break
        parts.append(bytes(b[:n]))
        n -= len(parts[-1])
    return b"".join(parts)


def skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """*bufs* past their first *n* bytes."""
    if bufs and len(bufs[0]) == n:
        return bufs[1:]  # the usual layout: the header in a buffer of its own
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


def scatter(bufs: list[memoryview], data: bytes) -> int:
    """Copy *data* into *bufs*; returns how much fit."""
    done = 0
    for b in bufs:
        if done >= len(data):
            break
        k = min(len(b), len(data) - done)
        b[:k] = data[done : done + k]
        done += k
    return done


class Device:
    """Queues of one virtio-fs device and the file system they talk to."""

    def __init__(self, fs: FileSystem, num_queues: int) -> None:
        self.fs = fs
        self.mem = GuestMemory()
        self.queues = [Virtqueue(i) for i in range(num_queues)]
        self.counts: collections.Counter[int] = collections.Counter()  # requests by opcode
        # What the loop may warm next (warm.py): the fast lanes say what they served.
        self.warmer = Warmer(fs.tree)

    def process(self, vq: Virtqueue) -> int:
        """Answer every available chain on *vq*; returns how many."""
        count = 0
        mem = self.mem
        while vq.ready():
            item = vq.pop(mem)
            if item is None:
                break
            count += 1
            if isinstance(item, ChainError):
                logger.warning("queue %d: %s", vq.index, item)
                head = getattr(item, "head", None)
                if head is not None:
                    vq.push(head, 0)
                continue
            vq.push(item.head, self._one(vq, item))
        if count:
            vq.notify()
        return count

    def _one(self, vq: Virtqueue, chain: Chain) -> int:
        """Handle one chain; returns the bytes written into its writable part."""
        readable = chain.readable
        head = copy_out(readable, P.IN_HEADER.size)
        if len(head) < P.IN_HEADER.size:
            return 0
        length, opcode = _LEN_OPCODE.unpack_from(head)
        self.counts[opcode] += 1
        writable = chain.writable
        if vq.index == 0 and opcode not in (P.FORGET, P.BATCH_FORGET):
            # Only forgets (and INTERRUPT, which we do not support) travel here.
            return 0
        done = None
        if opcode == P.READ and length == P.IN_HEADER.size + P.READ_IN.size:
            done = self._read(chain)
        elif opcode == P.WRITE:
            done = self._write(chain)
        if done is not None:
            return done
        if opcode == P.WRITE:
            head = copy_out(readable, P.WRITE_HEADER)
            payload = skip(readable, P.WRITE_HEADER)
        else:
            head = copy_out(readable, min(length, P.MAX_REQUEST))
            payload = []
        reply: Reply | None
        try:
            reply = answer(self.fs, head, payload, skip(writable, OUT_H))
        except Exception:  # pragma: no cover - answer() already catches
            logger.exception("request failed")
            unique = P.peek_unique(head)
            reply = Reply(unique, errno.EIO) if unique is not None else None
        if reply is None:
            return 0
        room = sum(map(len, writable))
        if room < OUT_H + len(reply.body) + reply.data_len:
            reply = Reply(reply.unique, errno.EINVAL) if len(reply.body) else reply
            if reply.error and room < OUT_H:
                return 0
        hdr = reply.header()
        if reply.data_len:
            scatter(writable, hdr)
            return OUT_H + reply.data_len
        return scatter(writable, hdr + reply.body)

    def _read(self, chain: Chain) -> int | None:
        """READ in Linux's layout (the header, then fuse_read_in, in buffers
        of their own; the reply's header, then the data), with no request or
        reply objects: the data path's fast lane (a 1 MiB read is one such
        request). None: anything else (another layout, an extension, not yet
        initialized), for the general path, which answers the same."""
        fs = self.fs
        readable, writable = chain.readable, chain.writable
        if (
            not fs.initialized
            or len(readable) != 2
            or len(readable[0]) != P.IN_HEADER.size
            or len(readable[1]) != P.READ_IN.size
            or not writable
            or len(writable[0]) != OUT_H
        ):
            return None
        # unpack reads each field once: the guest cannot change them under us.
        fields = P.IN_HEADER.unpack(readable[0])
        if fields[7]:  # extlen: extensions are not negotiated
            return None
        fh, offset, size = P.READ_IN.unpack(readable[1])[:3]
        room = chain.writable_len - OUT_H
        into = writable[1:] if room == size else trim(writable[1:], min(size, room))
        unique = fields[2]
        try:
            n = fs.read(fh, offset, into)
        except OSError as e:
            return scatter(writable, P.out_header(unique, e.errno or errno.EIO, 0))
        P.OUT_HEADER.pack_into(writable[0], 0, OUT_H + n, 0, unique)
        self.warmer.after(fh, offset, n, False)
        return OUT_H + n

    def _write(self, chain: Chain) -> int | None:
        """WRITE in Linux's layout (the header, then fuse_write_in, in buffers
        of their own, then exactly the data announced), with as little Python
        as READ's lane: a 1 MiB write is one such request. None: anything
        else, for the general path, which answers the same."""
        fs = self.fs
        readable, writable = chain.readable, chain.writable
        if (
            not fs.initialized
            or len(readable) < 2
            or len(readable[0]) != P.IN_HEADER.size
            or len(readable[1]) != P.WRITE_IN.size
            or chain.writable_len < WRITE_REPLY.size
        ):
            return None
        # unpack reads each field once: the guest cannot change them under us.
        fields = P.IN_HEADER.unpack(readable[0])
        fh, offset, size = P.WRITE_IN.unpack(readable[1])[:3]
        if fields[7] or chain.readable_len != P.WRITE_HEADER + size:
            return None  # an extension; data not as announced
        unique = fields[2]
        data = readable[2:]
        try:
            n = fs.write(fh, offset, data)
        except OSError as e:
            return scatter(writable, P.out_header(unique, e.errno or errno.EIO, 0))
        self.warmer.after(fh, offset, n, True)
        return scatter(writable, WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, n, 0))

    def reset(self) -> None:
        for vq in self.queues:
            vq.reset()

    def close(self) -> None:
        self.reset()
        self.mem.close()


def drain_kick(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)
