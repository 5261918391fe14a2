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


Resource = NetworkResource | DirectoryResource


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
