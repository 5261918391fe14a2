"""``org.spectrum_os.Spectrum1.Instance``: one object per instance."""

from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import DBusBool, DBusSignature, DBusStr, DBusUInt32, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from spectrumd.bus import validate
from spectrumd.bus.auth import CallerCheck
from spectrumd.bus.errors import wire_errors
from spectrumd.bus.names import INSTANCE_IFACE, instance_path
from spectrumd.bus.usb import UsbInstanceMixin
from spectrumd.errors import Failed
from spectrumd.model.types import Resource
from spectrumd.supervisor import Instance
from spectrumd.supervisor.networks import NetworkService, network_resource
from spectrumd.supervisor.usb import UsbService

DBusStrList = Annotated[list[str], DBusSignature("as")]

# D-Bus property name → (signature, getter).
PROPERTIES: dict[str, tuple[str, Any]] = {
    "Name": ("s", lambda i: i.name),
    "Application": ("s", lambda i: i.definition.application),
    "State": ("s", lambda i: i.state.value),
    "StateReason": ("s", lambda i: i.state_reason),
    "MainPID": ("u", lambda i: i.main_pid),
    "Vmm": ("s", lambda i: i.definition.vmm.value),
    "Resources": ("as", lambda i: list(i.definition.resources)),
    "StartedAt": ("t", lambda i: i.started_at_us),
    "GuestReady": ("b", lambda i: i.guest_ready),
    "NeedsRestart": ("b", lambda i: i.needs_restart),
    "ConsoleLog": ("s", lambda i: str(i.env.log_path(i.name))),
}
NetworkList = Annotated[list[list[str]], DBusSignature("a(sss)")]
SIGNATURES = {name: sig for name, (sig, _getter) in PROPERTIES.items()} | {
    "NetworkInterfaces": "a(sss)"
}


def property_values(inst: Instance, network: NetworkService | None) -> dict[str, Any]:
    values = {name: getter(inst) for name, (_sig, getter) in PROPERTIES.items()}
    values["NetworkInterfaces"] = (
        [list(row) for row in network.interfaces(inst.name)] if network else []
    )
    return values


class InstanceInterface(UsbInstanceMixin, ServiceInterface):
    def __init__(
        self,
        inst: Instance,
        auth: CallerCheck,
        network: NetworkService | None,
        resources: Callable[[], dict[str, Resource]],
        usb: UsbService | None = None,
    ) -> None:
        super().__init__(INSTANCE_IFACE)
        self.inst = inst
        self.path = instance_path(inst.name)
        self._auth = auth
        self._network = network
        self._usb = usb
        self._resources = resources
        self._emitted = property_values(inst, network)
        self._variants: dict[str, Variant] | None = None

    def refresh(self) -> None:
        """Emit PropertiesChanged for every property whose value changed."""
        now = property_values(self.inst, self._network)
        changed = {k: v for k, v in now.items() if self._emitted.get(k) != v}
        self._emitted = now
        if changed:
            self._variants = None
            self.emit_properties_changed(changed)

    def managed_properties(self) -> dict[str, Variant]:
        """The values last emitted, as GetManagedObjects sends them (built once per change)."""
        if self._variants is None:
            self._variants = {
                name: Variant(SIGNATURES[name], value) for name, value in self._emitted.items()
            }
        return self._variants

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return self.inst.name

    @dbus_property(access=PropertyAccess.READ)
    def Application(self) -> DBusStr:
        return self.inst.definition.application

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.inst.state.value

    @dbus_property(access=PropertyAccess.READ)
    def StateReason(self) -> DBusStr:
        return self.inst.state_reason

    @dbus_property(access=PropertyAccess.READ)
    def MainPID(self) -> DBusUInt32:
        return self.inst.main_pid

    @dbus_property(access=PropertyAccess.READ)
    def Vmm(self) -> DBusStr:
        return self.inst.definition.vmm.value

    @dbus_property(access=PropertyAccess.READ)
    def Resources(self) -> DBusStrList:
        return list(self.inst.definition.resources)

    @dbus_property(access=PropertyAccess.READ)
    def StartedAt(self) -> DBusUInt64:
        return self.inst.started_at_us

    @dbus_property(access=PropertyAccess.READ)
    def GuestReady(self) -> DBusBool:
        return self.inst.guest_ready

    @dbus_property(access=PropertyAccess.READ)
    def NeedsRestart(self) -> DBusBool:
        return self.inst.needs_restart

    @dbus_property(access=PropertyAccess.READ)
    def ConsoleLog(self) -> DBusStr:
        return str(self.inst.env.log_path(self.inst.name))

    @dbus_property(access=PropertyAccess.READ)
    def NetworkInterfaces(self) -> NetworkList:
        return property_values(self.inst, self._network)["NetworkInterfaces"]  # type: ignore[no-any-return]

    def _network_driver(self) -> NetworkService:
        if self._network is None:
            raise Failed("networks are not available in this daemon")
        return self._network

    @dbus_method()
    @wire_errors
    async def AttachNetwork(self, network: DBusStr) -> None:
        name = validate.name("network", network)
        res = network_resource(self._resources(), name)
        await self._auth.require_admin(f"attach network {name} to {self.inst.name}")
        await self._network_driver().attach(self.inst, res)
        self.refresh()

    @dbus_method()
    @wire_errors
    async def DetachNetwork(self, network: DBusStr) -> None:
        name = validate.name("network", network)
        await self._auth.require_admin(f"detach network {name} from {self.inst.name}")
        await self._network_driver().detach(self.inst, name)
        self.refresh()

    @dbus_method()
    @wire_errors
    async def Start(self) -> None:
        await self._auth.require_admin(f"start {self.inst.name}")
        await self.inst.start()

    @dbus_method()
    @wire_errors
    async def Stop(self) -> None:
        await self._auth.require_admin(f"stop {self.inst.name}")
        await self.inst.stop()

    @dbus_method()
    @wire_errors
    async def Kill(self) -> None:
        await self._auth.require_admin(f"kill {self.inst.name}")
        await self.inst.kill()

    @dbus_method()
    @wire_errors
    async def Pause(self) -> None:
        await self._auth.require_admin(f"pause {self.inst.name}")
        await self.inst.pause()

    @dbus_method()
    @wire_errors
    async def Resume(self) -> None:
        await self._auth.require_admin(f"resume {self.inst.name}")
        await self.inst.resume()
