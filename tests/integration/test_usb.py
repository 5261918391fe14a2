"""USB passthrough against real QEMU and a real guest, and through the real daemon.

These machines have no USB subsystem: host devices come from a synthetic
sysfs tree and device nodes (tests/usb_tree.py). Against real QEMU that
shows the command path (``add-fd`` with SCM_RIGHTS, then ``device_add
usb-host,hostdevice=/dev/fdset/N``) and QEMU's clear refusal of a node that
is not a USB device. An emulated USB keyboard, plugged and unplugged through
the same QMP calls, shows that hotplug reaches a booted guest. The crosvm
path runs through the real daemon against the crosvm stand-in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message

from spectrumd.bus.names import MANAGER_IFACE, MANAGER_PATH
from spectrumd.cli import usb as cli_usb
from spectrumd.cli.client import Client
from spectrumd.errors import Failed
from spectrumd.host.usb import UsbHost
from spectrumd.model.types import Accel, Application, InstanceDef, UsbResource, VmmKind
from spectrumd.supervisor.guest import encode_run
from spectrumd.supervisor.resources import RunContext
from spectrumd.supervisor.usb import UsbService
from spectrumd.vmm.base import PORT_CONTROL, VmSpec
from spectrumd.vmm.qemu import QemuBackend, QemuControl
from tests.conftest import Daemon, unexpected_failure
from tests.integration.helpers import error_of, props, short
from tests.integration.test_crosvm import STANDIN_DIR, crosvm_config, standin_env
from tests.usb_tree import UsbTree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY = UsbResource("key", "1050", "0407")
LISTING = (
    "while :; do echo \"usb: $(cat /sys/bus/usb/devices/*/product 2>/dev/null | tr '\\n' ,)\"; "
    "sleep 0.3; done"
)


class Console:
    """Collects a guest's serial console."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.text = ""
        self._task = asyncio.ensure_future(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(4096):
            self.text += chunk.decode(errors="replace")

    async def wait(self, pred: Any, start: int = 0, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [x.strip() for x in self.text[start:].splitlines() if x.startswith("usb: ")]
            hit = next((x for x in lines if pred(x)), None)
            if hit is not None:
                return hit
            await asyncio.sleep(0.1)
        raise AssertionError(f"console never showed it:\n{self.text[-2000:]}")

    def close(self) -> None:
        self._task.cancel()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU")
async def test_qemu_usb_host_path_and_guest_hotplug(
    short_tmp: Path, guest_dir: Path, tmp_path: Path
) -> None:
    run_dir = short_tmp / f"usb{os.getpid()}"
    run_dir.mkdir(exist_ok=True)
    spec = VmSpec(
        instance="u",
        accel=Accel.tcg,
        memory_mib=128,
        vcpus=1,
        kernel=guest_dir / "vmlinuz",
        initrd=guest_dir / "initramfs.img",
        cmdline="console=ttyS0 panic=-1 quiet",
        run_dir=run_dir,
        usb=True,
    )
    backend = QemuBackend()
    events: list[tuple[str, dict[str, Any]]] = []
    proc = await asyncio.create_subprocess_exec(
        *backend.argv(spec), stdin=subprocess.DEVNULL, start_new_session=True
    )
    console: Console | None = None
    try:
        control = await backend.attach(spec, lambda n, d: events.append((n, dict(d))), 20)
        assert isinstance(control, QemuControl)
        console_r, _cw = await asyncio.open_unix_connection(spec.console_socket)
        console = Console(console_r)
        guest_r, guest_w = await asyncio.open_unix_connection(spec.port_socket(PORT_CONTROL))

        # 1. A host device through UsbService: the daemon opens the node, QEMU
        # gets the descriptor in an fd set and usb-host refuses it (not USB).
        tree = UsbTree(tmp_path)
        tree.plug("1050", "0407", "A1")
        host = UsbHost(tree.sysfs, tree.dev)
        host.rescan()
        svc = UsbService(host)
        stack = contextlib.AsyncExitStack()
        ctx = RunContext(
            name="u",
            definition=InstanceDef("u", "app", ("key",), VmmKind.qemu, Accel.tcg, 10.0),
            application=Application("app", "true"),
            resources=(KEY,),
            run_dir=run_dir,
            stack=stack,
            conns=contextlib.AsyncExitStack(),
            fail=unexpected_failure,
            log=logging.getLogger("test.usb"),
        )
        await svc.prepare(ctx)
        ctx.control = control
        await svc.started(ctx, spec)  # the automatic attach fails: logged, not fatal
        assert host.holder("1050:0407:A1") == ""
        with pytest.raises(Failed) as err:
            await svc.attach("u", "1050:0407:A1")
        assert "failed to open host usb device /dev/fdset/" in str(err.value), err.value
        assert host.holder("1050:0407:A1") == ""
        # The descriptor did reach QEMU (its fd set is kept until the VM runs).
        fdsets = await control.execute("query-fdsets")
        assert any(f.get("opaque") == "usb 1050:0407:A1" for s in fdsets for f in s["fds"])

        # 2. An emulated device through the same calls reaches the booted guest.
        await control.start_cpus()
        assert await asyncio.wait_for(guest_r.readuntil(b"ready\n"), 60)
        guest_w.write(encode_run(LISTING))
        await guest_w.drain()
        await console.wait(lambda x: "xHCI Host Controller" in x)
        handle = await control.usb_add({"driver": "usb-kbd"})
        await console.wait(lambda x: "QEMU USB Keyboard" in x)
        mark = len(console.text)
        await control.usb_detach(handle)
        assert ("DEVICE_DELETED", handle) in [(n, d.get("device")) for n, d in events]
        # Two fresh listings after the unplug: the last one has no keyboard.
        await console.wait(lambda x: True, start=mark)
        mark = len(console.text)
        line = await console.wait(lambda x: True, start=mark)
        assert "QEMU USB Keyboard" not in line and "xHCI" in line, line
        await stack.aclose()
        guest_w.close()
    finally:
        if console is not None:
            console.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


class Signals:
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    async def attach(self, c: Client) -> Signals:
        c.bus.add_message_handler(self._on)
        await c.add_match(f"type='signal',interface='{MANAGER_IFACE}',path='{MANAGER_PATH}'")
        return self

    def _on(self, msg: Message) -> bool:
        if msg.member and msg.member.startswith("UsbDevice"):
            self.seen.append((msg.member, *msg.body))
        return False


async def holders(c: Client) -> dict[str, str]:
    (rows,) = await c.manager("ListUsbDevices")
    return {r[0]: r[5] for r in rows}


async def wait_holder(c: Client, dev_id: str, holder: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (now := (await holders(c)).get(dev_id)) != holder:
        if time.monotonic() > deadline:
            raise AssertionError(f"{dev_id} held by {now!r}, not {holder!r}")
        await asyncio.sleep(0.05)


async def wait_standin(run_dir: Path, want: str, timeout: float = 10) -> None:
    """The holder is claimed when an attach begins; the VMM has it once it answered."""
    deadline = time.monotonic() + timeout
    while (now := standin_usb_list(run_dir)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"crosvm usb list says {now!r}, not {want!r}")
        await asyncio.sleep(0.05)


def standin_usb_list(run_dir: Path) -> str:
    out = subprocess.run(
        [str(STANDIN_DIR / "crosvm"), "usb", "list", str(run_dir / "vmm" / "vmm.sock")],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


async def test_crosvm_usb_through_the_daemon(daemon: Daemon, capsys: Any) -> None:
    tree = UsbTree(daemon.workdir / "usb")
    tree.plug("1050", "0407", "A1", manufacturer="Yubico", name="YubiKey")
    tree.plug("046d", "c52b", None, ports="2")
    mouse = "046d:c52b@0000:00:14.0-2"
    config = crosvm_config(daemon.workdir)
    config["resources"] = {"key": {"type": "usb", "vendor": "1050", "product": "0407"}}
    config["instances"] = {
        "one": {"application": "app", "resources": ["key"]},
        "two": {"application": "app", "resources": ["key"]},
    }
    c = await daemon.start(
        config,
        env=standin_env(),
        extra_args=["--usb-sysfs-root", str(tree.sysfs), "--usb-dev-root", str(tree.dev)],
    )
    sig = await Signals().attach(c)
    (rows,) = await c.manager("ListUsbDevices")
    assert sorted(map(tuple, rows)) == [
        (mouse, "046d", "c52b", "", "Acme Widget", ""),
        ("1050:0407:A1", "1050", "0407", "A1", "Yubico YubiKey", ""),
    ]

    # Attached at start, by the resource; the stand-in read the descriptor
    # through /proc/self/fd/N and reports the device's ids.
    await c.manager("StartInstance", "s", "one")
    await wait_holder(c, "1050:0407:A1", "one")
    run_one = daemon.state_dir / "run" / "one"
    await wait_standin(run_one, "devices 1 1050 0407")

    path_one = await c.instance_path("one")
    await c.call(path_one, "org.spectrum_os.Spectrum1.Instance", "AttachUsb", "s", [mouse])
    assert standin_usb_list(run_one) == "devices 1 1050 0407 2 046d c52b"

    # The instance's table decides: a stopped VM takes no device.
    path_two = await c.instance_path("two")
    e = await error_of(
        c.call(path_two, "org.spectrum_os.Spectrum1.Instance", "AttachUsb", "s", [mouse])
    )
    assert short(e.name) == "InvalidState", e
    assert e.message == "cannot attach a USB device to two: it is stopped"
    await c.manager("StartInstance", "s", "two")
    e = await error_of(
        c.call(path_two, "org.spectrum_os.Spectrum1.Instance", "AttachUsb", "s", ["1050:0407:A1"])
    )
    assert short(e.name) == "Busy" and '"one"' in e.message, e.message
    for bad, name in (("1050:0407", "InvalidArgument"), ("1050:0407:NOPE", "NoSuchResource")):
        e = await error_of(
            c.call(path_two, "org.spectrum_os.Spectrum1.Instance", "AttachUsb", "s", [bad])
        )
        assert short(e.name) == name, e

    await c.call(path_one, "org.spectrum_os.Spectrum1.Instance", "DetachUsb", "s", [mouse])
    assert standin_usb_list(run_one) == "devices 1 1050 0407"

    # A grant gives the mouse to two; revoking it takes it back.
    (gpath,) = await c.manager("Grant", "ssa{sv}", "two", "usb:046d:c52b", {})
    await wait_holder(c, mouse, "two")
    await c.call(gpath, "org.spectrum_os.Spectrum1.Grant", "Revoke")
    await wait_holder(c, mouse, "")

    # one stops: its key is released and handed to two, which wants it too.
    await c.manager("StopInstance", "s", "one")
    await wait_holder(c, "1050:0407:A1", "two")
    await wait_standin(daemon.state_dir / "run" / "two", "devices 1 1050 0407")

    await cli_usb.cmd_usb(c, argparse.Namespace(usb_command="list", json=True))
    listed = json.loads(capsys.readouterr().out)
    assert {d["id"]: d["holder"] for d in listed} == {"1050:0407:A1": "two", mouse: ""}

    await c.manager("StopInstance", "s", "two")
    await wait_holder(c, "1050:0407:A1", "")
    assert (await props(c, "two"))["State"] == "stopped"
    want = [
        ("UsbDeviceAttached", "1050:0407:A1", "one"),
        ("UsbDeviceAttached", mouse, "one"),
        ("UsbDeviceDetached", mouse, "one"),
        ("UsbDeviceAttached", mouse, "two"),
        ("UsbDeviceDetached", mouse, "two"),
        ("UsbDeviceDetached", "1050:0407:A1", "one"),
        ("UsbDeviceAttached", "1050:0407:A1", "two"),
        ("UsbDeviceDetached", "1050:0407:A1", "two"),
    ]
    assert sig.seen == want, sig.seen
