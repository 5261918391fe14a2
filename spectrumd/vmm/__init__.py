"""VMM backends behind one Protocol, chosen by :class:`VmmKind`."""

from spectrumd.model.types import VmmKind
from spectrumd.vmm.base import (
    PORT_CONTROL,
    PORT_FS,
    PORT_PORTAL,
    VmmBackend,
    VmmControl,
    VmmError,
    VmSpec,
)
from spectrumd.vmm.qemu import QemuBackend

BACKENDS: dict[VmmKind, VmmBackend] = {
    VmmKind.qemu: QemuBackend(),
}

__all__ = [
    "BACKENDS",
    "PORT_CONTROL",
    "PORT_FS",
    "PORT_PORTAL",
    "VmSpec",
    "VmmBackend",
    "VmmControl",
    "VmmError",
]
