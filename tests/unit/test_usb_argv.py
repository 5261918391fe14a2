"""The xHCI controller on the command lines (golden for QEMU; crosvm has its own)."""

from __future__ import annotations

from spectrumd.model.types import Accel
from spectrumd.vmm.crosvm import CrosvmBackend
from spectrumd.vmm.qemu import QemuBackend
from tests.unit.test_qemu_argv import check_golden, spec


def test_qemu_xhci_only_when_asked() -> None:
    argv = QemuBackend().argv(spec(usb=True, hotplug_slots=2))
    check_golden("usb", argv)
    assert argv[-2:] == ["-device", "qemu-xhci,id=xhci"]
    assert not any("xhci" in a for a in QemuBackend().argv(spec()))
    for arch in ("aarch64", "ppc64le"):
        assert "qemu-xhci,id=xhci" in QemuBackend().argv(spec(usb=True, arch=arch))


def test_crosvm_has_its_own_controller() -> None:
    kvm = spec(accel=Accel.kvm)
    assert CrosvmBackend().argv(spec(accel=Accel.kvm, usb=True)) == CrosvmBackend().argv(kvm)
