"""Golden tests of the crosvm command line, each option checked against upstream's grammar.

The grammar (tests/crosvm/grammar.py) is FACTS.md's, plus three keys read in
crosvm's source. Regenerate the golden files with
``SPECTRUM_UPDATE_GOLDEN=1 pytest tests/unit/test_crosvm_argv.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spectrumd.model.types import Accel, Disk
from spectrumd.vmm.base import PORT_CONTROL, PORT_PORTAL, NetDev, VmSpec
from spectrumd.vmm.crosvm import CrosvmBackend
from tests.crosvm.grammar import GrammarError, parse_kv, parse_run

GOLDEN = Path(__file__).parent / "golden"
backend = CrosvmBackend()
RUN = Path("/run/spectrumd/work-shell")


def spec(**changes: object) -> VmSpec:
    base: dict[str, object] = dict(
        instance="work-shell",
        accel=Accel.kvm,
        memory_mib=256,
        vcpus=1,
        kernel=Path("/usr/lib/spectrum/vmlinuz"),
        initrd=None,
        cmdline="console=ttyS0 quiet",
        run_dir=RUN,
    )
    base.update(changes)
    return VmSpec(**base)  # type: ignore[arg-type]


def check(name: str, argv: list[str]) -> dict[str, list[object]]:
    path = GOLDEN / f"crosvm-{name}.txt"
    text = "\n".join(argv) + "\n"
    if os.environ.get("SPECTRUM_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"argv differs from {path}"
    assert argv[1] == "run"
    return parse_run(argv[2:])  # every option against the grammar


FULL = dict(
    vcpus=2,
    memory_mib=1024,
    initrd=Path("/usr/lib/spectrum/initrd.img"),
    cmdline="console=ttyS0 panic=-1 quiet spectrum.x=1",
    ports=(PORT_CONTROL, PORT_PORTAL),
    root_image=Path("/srv/app/root.img"),
    root_image_size=64 << 20,
    disks=(Disk(Path("/srv/ro.img")), Disk(Path("/srv/rw.img"), writable=True)),
    nets=(NetDev(id="net0", tap_fd=7, tap_name="sp-work0", mac="02:00:00:00:00:01"),),
    wayland_sockets=(Path("/run/user/1000/wayland-0"),),
    hotplug_slots=2,
)


def test_minimal() -> None:
    opts = check("minimal", backend.argv(spec()))
    assert opts["--mem"] == [256] and opts["--cpus"] == [1]
    assert opts["--socket"] == [str(RUN / "vmm" / "vmm.sock")]
    assert opts["--serial"] == [
        {
            "type": "unix-stream",
            "hardware": "serial",
            "num": 1,
            "path": str(RUN / "vmm" / "console.sock"),
            "console": True,
        },
        {
            "type": "unix-stream",
            "hardware": "virtio-console",
            "num": 1,
            "name": PORT_CONTROL,
            "input-unix-stream": True,
            "path": str(RUN / "vmm" / "control.sock"),
        },
    ]
    assert opts["kernel"] == ["/usr/lib/spectrum/vmlinuz"]
    assert "--initrd" not in opts and "--block" not in opts


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_full(arch: str) -> None:
    opts = check(f"full-{arch}", backend.argv(spec(arch=arch, **FULL)))
    assert opts["--initrd"] == ["/usr/lib/spectrum/initrd.img"]
    assert opts["--params"] == ["console=ttyS0 panic=-1 quiet spectrum.x=1"]
    assert opts["--block"] == [
        {"path": "/srv/app/root.img", "ro": True},
        {"path": "/srv/ro.img", "ro": True},
        {"path": "/srv/rw.img"},
    ]
    assert opts["--net"] == [{"tap-fd": 7, "mac": "02:00:00:00:00:01"}]
    assert opts["--wayland-sock"] == [{"path": "/run/user/1000/wayland-0"}]
    assert opts["--pci-hotplug-slots"] == [2]
    names = [s["name"] for s in opts["--serial"] if "name" in s]  # type: ignore[index, operator]
    assert names == [PORT_CONTROL, PORT_PORTAL]
    nums = [s["num"] for s in opts["--serial"] if s["hardware"] == "virtio-console"]  # type: ignore[index]
    assert nums == [1, 2]


def test_shared_root_is_pmem_read_only() -> None:
    opts = check("pmem", backend.argv(spec(**{**FULL, "share_root": True})))
    assert opts["--pmem"] == [{"path": "/srv/app/root.img", "ro": True}]
    assert {"path": "/srv/app/root.img", "ro": True} not in opts["--block"]


def test_argv_is_pure_and_the_kernel_is_last() -> None:
    s = spec(**FULL)
    assert backend.argv(s) == backend.argv(s)
    assert backend.argv(s)[-1] == "/usr/lib/spectrum/vmlinuz"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "ppc64le"}, "crosvm does not support ppc64le; use vmm qemu"),
        ({"arch": "mips"}, "does not know architecture 'mips'"),
        ({"accel": Accel.tcg}, "only with KVM"),
        ({"disks": (Disk(Path("/srv/a,b.img")),)}, "cannot take"),
        ({"root_image": Path("/srv/x=y")}, "cannot take"),
        ({"run_dir": Path("/run/a,b")}, "cannot take"),
        ({"run_dir": Path("/run/" + "x" * 100)}, "longer than"),
        ({"kernel": Path("vmlinuz")}, "not absolute"),
        ({"ports": ("a", "b", "c", "d", "e")}, "at most 4"),
        ({"ports": ("bad,name",)}, "bad port name"),
        ({"memory_mib": 0}, "bad VM size"),
        (
            {"nets": (NetDev(id="n", tap_fd=-1, tap_name="t", mac="02:00:00:00:00:01"),)},
            "bad network",
        ),
    ],
)
def test_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend.argv(spec(**changes))


def test_default_binary_and_console() -> None:
    assert backend.default_binary("x86_64") == backend.default_binary("aarch64") == "crosvm"
    with pytest.raises(ValueError, match="ppc64le"):
        backend.default_binary("ppc64le")
    assert backend.kernel_console("aarch64") == "ttyS0"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--serial", "type=tcp,path=/x"),
        ("--serial", "type=unix-stream,num=5,path=/x"),
        ("--serial", "type=unix-stream,hardware=virtio-console,colour=red"),
        ("--block", "/x,ro=yes"),
        ("--net", "tap-fd=x"),
        ("--pmem", "relative.img"),
    ],
)
def test_grammar_refuses_what_crosvm_refuses(option: str, value: str) -> None:
    with pytest.raises(GrammarError):
        parse_kv(option, value)


def test_grammar_refuses_run_level_mistakes() -> None:
    for args in (
        ["--socket", "/s"],  # no kernel
        ["/k", "--mem", "1"],  # the kernel is not last
        ["--usb", "x", "/k"],  # no such option: USB is hot-attached only
        ["--serial", "type=file,path=/a,console", "--serial", "type=sink,num=2,console", "/k"],
        ["--net", "mac=02:00:00:00:00:01", "/k"],
    ):
        with pytest.raises(GrammarError):
            parse_run(args)


def test_exit_reasons() -> None:
    assert backend.exit_reason(0) == (True, "the guest powered off")
    assert backend.exit_reason(34) == (False, "the guest panicked")
    assert backend.exit_reason(1) is None


def test_virtiofs_vhost_user_fs() -> None:
    opts = check("virtiofs", backend.argv(spec(fs_fd=9)))
    assert opts["--vhost-user"] == [{"path": "fs", "socket": str(RUN / "vmm" / "fs-vhost.sock")}]
