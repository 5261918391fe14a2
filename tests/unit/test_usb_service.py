"""UsbService on a synthetic USB host, with a VMM control that records what it is given.

Starts and stops go through the ResourceDriver seam the supervisor uses
(prepare, started, the run's exit stack); hotplug goes through
``UsbHost.handle_uevent``, the netlink socket's own way in.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from spectrumd.errors import Busy, Failed, InvalidArgument, InvalidState, NoSuchResource
from spectrumd.host.usb import UsbHost
from spectrumd.host.usb_ids import UsbMatch
from spectrumd.lifecycle import State
from spectrumd.model.types import (
    Accel,
    Application,
    InstanceDef,
    Resource,
    UsbResource,
    VmmKind,
)
from spectrumd.supervisor.grants import GrantService
from spectrumd.supervisor.resources import RunContext
from spectrumd.supervisor.usb import UsbService
from spectrumd.vmm.base import VmmError, VmSpec
from tests.conftest import unexpected_failure
from tests.usb_tree import UsbTree

pytestmark = pytest.mark.timeout(10)
KEY = UsbResource("key", "1050", "0407")


class FakeControl:
    """Records attaches by port; reads the descriptor through the fd it is given."""

    def __init__(self) -> None:
        self.ports: dict[str, tuple[str, bytes]] = {}
        self.next = 1
        self.refuse: str | None = None

    async def usb_attach(self, fd: int, dev_id: str) -> str:
        if self.refuse:
            raise VmmError(self.refuse)
        desc = os.pread(fd, 18, 0)
        port = str(self.next)
        self.next += 1
        self.ports[port] = (dev_id, desc)
        return port

    async def usb_detach(self, handle: str) -> None:
        if self.ports.pop(handle, None) is None:
            raise VmmError(f"no port {handle}")

    def ids(self) -> list[str]:
        return sorted(d for d, _ in self.ports.values())


class Run:
    def __init__(self, svc: UsbService, name: str, tmp: Path, resources: tuple[Resource, ...]):
        self.control = FakeControl()
        run_dir = tmp / name
        run_dir.mkdir(exist_ok=True)
        self.ctx = RunContext(
            name=name,
            definition=InstanceDef(
                name, "app", tuple(r.name for r in resources), VmmKind.qemu, Accel.tcg, 1.0
            ),
            application=Application("app", "true"),
            resources=resources,
            run_dir=run_dir,
            stack=contextlib.AsyncExitStack(),
            conns=contextlib.AsyncExitStack(),
            fail=unexpected_failure,
            log=logging.getLogger(f"test.{name}"),
        )
        self.svc = svc

    async def start(self) -> Run:
        await self.svc.prepare(self.ctx)
        self.ctx.control = self.control  # type: ignore[assignment]
        spec = VmSpec(
            instance=self.ctx.name, accel=Accel.tcg, memory_mib=64, vcpus=1, kernel=Path("/k"),
            initrd=None, cmdline="", run_dir=self.ctx.run_dir, usb=True,
        )  # fmt: skip
        await self.svc.started(self.ctx, spec)
        return self

    async def stop(self) -> None:
        await self.ctx.stack.aclose()


@pytest.fixture
def tree(tmp_path: Path) -> UsbTree:
    return UsbTree(tmp_path / "host")


@pytest.fixture
def svc(tree: UsbTree) -> UsbService:
    host = UsbHost(tree.sysfs, tree.dev)
    host.rescan()
    return UsbService(host)


def events(svc: UsbService) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    svc.on_attached.append(lambda d, n: seen.append(("attached", d, n)))
    svc.on_detached.append(lambda d, n: seen.append(("detached", d, n)))
    return seen


async def test_attached_at_start_detached_at_stop(svc: UsbService, tree: UsbTree, tmp_path: Path):
    tree.plug("1050", "0407", "A1")
    tree.plug("046d", "c52b", "M1", ports="2")  # matches nothing
    seen = events(svc)
    svc.host.rescan()
    run = await Run(svc, "work", tmp_path, (KEY,)).start()
    assert run.control.ids() == ["1050:0407:A1"]
    # The VMM got a descriptor of the right node (the descriptor names the device).
    (_, desc), = run.control.ports.values()  # fmt: skip
    assert desc[8:12] == bytes.fromhex("50100704")
    assert {r[0]: r[5] for r in svc.rows()} == {"1050:0407:A1": "work", "046d:c52b:M1": ""}
    await run.stop()
    assert {r[0]: r[5] for r in svc.rows()} == {"1050:0407:A1": "", "046d:c52b:M1": ""}
    assert seen == [("attached", "1050:0407:A1", "work"), ("detached", "1050:0407:A1", "work")]


async def test_hotplug_while_running(svc: UsbService, tree: UsbTree, tmp_path: Path):
    run = await Run(svc, "work", tmp_path, (KEY,)).start()
    seen = events(svc)
    sysname = tree.plug("1050", "0407", "A1")
    svc.host.handle_uevent(tree.uevent("add", sysname))
    await svc.settle()
    assert run.control.ids() == ["1050:0407:A1"]
    assert svc.host.holder("1050:0407:A1") == "work"

    remove = tree.uevent("remove", sysname)
    tree.unplug(sysname)
    svc.host.handle_uevent(remove)
    # The claim ends with the device, before the VMM has even been told.
    assert svc.host.holder("1050:0407:A1") == ""
    await svc.settle()
    assert run.control.ids() == []
    assert seen == [("attached", "1050:0407:A1", "work"), ("detached", "1050:0407:A1", "work")]

    # Plugged in again, on another bus: the same id, attached again.
    sysname = tree.plug("1050", "0407", "A1", bus=2)
    svc.host.handle_uevent(tree.uevent("add", sysname))
    await svc.settle()
    assert run.control.ids() == ["1050:0407:A1"]
    await run.stop()


async def test_busy_and_handover(svc: UsbService, tree: UsbTree, tmp_path: Path):
    tree.plug("1050", "0407", "A1")
    svc.host.rescan()
    work = await Run(svc, "work", tmp_path, (KEY,)).start()
    home = await Run(svc, "home", tmp_path, (KEY,)).start()
    assert work.control.ids() == ["1050:0407:A1"] and home.control.ids() == []
    with pytest.raises(Busy, match='1050:0407:A1 is attached to "work"'):
        await svc.attach("home", "1050:0407:A1")
    assert svc.host.holder("1050:0407:A1") == "work"
    # When work stops, the device goes to the other instance that wants it.
    await work.stop()
    await svc.settle()
    assert home.control.ids() == ["1050:0407:A1"]
    assert svc.host.holder("1050:0407:A1") == "home"
    await home.stop()


async def test_explicit_attach_and_detach(svc: UsbService, tree: UsbTree, tmp_path: Path):
    tree.plug("046d", "c52b", None, ports="2")
    tree.plug("1050", "0407", "A1")
    svc.host.rescan()
    run = await Run(svc, "work", tmp_path, (KEY,)).start()
    mouse = "046d:c52b@0000:00:14.0-2"
    await svc.attach("work", mouse)
    assert run.control.ids() == [mouse, "1050:0407:A1"]
    with pytest.raises(InvalidArgument, match="already attached"):
        await svc.attach("work", mouse)
    # A wanted device detached on request stays detached until it is plugged again.
    await svc.detach("work", "1050:0407:A1")
    assert run.control.ids() == [mouse]
    assert svc.host.holder("1050:0407:A1") == ""
    await svc.settle()
    assert run.control.ids() == [mouse]
    with pytest.raises(InvalidArgument, match="not attached"):
        await svc.detach("work", "1050:0407:A1")
    # The attachments are recorded in the run directory (for a re-adopting daemon).
    record = (run.ctx.run_dir / "usb.json").read_text()
    assert mouse in record and "1050:0407:A1" not in record
    await run.stop()
    with pytest.raises(InvalidState, match="not running"):
        await svc.attach("work", mouse)


async def test_bad_input_leaves_nothing_claimed(svc: UsbService, tree: UsbTree, tmp_path: Path):
    tree.plug("1050", "0407", "A1")
    tree.plug("1050", "0407", "B2", ports="2")
    tree.plug("1050", "0407", "C3", ports="3")
    svc.host.rescan()
    run = await Run(svc, "work", tmp_path, ()).start()
    with pytest.raises(InvalidArgument):
        await svc.attach("work", "1050:0407")
    with pytest.raises(NoSuchResource, match="no USB device"):
        await svc.attach("work", "1050:0407:ZZ")

    # Listed, then gone before the attach (no uevent yet): a named error.
    a = svc.host.get("1050:0407:A1")
    tree.unplug(a.sysname)
    with pytest.raises(NoSuchResource, match="gone"):
        await svc.attach("work", a.id)

    # A node that cannot be opened.
    b = svc.host.get("1050:0407:B2")
    b.node(tree.dev).unlink()
    b.node(tree.dev).mkdir()
    with pytest.raises(Failed, match="cannot open"):
        await svc.attach("work", b.id)

    # The VMM refuses the descriptor.
    run.control.refuse = "failed to open host usb device /dev/fdset/3"
    with pytest.raises(Failed, match="failed to open host usb device"):
        await svc.attach("work", "1050:0407:C3")

    assert [r[5] for r in svc.rows()] == ["", "", ""]
    assert run.control.ids() == []
    assert os.listdir(f"/proc/{os.getpid()}/fd")  # and no descriptor leaked:
    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    with pytest.raises(Failed):
        await svc.attach("work", "1050:0407:C3")
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == before
    await run.stop()


async def test_qemu_without_controller(svc: UsbService, tree: UsbTree, tmp_path: Path):
    tree.plug("1050", "0407", "A1")
    svc.host.rescan()
    run = Run(svc, "plain", tmp_path, ())
    await svc.prepare(run.ctx)
    run.ctx.control = run.control  # type: ignore[assignment]
    spec = VmSpec(
        instance="plain", accel=Accel.tcg, memory_mib=64, vcpus=1, kernel=Path("/k"),
        initrd=None, cmdline="", run_dir=run.ctx.run_dir, usb=False,
    )  # fmt: skip
    await svc.started(run.ctx, spec)
    with pytest.raises(InvalidArgument, match="no USB controller"):
        await svc.attach("plain", "1050:0407:A1")
    assert svc.host.holder("1050:0407:A1") == ""
    await run.stop()


class FakeInstance:
    def __init__(self, name: str, resources: tuple[Resource, ...], vmm: VmmKind) -> None:
        self.name = name
        self.resources = resources
        self.definition = InstanceDef(name, "app", (), vmm, Accel.kvm, 1.0)
        self.state = State.running

    @property
    def active(self) -> bool:
        return self.state is not State.stopped


async def test_usb_grants(svc: UsbService, tree: UsbTree, tmp_path: Path):
    tree.plug("1050", "0407", "A1")
    tree.plug("1050", "0407", "B2", ports="2")
    tree.plug("1050", "0408", "C3", ports="3")
    svc.host.rescan()
    work = await Run(svc, "work", tmp_path, (UsbResource("k", "1050", "0408"),)).start()
    home = await Run(svc, "home", tmp_path, (UsbResource("k", "1050", "0408"),)).start()
    instances: dict[str, Any] = {
        "work": FakeInstance("work", work.ctx.resources, VmmKind.qemu),
        "home": FakeInstance("home", home.ctx.resources, VmmKind.qemu),
        "plain": FakeInstance("plain", (), VmmKind.qemu),
        "cv": FakeInstance("cv", (), VmmKind.crosvm),
    }

    async def set_exports(name: str, exports: Any) -> None:
        pass

    grants = GrantService(tmp_path, instances, dict, set_exports, usb=svc)
    assert work.control.ids() == ["1050:0408:C3"]

    g = await grants.create("work", "usb:1050:0407:A1")
    assert g.resource == "usb:1050:0407:A1" and g.entry == ""
    assert work.control.ids() == ["1050:0407:A1", "1050:0408:C3"]
    # Only held devices match: the grant is refused with Busy, and not kept.
    with pytest.raises(Busy, match='attached to "work"'):
        await grants.create("home", "usb:1050:0407:a1".replace("a1", "A1"))
    assert [x.instance for x in grants.grants.values()] == ["work"]
    # A vendor:product grant takes every free match; plugging one in later adds it.
    g2 = await grants.create("home", "usb:1050:0407")
    assert home.control.ids() == ["1050:0407:B2"]
    sysname = tree.plug("1050", "0407", "D4", ports="4")
    svc.host.handle_uevent(tree.uevent("add", sysname))
    await svc.settle()
    assert home.control.ids() == ["1050:0407:B2", "1050:0407:D4"]

    # Ending a grant detaches what only it brought.
    await grants.end(g.id, "revoked")
    assert work.control.ids() == ["1050:0408:C3"]
    await svc.settle()
    assert svc.host.holder("1050:0407:A1") == "home"  # handed over: home's grant matches
    await grants.end(g2.id, "revoked")
    assert home.control.ids() == []

    for bad, err in (
        ("usb:1050", InvalidArgument),
        ("usb:1050:0407:a b", InvalidArgument),
    ):
        with pytest.raises(err):
            await grants.create("work", bad)
    with pytest.raises(InvalidArgument, match="no USB controller"):
        await grants.create("plain", "usb:1050:0407")
    grants.validate("cv", "usb:1050:0407", "ro", "permanent", 0)  # crosvm has its own xHCI
    await work.stop()
    await home.stop()
    assert all(r[5] == "" for r in svc.rows())


async def test_readoption_takes_back_recorded_devices(
    svc: UsbService, tree: UsbTree, tmp_path: Path
):
    tree.plug("1050", "0407", "A1")
    tree.plug("1050", "0407", "B2", ports="2")
    svc.host.rescan()
    run = await Run(svc, "work", tmp_path, (KEY,)).start()
    assert run.control.ids() == ["1050:0407:A1", "1050:0407:B2"]
    # The daemon goes away leaving the VMM running: its memory is gone, the record stays.
    host2 = UsbHost(tree.sysfs, tree.dev)
    tree.unplug(svc.host.get("1050:0407:B2").sysname)
    host2.rescan()
    svc2 = UsbService(host2)
    again = Run(svc2, "work", tmp_path, (KEY,))
    again.control = run.control
    again.ctx.control = run.control  # type: ignore[assignment]
    spec = VmSpec(
        instance="work", accel=Accel.tcg, memory_mib=64, vcpus=1, kernel=Path("/k"),
        initrd=None, cmdline="", run_dir=again.ctx.run_dir, usb=True,
    )  # fmt: skip
    await svc2.adopt(again.ctx, spec)
    assert host2.holder("1050:0407:A1") == "work"
    # B2 went while nobody watched: its port is detached.
    assert run.control.ids() == ["1050:0407:A1"]
    await again.stop()
    await run.stop()


def test_match_of_resources() -> None:
    from spectrumd.supervisor.usb import resource_matches, usb_capable

    assert resource_matches((KEY,)) == (UsbMatch("1050", "0407"),)
    assert usb_capable(VmmKind.qemu, (KEY,)) and usb_capable(VmmKind.crosvm, ())
    assert not usb_capable(VmmKind.qemu, ())
