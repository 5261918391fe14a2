"""Golden tests of the QEMU command line (the default guest is built to it).

Regenerate the golden files with ``SPECTRUM_UPDATE_GOLDEN=1 pytest tests/unit/test_qemu_argv.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spectrumd.model.types import Accel
from spectrumd.vmm.base import PORT_CONTROL, PORT_FS, VmSpec
from spectrumd.vmm.qemu import QemuBackend, opt_escape

GOLDEN = Path(__file__).parent / "golden"
backend = QemuBackend()


def spec(**changes: object) -> VmSpec:
    base: dict[str, object] = dict(
        instance="work-shell",
        accel=Accel.tcg,
        memory_mib=256,
        vcpus=1,
        kernel=Path("/usr/lib/spectrum/vmlinuz"),
        initrd=None,
        cmdline="console=ttyS0 quiet",
        run_dir=Path("/run/spectrumd/work-shell"),
    )
    base.update(changes)
    return VmSpec(**base)  # type: ignore[arg-type]


def check_golden(name: str, argv: list[str]) -> None:
    path = GOLDEN / f"qemu-{name}.txt"
    text = "\n".join(argv) + "\n"
    if os.environ.get("SPECTRUM_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"argv differs from {path}"


def test_minimal_tcg() -> None:
    check_golden("minimal-tcg", backend.argv(spec()))


def test_kvm_initrd_4_vcpus_2_ports() -> None:
    argv = backend.argv(
        spec(
            accel=Accel.kvm,
            vcpus=4,
            memory_mib=1024,
            initrd=Path("/usr/lib/spectrum/initrd.img"),
            ports=(PORT_CONTROL, PORT_FS),
        )
    )
    check_golden("kvm-initrd-ports", argv)


def test_commas_in_paths() -> None:
    argv = backend.argv(
        spec(
            kernel=Path("/srv/a,b/vmlinuz"),
            initrd=Path("/srv/a,b/initrd"),
            run_dir=Path("/run/x,y"),
            cmdline="spectrum.cmd=a,b",
        )
    )
    check_golden("commas", argv)
    # -kernel, -initrd and -append are verbatim in QEMU; only QemuOpts values double.
    assert argv[argv.index("-kernel") + 1] == "/srv/a,b/vmlinuz"
    assert argv[argv.index("-append") + 1] == "spectrum.cmd=a,b"
    assert argv[argv.index("-qmp") + 1] == "unix:/run/x,,y/vmm.sock,server=on,wait=off"


def test_binary_override() -> None:
    assert backend.argv(spec(binary="/opt/qemu/bin/qemu"))[0] == "/opt/qemu/bin/qemu"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", ""), ("abc", "abc"), ("a,b", "a,,b"), (",,", ",,,,"), ("/x,/y,", "/x,,/y,,")],
)
def test_opt_escape(value: str, expected: str) -> None:
    assert opt_escape(value) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"kernel": Path("/boot/vm\nlinuz")},
        {"kernel": Path("/boot/vm\0linuz")},
        {"initrd": Path("/boot/init\nrd")},
        {"run_dir": Path("/run/a\nb")},
        {"kernel": Path("relative/vmlinuz")},
        {"cmdline": "console=ttyS0\0"},
        {"run_dir": Path("/run/" + "x" * 100)},  # socket path too long for sun_path
        {"ports": ("a.control", "b.control")},  # both would be control.sock
        {"memory_mib": 0},
        {"arch": "aarch64"},  # binary known, argv not yet
        {"arch": "mips"},
    ],
)
def test_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        backend.argv(spec(**changes))


def test_default_binary() -> None:
    assert backend.default_binary("x86_64") == "qemu-system-x86_64"
    assert backend.default_binary("aarch64") == "qemu-system-aarch64"
    assert backend.default_binary("ppc64le") == "qemu-system-ppc64"
    with pytest.raises(ValueError, match="mips"):
        backend.default_binary("mips")


def test_argv_is_pure() -> None:
    s = spec(ports=(PORT_CONTROL, PORT_FS))
    assert backend.argv(s) == backend.argv(s)
