"""``org.spectrum_os.Spectrum1.Manager`` and the objects it manages."""

import logging
import time
from typing import Annotated

from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from spectrumd.bus import validate
from spectrumd.bus.auth import CallerCheck
from spectrumd.bus.connection import current_sender
from spectrumd.bus.errors import wire_errors
from spectrumd.bus.grants import GrantsBus, grant_path, request_path
from spectrumd.bus.instance import InstanceInterface
from spectrumd.bus.names import MANAGER_IFACE, MANAGER_PATH, instance_path
from spectrumd.bus.usb import UsbManagerMixin
from spectrumd.supervisor import Instance, Supervisor
from spectrumd.supervisor.networks import NetworkService
from spectrumd.supervisor.usb import UsbService

log = logging.getLogger(__name__)

InstanceList = Annotated[list[list[str]], DBusSignature("a(ssso)")]
AppList = Annotated[list[list[str]], DBusSignature("a(ss)")]
GrantList = Annotated[list[list[str]], DBusSignature("a(ssssso)")]
ResourceList = Annotated[list[list[str]], DBusSignature("a(sss)")]
StrList = Annotated[list[str], DBusSignature("as")]
OptionDict = Annotated[dict[str, Variant], DBusSignature("a{sv}")]


class ManagerInterface(UsbManagerMixin, ServiceInterface):
    def __init__(
        self,
        bus: MessageBus,
        sup: Supervisor,
        auth: CallerCheck,
        hub: GrantsBus,
        network: NetworkService | None = None,
        usb: UsbService | None = None,
    ) -> None:
        super().__init__(MANAGER_IFACE)
        if usb is not None:
            self.connect_usb(usb)
        self.hub = hub
        self.network = network
        if network is not None:
            network.on_change.append(self._network_changed)
        self.bus = bus
        self.sup = sup
        self.auth = auth
        self.objects: dict[str, InstanceInterface] = {}
        # ListInstances is the hot read: its rows are kept until something changes.
        self._rows: list[list[str]] | None = None
        sup.on_added.append(self._export)
        sup.on_removed.append(self._unexport)
        sup.on_changed.append(self._changed)

    def export_all(self) -> None:
        self.bus.export(MANAGER_PATH, self)
        for inst in self.sup.instances.values():
            self._export(inst)
        self.hub.export_all()

    def _export(self, inst: Instance) -> None:
        self._forget_rows()
        iface = InstanceInterface(
            inst, self.auth, self.network, lambda: dict(self.sup.config.resources), self.usb
        )
        self.objects[inst.name] = iface
        self.bus.export(iface.path, iface)

    def _unexport(self, inst: Instance) -> None:
        self._forget_rows()
        iface = self.objects.pop(inst.name, None)
        if iface is not None:
            self.bus.unexport(iface.path, iface)

    def _changed(self, inst: Instance, changed: frozenset[str]) -> None:
        self._forget_rows()
        iface = self.objects.get(inst.name)
        if iface is not None and iface.inst is inst:
            iface.refresh()

    def _forget_rows(self) -> None:
        self._rows = None

    def _instance_rows(self) -> list[list[str]]:
        if self._rows is None:
            self._rows = [
                [i.name, i.definition.application, i.state.value, self.objects[i.name].path]
                for i in self.sup.instances.values()
            ]
        return self._rows

    def _network_changed(self, name: str) -> None:
        iface = self.objects.get(name)
        if iface is not None:
            iface.refresh()

    def _instance(self, untrusted_name: str) -> Instance:
        return self.sup.get(validate.name("name", untrusted_name))

    @dbus_method()
    @wire_errors
    async def ListInstances(self) -> InstanceList:
        return self._instance_rows()

    @dbus_method()
    @wire_errors
    async def GetInstance(self, name: DBusStr) -> DBusObjectPath:
        return instance_path(self._instance(name).name)

    @dbus_method()
    @wire_errors
    async def StartInstance(self, name: DBusStr) -> None:
        inst = self._instance(name)
        await self.auth.require_admin(f"start {inst.name}")
        await inst.start()

    @dbus_method()
    @wire_errors
    async def StopInstance(self, name: DBusStr) -> None:
        inst = self._instance(name)
        await self.auth.require_admin(f"stop {inst.name}")
        await inst.stop()

    @dbus_method()
    @wire_errors
    async def StopAll(self) -> None:
        """Stop every running instance gracefully, in parallel (system shutdown)."""
        await self.auth.require_admin("stop all instances")
        await self.sup.stop_all()

    @dbus_method()
    @wire_errors
    async def CreateInstance(
        self, name: DBusStr, application: DBusStr, resources: StrList, options: OptionDict
    ) -> DBusObjectPath:
        untrusted_name = validate.name("name", name)
        untrusted_app = validate.name("application", application)
        untrusted_resources = validate.names("resources", resources)
        untrusted_options = validate.options(options)
        await self.auth.require_admin(f"create {untrusted_name}")
        inst = self.sup.create_instance(
            untrusted_name, untrusted_app, untrusted_resources, untrusted_options
        )
        return instance_path(inst.name)

    @dbus_method()
    @wire_errors
    async def DeleteInstance(self, name: DBusStr) -> None:
        inst = self._instance(name)
        await self.auth.require_admin(f"delete {inst.name}")
        self.sup.delete_instance(inst.name)

    @dbus_method()
    @wire_errors
    async def Reload(self) -> None:
        await self.auth.require_admin("reload")
        self.sup.reload()

    @dbus_method()
    @wire_errors
    async def ListApplications(self) -> AppList:
        return [[a.name, a.command] for a in self.sup.config.applications.values()]

    @dbus_method()
    @wire_errors
    async def ListResources(self) -> ResourceList:
        return [[r.name, r.type, r.summary()] for r in self.sup.config.resources.values()]

    # -- grants -----------------------------------------------------------------

    @dbus_method()
    @wire_errors
    async def Grant(
        self, instance: DBusStr, resource: DBusStr, options: OptionDict
    ) -> DBusObjectPath:
        inst = self._instance(instance)
        untrusted_resource = validate.string("resource", resource)
        access, lifetime, expires = validate.grant_options(options, time.time_ns() // 1000)
        await self.auth.require_admin(f"grant {untrusted_resource[:200]} to {inst.name}")
        g = await self.hub.grants.create(
            inst.name, untrusted_resource, access, lifetime, expires, origin="user"
        )
        return grant_path(g.id)

    @dbus_method()
    @wire_errors
    async def ListGrants(self) -> GrantList:
        return [
            [g.id, g.instance, g.resource, g.access, g.lifetime, grant_path(g.id)]
            for g in self.hub.grants.grants.values()
        ]

    @dbus_method()
    @wire_errors
    async def RequestGrant(
        self, instance: DBusStr, resource: DBusStr, options: OptionDict
    ) -> DBusObjectPath:
        inst = self._instance(instance)
        untrusted_resource = validate.string("resource", resource)
        access, lifetime, expires = validate.grant_options(options, time.time_ns() // 1000)
        await self.auth.require_admin(f"request {untrusted_resource[:200]} for {inst.name}")
        req = self.hub.broker.submit(
            inst.name,
            inst.definition.application,
            untrusted_resource,
            access,
            lifetime,
            expires,
            origin="bus",
        )
        return request_path(req.id)

    @dbus_method()
    @wire_errors
    async def RegisterAgent(self, path: DBusObjectPath) -> None:
        await self.auth.require_admin("register the agent")
        sender = current_sender.get()
        assert sender is not None
        await self.hub.register_agent(sender, path)

    @dbus_method()
    @wire_errors
    async def UnregisterAgent(self, path: DBusObjectPath) -> None:
        sender = current_sender.get()
        assert sender is not None
        self.hub.unregister_agent(sender)
