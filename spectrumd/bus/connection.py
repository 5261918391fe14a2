"""A MessageBus that gets three things right that dbus-fast does not.

1. ObjectManager's InterfacesAdded/InterfacesRemoved are sent from the
   manager's path (dbus-fast sends them from the child's own path, so GLib's
   GDBusObjectManagerClient sees nothing).
2. ObjectManager is the manager's alone: dbus-fast lists it in every object's
   introspection and answers GetManagedObjects everywhere; here other objects
   neither list it nor answer it, as the D-Bus specification's object manager
   pattern (and ``busctl``, GLib) expects. GetManagedObjects, the first call of
   every desktop client, is answered from the property values each instance
   object keeps between its PropertiesChanged, not by calling every getter.
3. The caller of the method being handled is known (``current_sender``), so
   the daemon can check who asks before it changes state.

Pinned to the dbus-fast version in pyproject.toml: these hooks override
private methods (tests/integration/test_daemon_api.py checks them with the
real tools).
"""

import contextvars
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from spectrumd.bus.names import MANAGER_PATH, OBJECT_MANAGER_IFACE

current_sender: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_sender", default=None
)


async def call_bus_daemon(bus: MessageBus, member: str, signature: str, *args: Any) -> Message:
    """Call org.freedesktop.DBus itself (AddMatch, GetConnectionUnixUser, ...)."""
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member=member,
            signature=signature,
            body=list(args),
        )
    )
    assert reply is not None
    return reply


class SpectrumBus(MessageBus):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_message_handler(self._object_manager)

    def _introspect_export_path(self, path: str) -> intr.Node:
        node = super()._introspect_export_path(path)
        if path != MANAGER_PATH:
            node.interfaces = [i for i in node.interfaces if i.name != OBJECT_MANAGER_IFACE]
        return node

    def _object_manager(self, msg: Message) -> bool:
        """GetManagedObjects on the manager, from values the objects keep; refused elsewhere."""
        if msg.message_type is not MessageType.METHOD_CALL or msg.interface != OBJECT_MANAGER_IFACE:
            return False
        if msg.path != MANAGER_PATH:
            self.send(
                Message.new_error(
                    msg,
                    "org.freedesktop.DBus.Error.UnknownInterface",
                    f"{msg.path} has no interface {OBJECT_MANAGER_IFACE}; "
                    f"the object manager is {MANAGER_PATH}",
                )
            )
            return True
        if msg.member != "GetManagedObjects" or msg.signature:
            return False
        prefix = MANAGER_PATH + "/"
        managed = {
            path: {name: _properties(iface) for name, iface in interfaces.items()}
            for path, interfaces in self._path_exports.items()
            if path.startswith(prefix)
        }
        self.send(Message.new_method_return(msg, "a{oa{sa{sv}}}", [managed]))
        return True

    def _make_method_handler(self, interface: Any, method: Any) -> Callable[..., None]:
        inner = super()._make_method_handler(interface, method)

        def handler(msg: Message, send_reply: Any) -> None:
            # ensure_future copies the context, so the coroutine sees the sender.
            token = current_sender.set(msg.sender)
            try:
                inner(msg, send_reply)
            finally:
                current_sender.reset(token)

        return handler

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or not path.startswith(MANAGER_PATH + "/"):
            return

        def got_properties(
            interface: ServiceInterface, result: Any, user_data: Any, e: Exception | None
        ) -> None:
            self.send(
                Message.new_signal(
                    path=MANAGER_PATH,
                    interface=OBJECT_MANAGER_IFACE,
                    member="InterfacesAdded",
                    signature="oa{sa{sv}}",
                    body=[path, {interface.name: result or {}}],
                )
            )

        ServiceInterface._get_all_property_values(interface, got_properties)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected or not path.startswith(MANAGER_PATH + "/"):
            return
        self.send(
            Message.new_signal(
                path=MANAGER_PATH,
                interface=OBJECT_MANAGER_IFACE,
                member="InterfacesRemoved",
                signature="oas",
                body=[path, removed_interfaces],
            )
        )


def _properties(iface: ServiceInterface) -> dict[str, Variant]:
    """Every readable property of ``iface`` as Variants: kept by the interface itself
    where it has ``managed_properties`` (instances, the hundreds), else read now."""
    kept = getattr(iface, "managed_properties", None)
    if kept is not None:
        return kept()  # type: ignore[no-any-return]
    return {
        prop.name: Variant(prop.signature, prop.prop_getter(iface))
        for prop in ServiceInterface._get_properties(iface)
        if not prop.disabled and prop.access.readable()
    }
