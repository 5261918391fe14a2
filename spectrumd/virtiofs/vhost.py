"""The vhost-user backend protocol (QEMU docs/interop/vhost-user.rst), backend side.

:class:`Backend` takes one message at a time (:meth:`Backend.handle`: the
request code, flags, payload bytes and the fds that came with it) and
returns the reply bytes, or None. It owns every fd handed to it. A
message it cannot use raises :class:`VhostError`, after which the
connection is dropped: the VMM is the peer here, but its messages are
still checked (sizes, queue indexes, region bounds) before use.

Offered: VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC (the kernel puts
a 1 MiB request of 256 pages in one ring slot), and the protocol features
MQ and REPLY_ACK (GET_CONFIG is answered too, see PROTOCOL_FEATURES).
Not offered: EVENT_IDX, packed rings, dirty logging (no migration),
in-band notifications, inflight tracking.
"""

from __future__ import annotations

import os
import struct

from .device import Device, drain_kick
from .memory import GuestMemory, MemoryError_

HEADER = struct.Struct("<III")  # request, flags, size
VERSION = 0x1
F_REPLY = 0x4
F_NEED_REPLY = 0x8
MAX_PAYLOAD = 4096

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE, SET_LOG_FD, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 6, 7, 8, 9, 10
GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 11, 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG, RESET_DEVICE = 24, 25, 34

F_VERSION_1 = 1 << 32
F_INDIRECT_DESC = 1 << 28
F_PROTOCOL_FEATURES = 1 << 30
FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL_FEATURES
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9
# CONFIG is not offered: QEMU 7.2's vhost-user-fs builds the config space
# from its own tag= (and warns about a backend offering it); GET_CONFIG is
# still answered for a VMM that asks.
PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK
MAX_REGIONS = 8

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_CONFIG_HEAD = struct.Struct("<III")


class VhostError(Exception):
    """A message we cannot act on; the connection should be closed."""


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Backend:
    def __init__(self, device: Device, config: bytes) -> None:
        self.device = device
        self.config = bytearray(config)
        self.features = 0
        self.protocol_features = 0

    def _queue(self, index: int) -> int:
        if not 0 <= index < len(self.device.queues):
            raise VhostError(f"queue {index} does not exist")
        return index

    def handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bytes | None:
        """Act on one message; returns the reply (header included) or None.

        Raises VhostError. Every fd in *fds* is taken over: a handler that
        keeps one removes it from the list, the rest are closed here.
        """
        try:
            body, ack = self._dispatch(request, payload, fds)
        except (struct.error, ValueError, OSError, MemoryError_) as e:
            raise VhostError(f"request {request}: {e}") from None
        finally:
            _close(fds)  # what the message's handler did not take
        if body is None and flags & F_NEED_REPLY and self.protocol_features & PF_REPLY_ACK:
            body = _U64.pack(0 if ack else 1)
        if body is None:
            return None
        return HEADER.pack(request, VERSION | F_REPLY, len(body)) + body

    def _dispatch(self, req: int, p: bytes, fds: list[int]) -> tuple[bytes | None, bool]:
        dev = self.device
        if req == GET_FEATURES:
            return _U64.pack(FEATURES), True
        if req == SET_FEATURES:
            (features,) = _U64.unpack_from(p)
            if features & ~FEATURES or not features & F_VERSION_1:
                raise VhostError(f"features {features:#x} not offered or without VERSION_1")
            self.features = features
            if not features & F_PROTOCOL_FEATURES:
                # Without protocol features every ring starts enabled.
                for vq in dev.queues:
                    vq.enabled = True
            return None, True
        if req == GET_PROTOCOL_FEATURES:
            return _U64.pack(PROTOCOL_FEATURES), True
        if req == SET_PROTOCOL_FEATURES:
            self.protocol_features = _U64.unpack_from(p)[0] & PROTOCOL_FEATURES
            return None, True
        if req == GET_QUEUE_NUM:
            return _U64.pack(len(dev.queues)), True
        if req in (SET_OWNER, SET_LOG_BASE, SET_LOG_FD):
            return None, req == SET_OWNER
        if req in (RESET_OWNER, RESET_DEVICE):
            dev.reset()
            self.features = 0
            return None, True
        if req == SET_MEM_TABLE:
            self._set_mem_table(p, fds)
            return None, True
        if req in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE):
            index, num = _STATE.unpack_from(p)
            vq = dev.queues[self._queue(index)]
            if req == SET_VRING_NUM:
                if num == 0 or num > 32768 or num & (num - 1):
                    raise VhostError(f"queue size {num} is not a power of 2 up to 32768")
                vq.num = num
                vq.map(dev.mem)
            elif req == SET_VRING_BASE:
                vq.last_avail = num & 0xFFFF
            else:
                vq.enabled = bool(num)
                if vq.enabled and vq.ready():
                    dev.process(vq)
            return None, True
        if req == SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = _ADDR.unpack_from(p)
            vq = dev.queues[self._queue(index)]
            vq.addrs = (desc, used, avail)
            vq.map(dev.mem)
            vq.start_used()
            return None, True
        if req == GET_VRING_BASE:
            index, _ = _STATE.unpack_from(p)
            vq = dev.queues[self._queue(index)]
            base = vq.last_avail
            vq.started = False
            if vq.kick_fd >= 0:
                os.close(vq.kick_fd)
                vq.kick_fd = -1
            return _STATE.pack(index, base), True
        if req in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            (v,) = _U64.unpack_from(p)
            vq = dev.queues[self._queue(v & 0xFF)]
            nofd = bool(v & 0x100)
            if nofd != (not fds) or len(fds) > 1:
                raise VhostError("fd missing or extra fds for a vring fd message")
            fd = -1 if nofd else fds.pop()
            if fd >= 0:
                os.set_blocking(fd, False)
            attr = {SET_VRING_KICK: "kick_fd", SET_VRING_CALL: "call_fd"}.get(req, "err_fd")
            old = getattr(vq, attr)
            if old >= 0:
                os.close(old)
            setattr(vq, attr, fd)
            if req == SET_VRING_KICK:
                # Polling mode (no fd) is not supported: such a ring never starts.
                vq.started = fd >= 0
                if vq.ready():
                    drain_kick(fd)
                    dev.process(vq)
            return None, True
        if req == GET_CONFIG:
            offset, size, _ = _CONFIG_HEAD.unpack_from(p)
            if offset + size > len(self.config) or len(p) < _CONFIG_HEAD.size + size:
                raise VhostError(f"config range {offset}+{size} is beyond the config space")
            return p[: _CONFIG_HEAD.size] + bytes(self.config[offset : offset + size]), True
        if req == SET_CONFIG:
            return None, False  # the tag is ours; the driver may not change it
        raise VhostError(f"request {req} is not supported")

    def _set_mem_table(self, p: bytes, fds: list[int]) -> None:
        n, _ = _STATE.unpack_from(p)
        if not 0 < n <= MAX_REGIONS or len(fds) != n:
            raise VhostError(f"{n} regions with {len(fds)} fds")
        regions = []
        for i in range(n):
            gpa, size, uva, offset = _REGION.unpack_from(p, 8 + 32 * i)
            regions.append((gpa, size, uva, offset, fds[i]))
        mem = GuestMemory.mapped(regions)  # the maps hold their own references
        dev = self.device
        old = dev.mem
        dev.mem = mem
        for vq in dev.queues:
            vq.map(mem)
        old.close()
