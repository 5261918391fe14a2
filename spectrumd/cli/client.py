"""A thin D-Bus client of the Manager and Instance objects (no introspection round trip)."""

from __future__ import annotations

from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from spectrumd.bus.connection import call_bus_daemon
from spectrumd.bus.names import BUS_NAME, ERROR_PREFIX, INSTANCE_IFACE, MANAGER_IFACE, MANAGER_PATH


class CallError(Exception):
    """A D-Bus error reply; ``short`` is the name without the Spectrum prefix."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message

    @property
    def short(self) -> str:
        return self.name.removeprefix(ERROR_PREFIX)


async def connect(spec: str) -> MessageBus:
    if spec == "session":
        bus = MessageBus(bus_type=BusType.SESSION)
    elif spec == "system":
        bus = MessageBus(bus_type=BusType.SYSTEM)
    else:
        bus = MessageBus(bus_address=spec)
    return await bus.connect()


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name or "error"
            raise CallError(reply.error_name or "", str(text))
        return list(reply.body)

    async def manager(self, member: str, signature: str = "", *args: Any) -> list[Any]:
        return await self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, list(args))

    async def instance_path(self, name: str) -> str:
        return str((await self.manager("GetInstance", "s", name))[0])

    async def instance_call(self, name: str, member: str) -> None:
        await self.call(await self.instance_path(name), INSTANCE_IFACE, member)

    async def properties(self, path: str) -> dict[str, Any]:
        (props,) = await self.call(
            path, "org.freedesktop.DBus.Properties", "GetAll", "s", [INSTANCE_IFACE]
        )
        return {k: v.value if isinstance(v, Variant) else v for k, v in props.items()}

    async def add_match(self, rule: str) -> None:
        reply = await call_bus_daemon(self.bus, "AddMatch", "s", rule)
        if reply.message_type == MessageType.ERROR:
            raise CallError("org.freedesktop.DBus.Error.Failed", f"cannot subscribe: {rule}")
