"""USB on D-Bus: ``Manager.ListUsbDevices`` and the USB signals, ``Instance.AttachUsb``
and ``Instance.DetachUsb``.

They are base classes of the Manager and Instance interfaces (dbus-fast
collects members through the class hierarchy), so each interface keeps one name.
Changes are signals on the Manager rather than properties: devices come and
go, and a client that lists once and then follows four signals stays exact.
"""

from typing import Annotated

from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from spectrumd.bus import validate
from spectrumd.bus.auth import CallerCheck
from spectrumd.bus.errors import wire_errors
from spectrumd.errors import Failed
from spectrumd.supervisor import Instance
from spectrumd.supervisor.usb import UsbService

UsbList = Annotated[list[list[str]], DBusSignature("a(ssssss)")]
IdAndInstance = Annotated[list[str], DBusSignature("ss")]


def _service(usb: UsbService | None) -> UsbService:
    if usb is None:
        raise Failed("USB passthrough is not available in this daemon")
    return usb


class UsbManagerMixin(ServiceInterface):
    """Manager members; the class that mixes it in sets ``usb`` and calls ``connect_usb``."""

    usb: UsbService | None = None

    def connect_usb(self, usb: UsbService) -> None:
        self.usb = usb
        usb.on_plugged.append(self.UsbDeviceAdded)
        usb.on_unplugged.append(self.UsbDeviceRemoved)
        usb.on_attached.append(lambda dev_id, name: self.UsbDeviceAttached(dev_id, name))
        usb.on_detached.append(lambda dev_id, name: self.UsbDeviceDetached(dev_id, name))

    @dbus_method()
    @wire_errors
    async def ListUsbDevices(self) -> UsbList:
        """(id, vendor, product, serial, description, holder instance or "")."""
        return _service(self.usb).rows()

    @dbus_signal()
    def UsbDeviceAdded(self, dev_id: str) -> DBusStr:
        return dev_id

    @dbus_signal()
    def UsbDeviceRemoved(self, dev_id: str) -> DBusStr:
        return dev_id

    @dbus_signal()
    def UsbDeviceAttached(self, dev_id: str, instance: str) -> IdAndInstance:
        return [dev_id, instance]

    @dbus_signal()
    def UsbDeviceDetached(self, dev_id: str, instance: str) -> IdAndInstance:
        return [dev_id, instance]


class UsbInstanceMixin(ServiceInterface):
    """Instance members; the class that mixes it in sets these attributes."""

    inst: Instance
    _auth: CallerCheck
    _usb: UsbService | None = None

    # Whether the instance can take the call now is the supervisor's (its table).
    @dbus_method()
    @wire_errors
    async def AttachUsb(self, id: DBusStr) -> None:
        untrusted_id = validate.string("id", id)
        usb = _service(self._usb)
        await self._auth.require_admin(f"attach USB device {untrusted_id[:80]} to {self.inst.name}")
        await usb.attach_to(self.inst, untrusted_id)

    @dbus_method()
    @wire_errors
    async def DetachUsb(self, id: DBusStr) -> None:
        untrusted_id = validate.string("id", id)
        usb = _service(self._usb)
        await self._auth.require_admin(
            f"detach USB device {untrusted_id[:80]} from {self.inst.name}"
        )
        await usb.detach_from(self.inst, untrusted_id)
