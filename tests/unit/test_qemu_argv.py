"""Golden tests of the QEMU command line (the default guest is built to it).

Regenerate the golden files with ``SPECTRUM_UPDATE_GOLDEN=1 pytest tests/unit/test_qemu_argv.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spectrumd.model.types import Accel, Disk
from spectrumd.vmm.base import PORT_CONTROL, PORT_PORTAL, VmSpec
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
            ports=(PORT_CONTROL, PORT_PORTAL),
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
        {"arch": "mips"},
        {"wayland_sockets": (Path("/run/user/1000/wayland-0"),)},  # QEMU has no virtio-wl
        # virtio-pmem: x86 only in QEMU 7.2, and whole 2 MiB pages
        {
            "arch": "aarch64",
            "root_image": Path("/r.img"),
            "root_image_size": 1 << 26,
            "share_root": True,
        },
        {"root_image": Path("/r.img"), "root_image_size": (1 << 26) + 4096, "share_root": True},
        {"root_image": Path("/r.img"), "root_image_size": 0, "share_root": True},
    ],
)
def test_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        backend.argv(spec(**changes))


def test_aarch64_tcg() -> None:
    argv = backend.argv(spec(arch="aarch64", cmdline="console=ttyAMA0 quiet"))
    check_golden("aarch64-tcg", argv)
    assert "-bios" not in argv
    assert argv[argv.index("-machine") + 1] == "virt,gic-version=max"


def test_aarch64_kvm_disks() -> None:
    argv = backend.argv(
        spec(
            arch="aarch64",
            accel=Accel.kvm,
            root_image=Path("/srv/app/root.img"),
            disks=(Disk(Path("/srv/data.img"), writable=True),),
            hotplug_slots=2,
        )
    )
    check_golden("aarch64-kvm-disks", argv)
    assert argv[argv.index("-cpu") + 1] == "host"


def test_ppc64le_kvm_hv() -> None:
    argv = backend.argv(spec(arch="ppc64le", accel=Accel.kvm, cmdline="console=hvc0"))
    check_golden("ppc64le-kvm", argv)
    assert argv[0] == "qemu-system-ppc64"
    assert argv[argv.index("-machine") + 1] == "pseries,kvm-type=HV"


def test_ppc64le_tcg_uses_the_machine_cpu() -> None:
    argv = backend.argv(spec(arch="ppc64le", hotplug_slots=2))
    check_golden("ppc64le-tcg", argv)
    assert "-cpu" not in argv
    assert not any("pcie-root-port" in a for a in argv)  # the PHB takes hot-plugged devices


def test_x86_root_image_shared_and_disks() -> None:
    argv = backend.argv(
        spec(
            root_image=Path("/srv/app/root.img"),
            root_image_size=64 << 20,
            share_root=True,
            disks=(Disk(Path("/srv/a,b.img")), Disk(Path("/srv/rw.img"), writable=True)),
            hotplug_slots=1,
        )
    )
    check_golden("x86-pmem-disks", argv)
    assert argv[argv.index("-m") + 1] == "256M,slots=1,maxmem=320M"
    assert "file=/srv/a,,b.img,if=none,id=disk0,format=raw,readonly=on" in argv


def test_x86_root_image_not_shared_is_a_readonly_disk() -> None:
    argv = backend.argv(spec(root_image=Path("/srv/app/root.img"), root_image_size=1 << 20))
    assert "file=/srv/app/root.img,if=none,id=root,format=raw,readonly=on" in argv
    assert argv[argv.index("-m") + 1] == "256M"


def test_kernel_console() -> None:
    assert [backend.kernel_console(a) for a in ("x86_64", "aarch64", "ppc64le")] == [
        "ttyS0",
        "ttyAMA0",
        "hvc0",
    ]


def test_default_binary() -> None:
    assert backend.default_binary("x86_64") == "qemu-system-x86_64"
    assert backend.default_binary("aarch64") == "qemu-system-aarch64"
    assert backend.default_binary("ppc64le") == "qemu-system-ppc64"
    with pytest.raises(ValueError, match="mips"):
        backend.default_binary("mips")


def test_argv_is_pure() -> None:
    s = spec(ports=(PORT_CONTROL, PORT_PORTAL))
    assert backend.argv(s) == backend.argv(s)


def test_sockets_the_daemon_made_are_inherited() -> None:
    # What the daemon runs: QMP, the console and every port on listening
    # sockets it made; QEMU is given descriptors and never a path of run_dir.
    s = spec(
        ports=(PORT_CONTROL, PORT_PORTAL),
        listen_fds=(("vmm.sock", 5), ("console.sock", 6), ("control.sock", 7), ("portal.sock", 8)),
    )
    argv = backend.argv(s)
    check_golden("daemon-sockets", argv)
    assert not [a for a in argv if str(s.run_dir) in a]
    assert set(s.pass_fds) == {5, 6, 7, 8}
    assert argv[argv.index("-mon") + 1] == "chardev=qmp,mode=control"
    assert "socket,id=qmp,fd=5,server=on,wait=off" in argv
    assert argv[argv.index("-sandbox") + 1] == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )


def test_virtiofs_shared_memory_and_vhost_user_fs() -> None:
    s = spec(fs_fd=9, nets=())
    argv = backend.argv(s)
    check_golden("virtiofs", argv)
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=mem"
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in argv
    assert "socket,id=fs,fd=9" in argv
    assert "vhost-user-fs-pci,queue-size=1024,chardev=fs,tag=spectrum" in argv
    assert s.pass_fds == (9,)


def test_virtiofs_with_shared_root_keeps_its_memory_slot() -> None:
    argv = backend.argv(
        spec(fs_fd=3, root_image=Path("/srv/r.img"), root_image_size=2 << 20, share_root=True)
    )
    assert argv[argv.index("-m") + 1] == "256M,slots=1,maxmem=258M"
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=mem"


@pytest.mark.parametrize("changes", [{"fs_fd": -1}, {"fs_fd": 3, "fs_tag": ""},
                                     {"fs_fd": 3, "fs_tag": "a,b"}, {"fs_fd": 3, "fs_tag": "x" * 37}])  # fmt: skip
def test_virtiofs_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="virtio-fs"):
        backend.argv(spec(**changes))


def test_disks_the_daemon_opened_are_fd_sets() -> None:
    # A VMM of its own uid cannot open a root-owned disk: the daemon opens it.
    disk = Disk(Path("/srv/data.img"), writable=True)
    s = spec(
        disks=(disk,),
        root_image=Path("/srv/root.img"),
        disk_fds=((Path("/srv/root.img"), (11,)), (disk.path, (12, 13))),
    )
    argv = backend.argv(s)
    assert "fd=11,set=11,opaque=root" in argv and "fd=12,set=12,opaque=disk0" in argv
    assert "fd=13,set=12,opaque=disk0" in argv  # read-write beside read-only, one set
    assert "file=/dev/fdset/11,if=none,id=root,format=raw,readonly=on" in argv
    assert "file=/dev/fdset/12,if=none,id=disk0,format=raw" in argv
    assert not [a for a in argv if "/srv/" in a]
    assert {11, 12, 13} <= set(s.pass_fds)
