"""A bare dbus-fast service: the peer ``bench/run.py`` compares spectrumd's latency with.

Usage: python bench/echo_service.py BUS_ADDRESS

Owns ``org.spectrum_os.BenchEcho`` and exports ``/org/spectrum_os/BenchEcho`` with
``Echo(s) -> s`` (the peer of the targets) and, for information, ``Blob(u) -> s``
(a reply of N bytes) and ``Table(u) -> a(ssso)`` (a precomputed list shaped like
spectrumd's ListInstances reply for N instances: the floor of that call).
Prints ``ready`` on stdout once the name is owned; ends on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Annotated

from dbus_fast import RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method

BUS_NAME = "org.spectrum_os.BenchEcho"
PATH = "/org/spectrum_os/BenchEcho"
IFACE = "org.spectrum_os.BenchEcho"
INSTANCE_PREFIX = "/org/spectrum_os/Spectrum1/instance/"

InstanceList = Annotated[list[list[str]], DBusSignature("a(ssso)")]


class EchoInterface(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(IFACE)
        self._tables: dict[int, list[list[str]]] = {}

    @dbus_method()
    async def Echo(self, text: DBusStr) -> DBusStr:
        return text

    @dbus_method()
    async def Blob(self, size: DBusUInt32) -> DBusStr:
        return "x" * size

    @dbus_method()
    async def Table(self, count: DBusUInt32) -> InstanceList:
        table = self._tables.get(count)
        if table is None:
            names = [f"i{k:03d}" for k in range(count)]
            table = [[n, "app", "stopped", INSTANCE_PREFIX + n] for n in names]
            self._tables[count] = table
        return table


async def serve(address: str) -> int:
    bus = await MessageBus(bus_address=address).connect()
    bus.export(PATH, EchoInterface())
    reply = await bus.request_name(BUS_NAME)
    if reply != RequestNameReply.PRIMARY_OWNER:
        print(f"echo_service: cannot own {BUS_NAME}: {reply}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    bus.disconnect()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: echo_service.py BUS_ADDRESS")
    sys.exit(asyncio.run(serve(sys.argv[1])))
