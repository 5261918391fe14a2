"""A bare dbus-fast service: the peer ``bench/run.py`` compares spectrumd's latency with.

Usage: python bench/echo_service.py BUS_ADDRESS

Owns ``org.spectrum_os.BenchEcho`` and exports ``/org/spectrum_os/BenchEcho`` with
``Echo(s) -> s``, ``Managed(u) -> a{oa{sa{sv}}}`` (the peer of GetManagedObjects: a
precomputed dictionary shaped like spectrumd's for N instances, every property of
the Instance interface with a value of its type), and, for information,
``Blob(u) -> s`` (a reply of N bytes) and ``Table(u) -> a(ssso)`` (a precomputed list
shaped like spectrumd's ListInstances reply).
Prints ``ready`` on stdout once the name is owned; ends on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Annotated

from dbus_fast import RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method

BUS_NAME = "org.spectrum_os.BenchEcho"
PATH = "/org/spectrum_os/BenchEcho"
IFACE = "org.spectrum_os.BenchEcho"
INSTANCE_PREFIX = "/org/spectrum_os/Spectrum1/instance/"

InstanceList = Annotated[list[list[str]], DBusSignature("a(ssso)")]
ManagedObjects = Annotated[dict[str, dict[str, dict[str, Variant]]], DBusSignature("a{oa{sa{sv}}}")]
INSTANCE_IFACE = "org.spectrum_os.Spectrum1.Instance"


def instance_properties(name: str) -> dict[str, Variant]:
    """What spectrumd's Instance interface holds for a stopped instance named ``name``."""
    return {
        "Name": Variant("s", name),
        "Application": Variant("s", "app"),
        "State": Variant("s", "stopped"),
        "StateReason": Variant("s", ""),
        "MainPID": Variant("u", 0),
        "Vmm": Variant("s", "qemu"),
        "Resources": Variant("as", []),
        "StartedAt": Variant("t", 0),
        "GuestReady": Variant("b", False),
        "NeedsRestart": Variant("b", False),
        "ConsoleLog": Variant("s", f"/tmp/spb.xxxxxxxx/state/logs/{name}/console.log"),
        "NetworkInterfaces": Variant("a(sss)", []),
    }


class EchoInterface(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(IFACE)
        self._tables: dict[int, list[list[str]]] = {}
        self._managed: dict[int, dict[str, dict[str, dict[str, Variant]]]] = {}

    @dbus_method()
    async def Echo(self, text: DBusStr) -> DBusStr:
        return text

    @dbus_method()
    async def Managed(self, count: DBusUInt32) -> ManagedObjects:
        managed = self._managed.get(count)
        if managed is None:
            names = [f"i{k:03d}" for k in range(count)]
            managed = {INSTANCE_PREFIX + n: {INSTANCE_IFACE: instance_properties(n)} for n in names}
            self._managed[count] = managed
        return managed

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
