"""The QEMU backend's new devices against real QEMU (held at -S; no guest boots).

Network hot-add passes a real tap, made in a network namespace this test
creates and deletes, to QEMU over QMP (getfd with SCM_RIGHTS).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from spectrumd.model.types import Accel, Disk
from spectrumd.supervisor import process
from spectrumd.vmm.base import NetDev, VmmError, VmSpec
from spectrumd.vmm.qemu import QemuBackend, QemuControl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_tap_in_netns(netns: str, name: str) -> int:
    """Open a new tap inside ``netns`` from a thread that setns'd into it."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(ns, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(ns)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            out["fd"] = fd
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return int(out["fd"])


@pytest.fixture
def netns() -> Any:
    name = f"spt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@contextlib.asynccontextmanager
async def start_qemu(spec: VmSpec) -> AsyncIterator[QemuControl]:
    backend = QemuBackend()
    proc = await process.spawn(backend.argv(spec), (), spec.run_dir / "vmm.log", None, {})
    try:
        control = await backend.attach(spec, lambda n, d: None, 15)
        try:
            yield control
        finally:
            with contextlib.suppress(VmmError):
                await control.quit()
            await control.close()
    finally:
        await proc.reap()


def base_spec(run_dir: Path, guest_dir: Path, **changes: Any) -> VmSpec:
    return VmSpec(
        instance="t",
        accel=Accel.tcg,
        memory_mib=128,
        vcpus=1,
        kernel=guest_dir / "vmlinuz",
        initrd=None,
        cmdline="console=ttyS0",
        run_dir=run_dir,
        **changes,
    )


async def test_net_hot_add_real_tap(short_tmp: Path, guest_dir: Path, netns: str) -> None:
    run_dir = short_tmp / f"qd{os.getpid()}"
    run_dir.mkdir(exist_ok=True)
    tap = open_tap_in_netns(netns, "sptap0")
    try:
        spec = base_spec(run_dir, guest_dir, hotplug_slots=1)
        async with start_qemu(spec) as control:
            net = NetDev(id="net0", tap_fd=tap, tap_name="sptap0", mac="02:00:00:00:00:07")
            await control.add_net(net)
            info = await control.execute("human-monitor-command", {"command-line": "info network"})
            assert "net0-dev" in info and "02:00:00:00:00:07" in info, info
            assert "net0:" in info and "fd=" in info, info
            # On the root port (its bus is numbered only once firmware runs,
            # so query-pci cannot list it yet): ask QOM.
            bus = await control.execute(
                "qom-get", {"path": "/machine/peripheral/net0-dev", "property": "parent_bus"}
            )
            assert "hp0" in bus, bus
            # No free slot left: a second device is refused before anything happens.
            with pytest.raises(VmmError, match="no free hot-plug slot"):
                await control.add_net(attrs_evolve(net, id="net1"))
            # A guest held at -S cannot release the device: bounded, and said so.
            with pytest.raises(VmmError, match="did not release"):
                await control.remove_net("net0", timeout=1.0)
    finally:
        os.close(tap)
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_root_image_pmem_and_disks_real_qemu(short_tmp: Path, guest_dir: Path) -> None:
    run_dir = short_tmp / f"qp{os.getpid()}"
    run_dir.mkdir(exist_ok=True)
    root, ro, rw = run_dir / "root.img", run_dir / "ro.img", run_dir / "rw.img"
    for p, size in ((root, 64 << 20), (ro, 1 << 20), (rw, 1 << 20)):
        with open(p, "wb") as f:
            f.truncate(size)
    try:
        spec = base_spec(
            run_dir,
            guest_dir,
            root_image=root,
            root_image_size=64 << 20,
            share_root=True,
            disks=(Disk(ro), Disk(rw, writable=True)),
        )
        async with start_qemu(spec) as control:
            mem = await control.execute("query-memory-devices")
            assert [(m["type"], m["data"]["size"]) for m in mem] == [("virtio-pmem", 64 << 20)]
            blocks = {b["device"]: b for b in await control.execute("query-block")}
            assert blocks["disk0"]["inserted"]["ro"] is True
            assert blocks["disk1"]["inserted"]["ro"] is False
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def attrs_evolve(net: NetDev, **changes: Any) -> NetDev:
    return attrs.evolve(net, **changes)
