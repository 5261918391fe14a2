"""Kernel uevents: a pure parser, and a NETLINK_KOBJECT_UEVENT socket that feeds it.

The kernel multicasts one datagram per event to group 1 of
NETLINK_KOBJECT_UEVENT (lib/kobject_uevent.c)::

    ACTION@DEVPATH \\0 ACTION=add \\0 DEVPATH=/devices/... \\0 SUBSYSTEM=usb \\0 ...

(udev re-broadcasts its own, ``libudev``-prefixed, on group 2; we listen to
the kernel only). A uevent is only a hint that something changed: the
registry re-reads sysfs for the device it names, so a forged or garbled
event cannot make up a device. Datagrams from any sender other than the
kernel (netlink port id 0) are dropped anyway.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Mapping

import attrs

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
# The kernel's UEVENT_BUFFER_SIZE is 2048; leave room.
MAX_UEVENT = 8192
RCVBUF = 1024 * 1024


@attrs.frozen
class Uevent:
    action: str
    devpath: str
    subsystem: str
    devtype: str
    env: Mapping[str, str]


def parse_uevent(data: bytes) -> Uevent | None:
    """One kernel uevent datagram → Uevent; None if it is not one (or is udev's)."""
    if len(data) > MAX_UEVENT or data.startswith(b"libudev\0"):
        return None
    fields = data.rstrip(b"\0").split(b"\0")
    header = fields[0].decode("utf-8", errors="replace")
    action, at, devpath = header.partition("@")
    if not at or not action or not devpath.startswith("/"):
        return None
    env: dict[str, str] = {}
    for raw in fields[1:]:
        key, eq, value = raw.decode("utf-8", errors="replace").partition("=")
        if eq and key:
            env[key] = value
    if env.get("ACTION", action) != action or env.get("DEVPATH", devpath) != devpath:
        return None
    return Uevent(
        action=action,
        devpath=devpath,
        subsystem=env.get("SUBSYSTEM", ""),
        devtype=env.get("DEVTYPE", ""),
        env=env,
    )


class UeventMonitor:
    """Reads kernel uevents on the event loop and hands each datagram to ``on_data``.

    ``on_overflow`` is called when the kernel dropped events (ENOBUFS): the
    caller must then rescan what it watches.
    """

    def __init__(self, on_data: Callable[[bytes], None], on_overflow: Callable[[], None]) -> None:
        self._on_data = on_data
        self._on_overflow = on_overflow
        self._sock: socket.socket | None = None
        self.dropped = 0  # datagrams not from the kernel

    def start(self) -> None:
        """Open and bind the socket, and start reading. Raises OSError."""
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
            NETLINK_KOBJECT_UEVENT,
        )
        try:
            try:
                # Root may exceed rmem_max: a burst (a hub with many devices) fits.
                sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, KERNEL_GROUP))
            self.attach(sock)
        except BaseException:
            sock.close()
            raise

    def attach(self, sock: socket.socket) -> None:
        """Read from an already bound netlink socket (``start`` does this)."""
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data, addr = sock.recvfrom(MAX_UEVENT)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    log.warning("kernel uevents were lost (receive buffer full); rescanning")
                    self._safe(self._on_overflow)
                    continue
                log.error("reading kernel uevents failed: %s; USB hotplug stops", e)
                self.close()
                return
            if not isinstance(addr, tuple) or addr[0] != 0:
                self.dropped += 1
                continue
            self._safe(self._on_data, data)

    @staticmethod
    def _safe(fn: Callable[..., None], *args: bytes) -> None:
        try:
            fn(*args)
        except Exception as e:
            log.error("handling a kernel uevent failed: %s", e)
            log.debug("uevent handler traceback", exc_info=True)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
