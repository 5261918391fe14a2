"""A VMM control channel whose every call has a deadline.

A VMM that stops answering (wedged, stopped with SIGSTOP, a guest device
stuck in QEMU's main loop) must never hold an instance's lock for good: every
call through :class:`BoundedControl` ends within ``timeout`` seconds, and an
expired call raises :class:`~spectrumd.errors.Timeout` naming the call. The
stop's escalation takes a Timeout as "this step cannot work" and goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from spectrumd.errors import Timeout
from spectrumd.vmm.base import NetDev, VmmControl

_T = TypeVar("_T")


class BoundedControl:
    """Wraps a :class:`VmmControl`; each method raises what it raises, or Timeout."""

    def __init__(self, raw: VmmControl, instance: str, timeout: float) -> None:
        self.raw = raw
        self.instance = instance
        self.timeout = timeout

    async def _bounded(self, what: str, call: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise Timeout(
                f"cannot {what} {self.instance}: the VMM did not answer within {self.timeout:g} s"
            ) from None

    async def start_cpus(self) -> None:
        await self._bounded("start", self.raw.start_cpus())

    async def pause(self) -> None:
        await self._bounded("pause", self.raw.pause())

    async def resume(self) -> None:
        await self._bounded("resume", self.raw.resume())

    async def query_status(self) -> str:
        return await self._bounded("query the status of", self.raw.query_status())

    async def powerdown(self) -> None:
        await self._bounded("press the power button of", self.raw.powerdown())

    async def quit(self) -> None:
        await self._bounded("quit", self.raw.quit())

    async def request_exit(self) -> bool:
        return await self._bounded("ask the VMM to exit for", self.raw.request_exit())

    async def add_net(self, net: NetDev) -> None:
        await self._bounded(f"add network device {net.id} to", self.raw.add_net(net))

    async def remove_net(self, net_id: str) -> None:
        await self._bounded(f"remove network device {net_id} from", self.raw.remove_net(net_id))

    async def usb_attach(self, fd: int, dev_id: str) -> str:
        return await self._bounded(
            f"attach USB device {dev_id} to", self.raw.usb_attach(fd, dev_id)
        )

    async def usb_detach(self, handle: str) -> None:
        await self._bounded("detach a USB device from", self.raw.usb_detach(handle))

    async def close(self) -> None:
        await self._bounded("close the control channel of", self.raw.close())
