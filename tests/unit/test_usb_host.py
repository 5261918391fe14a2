"""The host's USB devices from a synthetic sysfs tree: enumeration, identity, uevents, holders."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from spectrumd.errors import Busy, Failed, InvalidArgument, NoSuchResource
from spectrumd.host.usb import UsbDevice, UsbHost, scan
from spectrumd.host.usb_ids import UsbMatch, check_id, parse_match
from spectrumd.host.usb_uevent import NETLINK_KOBJECT_UEVENT, UeventMonitor, parse_uevent
from tests.usb_tree import UsbTree

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def tree(tmp_path: Path) -> UsbTree:
    return UsbTree(tmp_path)


def host_of(tree: UsbTree) -> UsbHost:
    host = UsbHost(tree.sysfs, tree.dev)
    host.rescan()
    return host


def test_enumeration_ids_and_descriptions(tree: UsbTree) -> None:
    tree.plug("1050", "0407", "12345678", manufacturer="Yubico", name="YubiKey OTP+FIDO+CCID")
    tree.plug("046D", "c52b", None, ports="2.3", manufacturer=None, name=None)
    tree.plug("05e3", "0610", None, ports="4", device_class="09")  # a hub: not passable
    devices = {d.id: d for d in scan(tree.sysfs)}
    assert set(devices) == {"1050:0407:12345678", "046d:c52b@0000:00:14.0-2.3"}
    key = devices["1050:0407:12345678"]
    assert key.description == "Yubico YubiKey OTP+FIDO+CCID"
    assert (key.busnum, key.sysname, key.serial) == (1, "1-1", "12345678")
    assert key.node(tree.dev) == tree.dev / "001" / "002"
    assert devices["046d:c52b@0000:00:14.0-2.3"].description == "USB device 046d:c52b"


def test_identity_survives_bus_renumbering(tree: UsbTree, tmp_path: Path) -> None:
    """The same devices, in the same sockets, after the controller became bus 3."""
    tree.plug("1050", "0407", "A1")
    tree.plug("046d", "c52b", None, ports="2")
    before = sorted(d.id for d in scan(tree.sysfs))
    other = UsbTree(tmp_path / "after")
    other.plug("1050", "0407", "A1", bus=3)
    other.plug("046d", "c52b", None, bus=3, ports="2")
    after = scan(other.sysfs)
    assert sorted(d.id for d in after) == before
    assert {d.sysname for d in after} == {"3-1", "3-2"}
    # Another socket is another location; a serial follows the device anywhere.
    third = UsbTree(tmp_path / "moved")
    third.plug("1050", "0407", "A1", ports="5")
    third.plug("046d", "c52b", None, bus=2, ports="3", controller="0000:00:1d.0")
    assert sorted(d.id for d in scan(third.sysfs)) == [
        "046d:c52b@0000:00:1d.0-3",
        "1050:0407:A1",
    ]


def test_duplicate_serials_and_hostile_strings(tree: UsbTree) -> None:
    tree.plug("abcd", "0001", "SAME", ports="1")
    tree.plug("abcd", "0001", "SAME", ports="2")
    tree.plug("abcd", "0002", "a:b@c d/é", ports="3", name="evil\x1b[2Jname\x07")
    host = host_of(tree)
    ids = sorted(host.devices)
    assert ids == ["abcd:0001:SAME", "abcd:0001@0000:00:14.0-2", "abcd:0002:a%3Ab%40c%20d%2F%C3%A9"]
    for dev_id in ids:
        assert check_id(dev_id) == dev_id
    evil = host.devices["abcd:0002:a%3Ab%40c%20d%2F%C3%A9"]
    assert evil.serial == "a:b@c d/é"
    assert "\x1b" not in evil.description and "\x07" not in evil.description


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1050",
        "1050:0407",
        "1050:407:x",
        "1050:04G7:x",
        "1050:0407:a b",
        "1050:0407:a%3ab",  # not canonical: %3A
        "1050:0407:%FF",  # not UTF-8
        "1050:0407:x@0000:00:14.0-1",
        "1050:0407@",
        "1050:0407@a/b",
        "x" * 600,
    ],
)
def test_malformed_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_id(bad)


def test_grant_matches() -> None:
    assert parse_match("usb:1050:0407") == UsbMatch("1050", "0407")
    assert parse_match("usb:1050:0407:A%3A1") == UsbMatch("1050", "0407", "A:1")
    assert str(parse_match("usb:1050:0407:A%3A1")) == "usb:1050:0407:A%3A1"
    assert parse_match("usb:ABCD:EF01") == UsbMatch("abcd", "ef01")
    for bad in ("usb:", "usb:1050", "usb:1050:04", "usb:1050:0407:a b", "1050:0407"):
        with pytest.raises(InvalidArgument):
            parse_match(bad)


def test_parse_uevent(tree: UsbTree) -> None:
    sysname = tree.plug("1050", "0407", "A1")
    ev = parse_uevent(tree.uevent("add", sysname))
    assert ev is not None
    assert (ev.action, ev.subsystem, ev.devtype) == ("add", "usb", "usb_device")
    assert ev.devpath == "/devices/pci0000:00/0000:00:14.0/usb1/1-1"
    assert parse_uevent(b"libudev\0\xfe\xed\xca\xfe") is None
    assert parse_uevent(b"garbage") is None
    assert parse_uevent(b"add@/devices/x\0ACTION=remove\0DEVPATH=/devices/x\0") is None
    assert parse_uevent(b"x" * 10000) is None


def test_injected_hotplug(tree: UsbTree) -> None:
    host = host_of(tree)
    added: list[UsbDevice] = []
    removed: list[UsbDevice] = []
    host.on_added.append(added.append)
    host.on_removed.append(removed.append)

    sysname = tree.plug("1050", "0407", "A1")
    host.handle_uevent(tree.uevent("add", sysname))
    assert [d.id for d in added] == ["1050:0407:A1"]
    # Interface events and repeats change nothing.
    host.handle_uevent(tree.uevent("add", sysname).replace(b"usb_device", b"usb_interface"))
    host.handle_uevent(tree.uevent("add", sysname))
    assert len(added) == 1

    # A remove the kernel did not mean (the device is still in sysfs) is ignored.
    remove = tree.uevent("remove", sysname)
    host.handle_uevent(remove)
    assert removed == [] and "1050:0407:A1" in host.devices

    tree.unplug(sysname)
    host.handle_uevent(remove)
    assert [d.id for d in removed] == ["1050:0407:A1"]
    assert host.devices == {}

    # An add for a device sysfs does not show is ignored.
    host.handle_uevent(remove.replace(b"remove", b"add"))
    assert host.devices == {}

    # Re-plugged on another bus: a new sysname and devnum, the same id.
    sysname = tree.plug("1050", "0407", "A1", bus=2)
    host.handle_uevent(tree.uevent("add", sysname))
    dev = host.get("1050:0407:A1")
    assert (dev.sysname, dev.busnum) == ("2-1", 2)


def test_rescan_after_lost_events(tree: UsbTree) -> None:
    host = host_of(tree)
    a = tree.plug("1050", "0407", "A1")
    tree.plug("1050", "0407", "B2", ports="2")
    host.rescan()
    assert sorted(host.devices) == ["1050:0407:A1", "1050:0407:B2"]
    tree.unplug(a)
    host.rescan()
    assert sorted(host.devices) == ["1050:0407:B2"]


def test_holders(tree: UsbTree) -> None:
    tree.plug("1050", "0407", "A1")
    host = host_of(tree)
    host.claim("1050:0407:A1", "work")
    with pytest.raises(Busy, match='attached to "work"'):
        host.claim("1050:0407:A1", "home")
    host.release("1050:0407:A1", "home")  # not the holder: nothing happens
    assert host.holder("1050:0407:A1") == "work"
    host.release("1050:0407:A1", "work")
    assert host.holder("1050:0407:A1") == ""
    with pytest.raises(NoSuchResource):
        host.get("1050:0407:ZZ")


def test_open_errors(tree: UsbTree) -> None:
    tree.plug("1050", "0407", "A1")
    tree.plug("1050", "0407", "B2", ports="2")
    tree.plug("1050", "0407", "C3", ports="3", node=False)
    host = host_of(tree)
    fd = host.open(host.get("1050:0407:A1"))
    try:
        assert os.read(fd, 18)[8:12] == bytes.fromhex("50100704")
    finally:
        os.close(fd)
    # A node that is not a device cannot be opened read-write.
    b = host.get("1050:0407:B2")
    b.node(tree.dev).unlink()
    b.node(tree.dev).mkdir()
    with pytest.raises(Failed, match=r"cannot open .* Is a directory"):
        host.open(b)
    with pytest.raises(NoSuchResource, match="does not exist"):
        host.open(host.get("1050:0407:C3"))


CLONE_NEWNET = 0x40000000


def in_new_netns(fn: Any) -> Any:
    """Run ``fn`` in a thread that has its own, new network namespace."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
async def test_netlink_drops_datagrams_not_from_the_kernel(tree: UsbTree) -> None:
    """A process that multicasts a forged uevent (root can) is not listened to.

    Both sockets live in a network namespace of their own: nothing reaches the host's.
    """

    def sockets() -> tuple[socket.socket, socket.socket]:
        listen = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
        listen.bind((0, 1))
        listen.setblocking(False)
        forge = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
        forge.bind((0, 0))
        return listen, forge

    listen, forge = in_new_netns(sockets)
    host = host_of(tree)
    got: list[bytes] = []
    monitor = UeventMonitor(got.append, host.rescan)
    monitor.attach(listen)
    try:
        sysname = tree.plug("1050", "0407", "A1")
        forge.sendto(tree.uevent("add", sysname), (0, 1))
        for _ in range(50):
            if monitor.dropped:
                break
            await asyncio.sleep(0.01)
        assert monitor.dropped == 1 and got == []
    finally:
        monitor.close()
        forge.close()
