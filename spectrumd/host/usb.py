"""The host's USB devices: read from sysfs, kept current by kernel uevents, held by instances.

The device table is read from ``SYSFS_ROOT`` (``/sys/bus/usb/devices``): one
entry per device, named by the kernel ``BUS-PORT[.PORT...]`` (``1-1.2``);
root hubs (``usb1``) and interfaces (``1-1.2:1.0``) are not devices one can
pass through, nor are hubs (class 09). A device's node is
``DEV_ROOT/BBB/DDD`` (``/dev/bus/usb/001/004``), from its ``busnum`` and
``devnum``. Both roots are configurable so that tests use a synthetic tree.

Identity (``usb_ids``) does not depend on bus or device numbers. Every string
a device reports (manufacturer, product, serial) is the device's own and
untrusted: descriptions are cleaned, serials are percent-encoded in ids.

A device belongs to at most one instance at a time (:meth:`UsbHost.claim`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import attrs

from spectrumd.errors import Busy, Failed, NoSuchResource
from spectrumd.host import usb_ids
from spectrumd.host.usb_uevent import UeventMonitor, parse_uevent

log = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = Path("/sys/bus/usb/devices")
DEFAULT_DEV_ROOT = Path("/dev/bus/usb")
HUB_CLASS = "09"
MAX_DESCRIPTION = 128
_DEVICE_NAME = re.compile(r"([0-9]{1,3})-([0-9]{1,3}(?:\.[0-9]{1,3}){0,6})")
_ROOT_HUB = re.compile(r"usb[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

DeviceListener = Callable[["UsbDevice"], None]


@attrs.frozen
class UsbDevice:
    id: str
    sysname: str  # the kernel's name, e.g. "1-1.2"; changes with the bus number
    vendor: str
    product: str
    serial: str  # "" when the device has none
    description: str
    location: str  # controller and hub ports, e.g. "0000:00:14.0-1.2"
    busnum: int
    devnum: int
    dev: str = ""  # "major:minor" of the node, from sysfs

    @property
    def location_id(self) -> str:
        return usb_ids.location_id(self.vendor, self.product, self.location)

    def node(self, dev_root: Path) -> Path:
        return dev_root / f"{self.busnum:03d}" / f"{self.devnum:03d}"


def _attr(entry: Path, name: str) -> str:
    try:
        return (entry / name).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _clean(text: str) -> str:
    return _CONTROL.sub("?", text).strip()[:MAX_DESCRIPTION]


def _location(entry: Path, ports: str) -> str:
    """The controller (parent of the root hub ``usbN``) and the port chain."""
    parts = entry.resolve().parts
    controller = ""
    for i in range(len(parts) - 1, 0, -1):
        if _ROOT_HUB.fullmatch(parts[i]):
            controller = parts[i - 1]
            break
    return usb_ids.clean_location(controller, ports)


def read_device(sysfs_root: Path, sysname: str) -> UsbDevice | None:
    """The device ``sysname`` as sysfs shows it now; None if absent or not passable."""
    m = _DEVICE_NAME.fullmatch(sysname)
    if m is None:
        return None
    entry = sysfs_root / sysname
    vendor, product = _attr(entry, "idVendor").lower(), _attr(entry, "idProduct").lower()
    busnum, devnum = _attr(entry, "busnum"), _attr(entry, "devnum")
    if not (
        usb_ids.HEX4.fullmatch(vendor)
        and usb_ids.HEX4.fullmatch(product)
        and busnum.isdigit()
        and devnum.isdigit()
    ):
        return None
    if _attr(entry, "bDeviceClass") == HUB_CLASS:
        return None
    serial = _clean(_attr(entry, "serial"))
    words = " ".join(w for w in (_attr(entry, "manufacturer"), _attr(entry, "product")) if w)
    description = _clean(words) or f"USB device {vendor}:{product}"
    location = _location(entry, m.group(2))
    ident = (
        usb_ids.serial_id(vendor, product, serial)
        if serial
        else usb_ids.location_id(vendor, product, location)
    )
    return UsbDevice(
        id=ident,
        sysname=sysname,
        vendor=vendor,
        product=product,
        serial=serial,
        description=description,
        location=location,
        busnum=int(busnum),
        devnum=int(devnum),
        dev=_attr(entry, "dev"),
    )


def scan(sysfs_root: Path) -> list[UsbDevice]:
    """Every passable device under ``sysfs_root``, in the kernel's name order."""
    try:
        names = sorted(os.listdir(sysfs_root))
    except FileNotFoundError:
        return []
    except OSError as e:
        log.error("cannot list USB devices in %s: %s", sysfs_root, e.strerror)
        return []
    return [d for d in (read_device(sysfs_root, n) for n in names) if d is not None]


class UsbHost:
    """The current USB devices by id, who holds each, and their hotplug."""

    def __init__(
        self, sysfs_root: Path = DEFAULT_SYSFS_ROOT, dev_root: Path = DEFAULT_DEV_ROOT
    ) -> None:
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.devices: dict[str, UsbDevice] = {}
        self._by_sysname: dict[str, str] = {}
        self._holders: dict[str, str] = {}
        self.on_added: list[DeviceListener] = []
        self.on_removed: list[DeviceListener] = []
        self._monitor: UeventMonitor | None = None

    # -- hotplug ------------------------------------------------------------

    async def start(self, listen: bool = True) -> None:
        """Read the device table, and (``listen``) follow kernel uevents.

        A host without uevents (no netlink) keeps the table read at start and
        says so in the log; nothing fails.
        """
        self.rescan()
        if listen:
            monitor = UeventMonitor(self.handle_uevent, self.rescan)
            try:
                monitor.start()
            except OSError as e:
                log.error("cannot listen for USB hotplug (kernel uevents): %s", e)
                return
            self._monitor = monitor
        log.info("%d USB devices in %s", len(self.devices), self.sysfs_root)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    def handle_uevent(self, data: bytes) -> None:
        """Apply one kernel uevent datagram (the netlink socket's and the tests' way in).

        The event only names a device; sysfs says whether it is there and what it is.
        """
        ev = parse_uevent(data)
        if ev is None or ev.subsystem != "usb" or ev.devtype != "usb_device":
            return
        sysname = ev.devpath.rsplit("/", 1)[-1]
        if _DEVICE_NAME.fullmatch(sysname) is None:
            return
        if ev.action in ("add", "change", "bind", "remove"):
            self._refresh(sysname)

    def rescan(self) -> None:
        """Re-read every device (at start, and after lost uevents)."""
        present = {d.sysname: d for d in scan(self.sysfs_root)}
        for sysname in list(self._by_sysname):
            if sysname not in present:
                self._remove(sysname)
        for sysname in present:
            self._refresh(sysname, present[sysname])

    def _refresh(self, sysname: str, dev: UsbDevice | None = None) -> None:
        if dev is None:
            dev = read_device(self.sysfs_root, sysname)
        known_id = self._by_sysname.get(sysname)
        known = self.devices.get(known_id) if known_id else None
        if known is not None and dev is not None and _same(known, dev):
            return
        if known is not None:
            self._remove(sysname)
        if dev is not None:
            self._add(dev)

    def _add(self, dev: UsbDevice) -> None:
        if dev.id in self.devices:
            # Two devices with one serial (it happens): the later one gets its location id.
            dev = attrs.evolve(dev, id=dev.location_id)
            if dev.id in self.devices:
                log.warning("USB device %s appears twice; ignoring %s", dev.id, dev.sysname)
                return
        self.devices[dev.id] = dev
        self._by_sysname[dev.sysname] = dev.id
        log.info("USB device %s: %s (%s)", dev.id, dev.description, dev.sysname)
        for cb in list(self.on_added):
            cb(dev)

    def _remove(self, sysname: str) -> None:
        dev_id = self._by_sysname.pop(sysname, None)
        dev = self.devices.pop(dev_id, None) if dev_id else None
        if dev is None:
            return
        log.info("USB device %s removed (%s)", dev.id, sysname)
        for cb in list(self.on_removed):
            cb(dev)

    # -- lookups and holders ---------------------------------------------------

    def get(self, untrusted_id: str) -> UsbDevice:
        """The present device ``untrusted_id``. Raises InvalidArgument, NoSuchResource."""
        dev_id = usb_ids.check_id(untrusted_id)
        dev = self.devices.get(dev_id)
        if dev is None:
            raise NoSuchResource(f'no USB device "{dev_id}" (is it plugged in?)')
        return dev

    def holder(self, dev_id: str) -> str:
        """The instance that holds ``dev_id``, or ""."""
        return self._holders.get(dev_id, "")

    def claim(self, dev_id: str, instance: str) -> None:
        """Make ``instance`` the holder. Raises Busy naming the current holder."""
        holder = self._holders.get(dev_id)
        if holder is not None:
            raise Busy(f'USB device {dev_id} is attached to "{holder}"')
        self._holders[dev_id] = instance

    def release(self, dev_id: str, instance: str) -> None:
        if self._holders.get(dev_id) == instance:
            del self._holders[dev_id]

    def open(self, dev: UsbDevice) -> int:
        """Open the device's node read-write (O_CLOEXEC); the caller closes it.

        Raises NoSuchResource if the device is gone (its node or sysfs entry),
        Failed if the node cannot be opened or is not this device.
        """
        path = dev.node(self.dev_root)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            raise NoSuchResource(f"USB device {dev.id} is gone: {path} does not exist") from None
        except OSError as e:
            raise Failed(f"cannot open {path} for USB device {dev.id}: {e.strerror}") from None
        try:
            self._check_node(dev, path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_node(self, dev: UsbDevice, path: Path, st: os.stat_result) -> None:
        # Device numbers are reused: between the uevent and the open, another
        # device may have taken this node. sysfs and the node must agree.
        now = read_device(self.sysfs_root, dev.sysname)
        if now is None or not _same(now, dev):
            raise NoSuchResource(f"USB device {dev.id} is gone (unplugged during the attach)")
        if stat.S_ISCHR(st.st_mode):
            if dev.dev and dev.dev != f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}":
                raise Failed(f"{path} is not USB device {dev.id} (device numbers differ)")
        elif not stat.S_ISREG(st.st_mode):  # a regular file: a synthetic tree in tests
            raise Failed(f"{path} is not a device node")


def _same(a: UsbDevice, b: UsbDevice) -> bool:
    """The same plugged-in device (ids may differ only by the duplicate-serial rule)."""
    return attrs.evolve(a, id="") == attrs.evolve(b, id="")
