"""Immutable value types of the configuration (validated by ``config``)."""

from __future__ import annotations

import enum
from pathlib import Path

import attrs


class VmmKind(enum.StrEnum):
    qemu = "qemu"
    crosvm = "crosvm"


class Accel(enum.StrEnum):
    kvm = "kvm"
    tcg = "tcg"


class Restart(enum.StrEnum):
    no = "no"
    on_failure = "on-failure"


class Arch(enum.StrEnum):
    x86_64 = "x86_64"
    aarch64 = "aarch64"
    ppc64le = "ppc64le"


@attrs.frozen
class Disk:
    path: Path
    writable: bool = False
    # Holds the writable layer over the root image (an ext4 file system)
    # instead of a tmpfs; at most one disk, writable, and only with a root_image.
    overlay: bool = False


@attrs.frozen
class Application:
    """What runs inside a VM. No kernel/initrd means the embedded default guest."""

    name: str
    command: str
    memory_mib: int = 256
    vcpus: int = 1
    kernel: Path | None = None
    initrd: Path | None = None
    params: str = ""
    arch: Arch = Arch.x86_64
    # A root file-system image, attached read-only; with share_root, mapped so
    # that every instance of the application shares its page cache (pmem/DAX).
    root_image: Path | None = None
    share_root: bool = False
    disks: tuple[Disk, ...] = ()


@attrs.frozen
class NetworkResource:
    name: str
    host_address: str | None = None

    type = "network"

    def summary(self) -> str:
        if self.host_address:
            return f"network, host at {self.host_address}"
        return "isolated network"


@attrs.frozen
class DirectoryResource:
    name: str
    path: Path
    writable: bool = False

    type = "directory"

    def summary(self) -> str:
        return f"{self.path} ({'read-write' if self.writable else 'read-only'})"


@attrs.frozen
class UsbResource:
    """USB devices matched by identity (lower-case hex ids, optional serial)."""

    name: str
    vendor: str
    product: str
    serial: str | None = None

    type = "usb"

    def summary(self) -> str:
        ident = f"{self.vendor}:{self.product}"
        return f"USB {ident}" + (f" serial {self.serial}" if self.serial else "")


@attrs.frozen
class WaylandResource:
    """A Wayland compositor socket, given to the guest through virtio-wl."""

    name: str
    path: Path

    type = "wayland"

    def summary(self) -> str:
        return f"Wayland socket {self.path}"


Resource = NetworkResource | DirectoryResource | UsbResource | WaylandResource
RESOURCE_TYPES = ("network", "directory", "usb", "wayland")


@attrs.frozen
class InstanceDef:
    """An application mapped to the resources it may use, with VMM choices resolved."""

    name: str
    application: str
    resources: tuple[str, ...]
    vmm: VmmKind
    accel: Accel
    stop_timeout: float
    # "config" for instances of the configuration file, "runtime" for CreateInstance.
    origin: str = "config"
    restart: Restart = Restart.no
