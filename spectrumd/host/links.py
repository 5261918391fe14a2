"""Bridges and taps over netlink (pyroute2's asyncio API), in one namespace.

Every coroutine here runs on the :class:`~spectrumd.host.netns.NetnsThread`'s
loop, never on the daemon's: netlink requests block their caller while the
kernel works, and a tap is created by an ioctl in the namespace's thread.
Errors come out as :class:`LinkError` (or :class:`NameTaken`) naming the
interface.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from typing import Any

import attrs
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from spectrumd.host import netns


class LinkError(Exception):
    """A netlink or tun operation on ``name`` failed; the message names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class NameTaken(LinkError):
    """An interface of that name already exists."""


@attrs.frozen
class Link:
    index: int
    name: str
    kind: str | None
    alias: str | None
    master: int | None


def _strerror(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        return os.strerror(e.code) if e.code > 0 else str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _code(e: BaseException) -> int | None:
    if isinstance(e, NetlinkError):
        return int(e.code)
    if isinstance(e, OSError):
        return e.errno
    return None


class Links:
    """One rtnetlink socket in the worker's namespace. Create and use on the worker's loop."""

    def __init__(self) -> None:
        # The socket is made here, in the worker thread, so it is in the
        # worker's namespace without pyroute2's fork.
        self._ipr: Any = AsyncIPRoute()

    def close(self) -> None:
        self._ipr.close()

    async def dump(self) -> list[Link]:
        """Every link in the namespace. Raises LinkError."""
        links = []
        try:
            async for msg in await self._ipr.link("dump"):
                links.append(
                    Link(
                        index=msg["index"],
                        name=msg.get("ifname"),
                        kind=msg.get(("linkinfo", "kind")),
                        alias=msg.get("ifalias"),
                        master=msg.get("master"),
                    )
                )
        except (NetlinkError, OSError) as e:
            raise LinkError("", f"cannot list interfaces: {_strerror(e)}") from None
        return links

    @staticmethod
    def index_of(name: str) -> int | None:
        """The link's index in the worker's namespace (an ioctl: no netlink dump)."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None

    async def create_bridge(self, name: str, mac: str, alias: str) -> int:
        """Create and bring up a bridge; return its index. Raises NameTaken, LinkError."""
        try:
            # forward_delay 0: with STP off, a new port forwards at once.
            await self._ipr.link("add", ifname=name, kind="bridge", address=mac, br_forward_delay=0)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise NameTaken(name, f"an interface named {name} already exists") from None
            raise LinkError(name, f"cannot create bridge {name}: {_strerror(e)}") from None
        try:
            index = self.index_of(name)
            if index is None:
                raise LinkError(name, f"bridge {name} vanished as it was made")
            # The kernel ignores IFLA_IFALIAS when it creates a link: set it after.
            await self._ipr.link("set", index=index, ifalias=alias, state="up")
        except BaseException as e:
            with contextlib.suppress(LinkError):
                await self.delete(name)
            if isinstance(e, LinkError):
                raise
            if isinstance(e, NetlinkError | OSError):
                raise LinkError(name, f"cannot set up bridge {name}: {_strerror(e)}") from None
            raise
        return index

    async def add_address(
        self, index: int, name: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        """Raises LinkError."""
        try:
            await self._ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )
        except (NetlinkError, OSError) as e:
            raise LinkError(name, f"cannot add {address} to {name}: {_strerror(e)}") from None

    async def create_tap(self, name: str, alias: str, master: int) -> int:
        """Create the tap, enslave it to ``master``, bring it up; return its fd.

        The tap lives as long as the fd (and the VMM's copies). Raises
        NameTaken, LinkError.
        """
        try:
            fd = netns.open_tap(name)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise NameTaken(name, f"an interface named {name} already exists") from None
            raise LinkError(name, f"cannot create tap {name}: {_strerror(e)}") from None
        try:
            index = self.index_of(name)
            if index is None:
                raise LinkError(name, f"tap {name} vanished as it was made")
            await self._ipr.link("set", index=index, ifalias=alias, master=master, state="up")
        except BaseException as e:
            self.close_fd(fd)
            with contextlib.suppress(LinkError):
                await self.delete(name)
            if isinstance(e, LinkError):
                raise
            if isinstance(e, NetlinkError | OSError):
                raise LinkError(name, f"cannot set up tap {name}: {_strerror(e)}") from None
            raise
        return fd

    @staticmethod
    def close_fd(fd: int) -> None:
        # Closing a tap's last fd unregisters the device: this can take a while.
        with contextlib.suppress(OSError):
            os.close(fd)

    async def delete(self, name: str) -> bool:
        """Remove the link ``name`` if it exists; True if it did. Raises LinkError."""
        try:
            await self._ipr.link("del", ifname=name)
        except (NetlinkError, OSError) as e:
            if _code(e) == errno.ENODEV:
                return False
            raise LinkError(name, f"cannot remove {name}: {_strerror(e)}") from None
        return True
