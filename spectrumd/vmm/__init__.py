"""VMM backends behind one Protocol, chosen by :class:`VmmKind`."""

import shutil

from spectrumd.model.types import VmmKind
from spectrumd.vmm.base import (
    PORT_CONTROL,
    PORT_PORTAL,
    VmmBackend,
    VmmControl,
    VmmError,
    VmSpec,
)
from spectrumd.vmm.crosvm import CrosvmBackend
from spectrumd.vmm.qemu import QemuBackend

BACKENDS: dict[VmmKind, VmmBackend] = {
    VmmKind.qemu: QemuBackend(),
    VmmKind.crosvm: CrosvmBackend(),
}


def crosvm_available() -> bool:
    """Whether a ``crosvm`` binary is on the daemon's PATH."""
    return shutil.which(BACKENDS[VmmKind.crosvm].default_binary("x86_64")) is not None


__all__ = [
    "BACKENDS",
    "PORT_CONTROL",
    "PORT_PORTAL",
    "VmSpec",
    "VmmBackend",
    "VmmControl",
    "VmmError",
    "crosvm_available",
]
