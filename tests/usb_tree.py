"""A synthetic USB host for tests: a sysfs tree as the kernel lays it out, and device nodes.

``ROOT/sys/devices/pci0000:00/CONTROLLER/usbB/B-P[.P]`` holds the attributes;
``ROOT/sys/bus/usb/devices/B-P`` links to it; ``ROOT/dev/bus/usb/BBB/DDD`` is
a regular file holding an 18-byte device descriptor (usbfs gives that first
on read), so opening it works and a VMM can tell which device it got.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path


def descriptor(vendor: str, product: str) -> bytes:
    return struct.pack(
        "<BBHBBBBHHHBBBB", 18, 1, 0x200, 0, 0, 0, 64, int(vendor, 16), int(product, 16), 0x100, 1,
        2, 3, 1,
    )  # fmt: skip


class UsbTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sysfs = root / "sys" / "bus" / "usb" / "devices"
        self.devices = root / "sys" / "devices" / "pci0000:00"
        self.dev = root / "dev" / "bus" / "usb"
        self.sysfs.mkdir(parents=True, exist_ok=True)
        self.dev.mkdir(parents=True, exist_ok=True)
        self._next_devnum: dict[int, int] = {}

    def _link(self, name: str, target: Path) -> None:
        link = self.sysfs / name
        link.symlink_to(Path("../../..") / target.relative_to(self.root / "sys"))

    def root_hub(self, bus: int, controller: str = "0000:00:14.0") -> Path:
        hub = self.devices / controller / f"usb{bus}"
        if not hub.exists():
            hub.mkdir(parents=True)
            for k, v in (("idVendor", "1d6b"), ("idProduct", "0002"), ("bDeviceClass", "09")):
                (hub / k).write_text(v + "\n")
            (hub / "busnum").write_text(f"{bus}\n")
            (hub / "devnum").write_text("1\n")
            self._link(f"usb{bus}", hub)
        return hub

    def plug(
        self,
        vendor: str,
        product: str,
        serial: str | None = None,
        *,
        bus: int = 1,
        ports: str = "1",
        controller: str = "0000:00:14.0",
        manufacturer: str | None = "Acme",
        name: str | None = "Widget",
        device_class: str = "00",
        node: bool = True,
    ) -> str:
        """Plug a device in; returns its kernel name (``B-P``)."""
        hub = self.root_hub(bus, controller)
        sysname = f"{bus}-{ports}"
        parent = hub
        chain = ports.split(".")
        for i in range(1, len(chain)):
            parent = parent / f"{bus}-{'.'.join(chain[:i])}"
        entry = parent / sysname
        entry.mkdir(parents=True)
        devnum = self._next_devnum.get(bus, 2)
        self._next_devnum[bus] = devnum + 1
        attrs = {
            "idVendor": vendor,
            "idProduct": product,
            "busnum": str(bus),
            "devnum": str(devnum),
            "bDeviceClass": device_class,
            "dev": f"189:{(bus - 1) * 128 + devnum - 1}",
        }
        if serial is not None:
            attrs["serial"] = serial
        if manufacturer is not None:
            attrs["manufacturer"] = manufacturer
        if name is not None:
            attrs["product"] = name
        for k, v in attrs.items():
            (entry / k).write_text(v + "\n")
        # An interface, as the kernel lists it next to the device.
        (entry / f"{sysname}:1.0").mkdir()
        self._link(f"{sysname}:1.0", entry / f"{sysname}:1.0")
        self._link(sysname, entry)
        if node:
            path = self.node(bus, devnum)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(descriptor(vendor, product))
        return sysname

    def node(self, bus: int, devnum: int) -> Path:
        return self.dev / f"{bus:03d}" / f"{devnum:03d}"

    def unplug(self, sysname: str) -> None:
        link = self.sysfs / sysname
        entry = link.resolve()
        bus = int((entry / "busnum").read_text())
        devnum = int((entry / "devnum").read_text())
        for extra in self.sysfs.glob(f"{sysname}:*"):
            extra.unlink()
        link.unlink()
        shutil.rmtree(entry)
        self.node(bus, devnum).unlink(missing_ok=True)

    def devpath(self, sysname: str) -> str:
        return "/" + str((self.sysfs / sysname).resolve().relative_to(self.root / "sys"))

    def uevent(self, action: str, sysname: str, devpath: str | None = None) -> bytes:
        """The kernel's datagram for ``action`` on the device (lib/kobject_uevent.c)."""
        path = devpath or self.devpath(sysname)
        fields = [
            f"{action}@{path}",
            f"ACTION={action}",
            f"DEVPATH={path}",
            "SUBSYSTEM=usb",
            "DEVTYPE=usb_device",
            "SEQNUM=4242",
        ]
        return "\0".join(fields).encode() + b"\0"
