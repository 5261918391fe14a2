"""A fake guest: a memfd as its RAM, with a split virtqueue the test lays out like a driver."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import struct

from spectrumd.virtiofs.device import Device
from spectrumd.virtiofs.memory import GuestMemory
from spectrumd.virtiofs.virtqueue import DESC, F_NEXT, F_WRITE

BASE = 0x100000  # guest-physical address of the memfd's first byte
SIZE = 4 << 20
QSIZE = 64
DESC_AT, AVAIL_AT, USED_AT = BASE, BASE + 0x1000, BASE + 0x2000
DATA_AT = BASE + 0x10000


class FakeGuest:
    def __init__(self, device: Device, queue: int = 1) -> None:
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, SIZE)
        self.map = mmap.mmap(self.fd, SIZE)
        self.mv = memoryview(self.map)
        self.device = device
        device.mem = GuestMemory.from_buffer(BASE, self.mv)
        vq = device.queues[queue]
        vq.num = QSIZE
        vq.addrs = (DESC_AT, USED_AT, AVAIL_AT)
        vq.map(device.mem)
        vq.enabled = vq.started = True
        self.vq = vq
        self.avail_idx = 0
        self.next_data = DATA_AT
        self.next_desc = 0

    def close(self) -> None:
        self.device.close()
        os.close(self.fd)
        gc.collect()  # views of parsed chains die with their frames
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when collected
            self.mv.release()
            self.map.close()

    def off(self, gpa: int) -> int:
        return gpa - BASE

    def alloc(self, data: bytes | int) -> int:
        """Place *data* (or that many zero bytes) in guest memory; returns its address."""
        n = data if isinstance(data, int) else len(data)
        at = self.next_data
        if not isinstance(data, int):
            self.mv[self.off(at) : self.off(at) + n] = data
        self.next_data += (n + 63) & ~63
        return at

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        DESC.pack_into(self.mv, self.off(DESC_AT) + 16 * i, addr, length, flags, nxt)

    def offer(self, head: int) -> None:
        struct.pack_into("<H", self.mv, self.off(AVAIL_AT) + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mv, self.off(AVAIL_AT) + 2, self.avail_idx)

    def chain(self, readable: list[bytes], writable: list[int]) -> tuple[int, list[int]]:
        """Lay out one chain from the next free descriptors; returns its head and reply buffers."""
        parts: list[tuple[int, int, int]] = []
        for r in readable:
            parts.append((self.alloc(r), len(r), 0))
        outs = []
        for w in writable:
            a = self.alloc(w)
            outs.append(a)
            parts.append((a, w, F_WRITE))
        head = self.next_desc
        for k, (addr, length, flags) in enumerate(parts):
            i = (head + k) % QSIZE
            last = k == len(parts) - 1
            self.desc(i, addr, length, flags | (0 if last else F_NEXT), (i + 1) % QSIZE)
        self.next_desc = (head + len(parts)) % QSIZE
        return head, outs

    def used(self) -> list[tuple[int, int]]:
        idx = struct.unpack_from("<H", self.mv, self.off(USED_AT) + 2)[0]
        return [
            struct.unpack_from("<II", self.mv, self.off(USED_AT) + 4 + 8 * (k % QSIZE))
            for k in range(idx)
        ]

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mv[self.off(gpa) : self.off(gpa) + n])
