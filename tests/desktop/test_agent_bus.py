"""The desktop programs against a real spectrumd, without guests: registration,
a daemon restart, a second agent, a refused caller, a grant the daemon cannot
make, a bus that is not there or goes away; the management window across a
daemon restart."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from spectrumd.cli.client import Client, connect
from tests.conftest import Daemon, dbus_daemon
from tests.desktop.conftest import Gui
from tests.desktop.ui import UI
from tests.integration.helpers import app_config, marked_dir, wait_log
from tests.usb_tree import UsbTree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

AGENT = "spectrum-agent"
TITLE = "Spectrum: one asks for access"
REQUEST_IFACE = "org.spectrum_os.Spectrum1.Request"


async def registrations(daemon: Daemon, count: int, timeout: float = 20) -> list[str]:
    """The owners of the first ``count`` agent registrations in the daemon's audit log."""
    deadline = time.monotonic() + timeout
    while True:
        owners = re.findall(r'agent-registered owner="([^"]+)"', daemon.stderr_path.read_text())
        if len(owners) >= count:
            return owners
        assert time.monotonic() < deadline, f"{len(owners)} registrations, wanted {count}"
        await asyncio.sleep(0.1)


async def request(c: Client, resource: str, instance: str = "one") -> str:
    (path,) = await c.manager(
        "RequestGrant", "ssa{sv}", instance, resource, {"lifetime": Variant("s", "permanent")}
    )
    return str(path)


async def code_of(c: Client, req: str) -> int:
    (code,) = await c.call(
        req, "org.freedesktop.DBus.Properties", "Get", "ss", [REQUEST_IFACE, "Code"]
    )
    return int(code.value)


async def wait_code(c: Client, req: str, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (code := await code_of(c, req)) < 0:
        assert time.monotonic() < deadline, "the request is still pending"
        await asyncio.sleep(0.05)
    return code


async def test_restart_second_agent_intruder_and_failed_grant(
    daemon: Daemon, gui: Gui, ui: UI, screenshots: Path
) -> None:
    config = app_config("exec sleep 600", one={"application": "app"}, two={"application": "app"})
    config["resources"]["docs"]["path"] = "/usr/share/doc"
    c = await daemon.start(config)
    gui.start("agent", daemon.address)
    (first,) = await registrations(daemon, 1)

    with marked_dir("desk.", "m") as shared:
        # A request shows a dialog naming the instance, the resource and the access;
        # a configured resource shows the host directory it stands for.
        req = await request(c, str(shared))
        req_two = await request(c, "docs", instance="two")
        dialog = await ui.wait_window(AGENT, TITLE)
        texts = await ui.run(ui.texts, dialog)
        assert "one" in texts and str(shared) in texts and "read-only" in texts, texts
        # Two instances: two dialogs at once, each with its own request.
        other = await ui.wait_window(AGENT, "Spectrum: two asks for access")
        texts = await ui.run(ui.texts, other)
        assert "two" in texts and "/usr/share/doc" in texts and "docs" in texts, texts
        # Focus lost: the buttons go inactive, and the second starts again on return.
        allow = await ui.run(ui.find, dialog, "push button", "Allow")
        ui.focus(TITLE)
        await wait_sensitive(ui, allow)
        ui.focus("Spectrum: two asks for access")
        await wait_sensitive(ui, allow, want=False, timeout=2)
        # Timed from before the focus: the second starts when GTK sees it, which a
        # slow xdotool may report after GTK has.
        back = time.monotonic()
        ui.focus(TITLE)
        await wait_sensitive(ui, allow)
        again = time.monotonic() - back
        assert 0.9 <= again < 3, f"armed again {again:.2f} s after the refocus"
        ui.key(TITLE, "Escape")
        assert await wait_code(c, req) == 1, "Escape denies"
        await ui.wait_window(AGENT, TITLE, gone=True)
        assert await code_of(c, req_two) == -1, "the other request is still open"

        # A host caller cancels the other request: its dialog closes.
        await c.call(req_two, REQUEST_IFACE, "Cancel")
        assert await wait_code(c, req_two) == 2
        await ui.wait_window(AGENT, "Spectrum: two asks", gone=True, timeout=10)

        # spectrumd restarts: the open dialog closes, and the agent registers again.
        await request(c, "docs", instance="two")
        await ui.wait_window(AGENT, "Spectrum: two asks")
        await daemon.stop()
        await ui.wait_window(AGENT, "Spectrum: two asks", gone=True, timeout=10)
        c = await daemon.start()
        owners = await registrations(daemon, 2)
        assert owners[1] == first, "the same agent registered again"
        req = await request(c, str(shared))
        await ui.wait_window(AGENT, TITLE)

        # Someone else on the bus calls the agent's Confirm: refused, no second dialog.
        intruder = await connect(daemon.address)
        reply = await intruder.call(
            Message(
                destination=first,
                path="/org/spectrum_os/Spectrum1/desktop_agent",
                interface="org.spectrum_os.Spectrum1.Agent",
                member="Confirm",
                signature="ssssssa{sv}",
                body=["fake", "bank", "app", "/", "rw", "permanent", {}],
            )
        )
        assert reply is not None and reply.message_type == MessageType.ERROR
        assert reply.error_name == "org.freedesktop.DBus.Error.AccessDenied"
        assert await ui.run(ui.window, AGENT, "bank") is None
        # Nor can it take the real question off the screen: not by Cancel, not by a
        # forged Response signal on the request's path.
        reply = await intruder.call(
            Message(
                destination=first,
                path="/org/spectrum_os/Spectrum1/desktop_agent",
                interface="org.spectrum_os.Spectrum1.Agent",
                member="Cancel",
                signature="s",
                body=[req.rsplit("/", 1)[1]],
            )
        )
        assert reply is not None and reply.error_name == "org.freedesktop.DBus.Error.AccessDenied"
        await intruder.send(Message.new_signal(req, REQUEST_IFACE, "Response", "ua{sv}", [2, {}]))
        await asyncio.sleep(0.5)
        assert await ui.run(ui.window, AGENT, TITLE) is not None, "a forgery closed the dialog"
        assert await code_of(c, req) == -1
        intruder.disconnect()

        # Allowed, but the directory is gone by then: the user is told, nothing is granted.
        dialog = await ui.wait_window(AGENT, TITLE)
        allow = await ui.run(ui.find, dialog, "push button", "Allow")
        ui.focus(TITLE)
        await wait_sensitive(ui, allow)
    await ui.click(TITLE, allow)
    assert await wait_code(c, req) == 2
    notice = await ui.wait_window(AGENT, "Spectrum agent: message")
    text = " ".join(await ui.run(ui.texts, notice))
    assert "The grant was not made" in text and "confirmed, but the grant failed" in text, text
    (rows,) = await c.manager("ListGrants")
    assert rows == []

    # A second agent is refused with Busy, and says so in its window.
    gui.start("agent", daemon.address)
    status = await ui.wait_window(AGENT, "Spectrum agent: not active", timeout=20)
    deadline = time.monotonic() + 20
    while "Busy" not in (text := " ".join(await ui.run(ui.texts, status))):
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.1)
    assert "an agent is already registered" in text
    ui.display.screenshot(screenshots / "agent-busy.png", ui.x_window("Spectrum agent: not active"))


async def wait_sensitive(ui: UI, acc: Any, timeout: float = 10, want: bool = True) -> float:
    """Seconds until the button is active (or inactive, ``want=False``)."""
    start = time.monotonic()
    while await ui.run(ui.sensitive, acc) != want:
        assert time.monotonic() - start < timeout, (
            f"the button never became {'active' if want else 'inactive'}"
        )
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_a_request_that_times_out_closes_its_dialog(daemon: Daemon, gui: Gui, ui: UI) -> None:
    c = await daemon.start(app_config("exec sleep 600"), extra_args=["--confirm-timeout", "5"])
    gui.start("agent", daemon.address)
    await registrations(daemon, 1)
    with marked_dir("late.", "m") as shared:
        req = await request(c, str(shared))
        asked = time.monotonic()
        await ui.wait_window(AGENT, TITLE)
        # Nobody answers: the daemon gives up after 5 s, and the dialog goes with it.
        await ui.wait_window(AGENT, TITLE, gone=True, timeout=30)
        closed_after = time.monotonic() - asked
        assert await wait_code(c, req) == 2
        (reason,) = await c.call(
            req, "org.freedesktop.DBus.Properties", "Get", "ss", [REQUEST_IFACE, "Reason"]
        )
        assert reason.value == "the agent did not answer in time"
    assert 4.5 < closed_after < 15, f"the dialog closed {closed_after:.1f} s after the request"
    (rows,) = await c.manager("ListGrants")
    assert rows == []
    # The agent is still there for the next request.
    req = await request(c, "docs")
    await ui.wait_window(AGENT, TITLE)
    ui.key(TITLE, "Escape")
    assert await wait_code(c, req) == 1


async def test_no_bus(gui: Gui, ui: UI, short_tmp: Path) -> None:
    gui.start("agent", f"unix:path={short_tmp}/no-such-bus")
    status = await ui.wait_window(AGENT, "Spectrum agent: not active")
    text = " ".join(await ui.run(ui.texts, status))
    assert "cannot reach the" in text and "no-such-bus" in text, text
    await wait_log(Path(gui.logdir) / "agent-0.log", "cannot reach", timeout=5)


async def manager_texts(ui: UI) -> list[str]:
    w = await ui.run(ui.window, "spectrum-manager", "Spectrum instances")
    return [] if w is None else await ui.run(ui.texts, w)


async def wait_manager(ui: UI, pred: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred(texts := await manager_texts(ui)):
        assert time.monotonic() < deadline, f"{what}; the window shows {texts}"
        await asyncio.sleep(0.05)


async def test_manager_follows_a_daemon_restart(daemon: Daemon, gui: Gui, ui: UI) -> None:
    await daemon.start(app_config("exec sleep 600"))
    gui.start("manager", daemon.address)
    await wait_manager(ui, lambda t: "one" in t and "stopped" in t, "no instance")
    await daemon.stop()
    await wait_manager(
        ui,
        lambda t: "spectrumd is not running; waiting for it" in t and "one" not in t,
        "the daemon's end is not shown",
    )
    await daemon.start(app_config("exec sleep 600", two={"application": "app"}))
    await wait_manager(ui, lambda t: "two" in t and "one" not in t, "the new daemon's instances")
    texts = await manager_texts(ui)
    assert not any("not running" in x for x in texts), texts


async def test_agent_outlives_its_bus(gui: Gui, ui: UI, short_tmp: Path) -> None:
    sock = short_tmp / "brief-bus"
    private_bus = contextlib.contextmanager(dbus_daemon)
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        address = first.enter_context(private_bus(["--session", f"--address=unix:path={sock}"]))
        gui.start("agent", address)
        await asyncio.sleep(1.0)  # connected; no daemon on this bus, so no window
        assert await ui.run(ui.window, AGENT, "Spectrum agent") is None
        first.close()  # the bus daemon ends
        status = await ui.wait_window(AGENT, "Spectrum agent: not active")
        deadline = time.monotonic() + 10
        while not any("closed" in x or "cannot reach" in x for x in await ui.run(ui.texts, status)):
            assert time.monotonic() < deadline, await ui.run(ui.texts, status)
            await asyncio.sleep(0.1)
        # A bus at the same address again: the agent connects, and the window goes.
        second.enter_context(private_bus(["--session", f"--address=unix:path={sock}"]))
        await ui.wait_window(AGENT, "Spectrum agent: not active", gone=True, timeout=15)


async def test_usb_request_names_the_device(
    daemon: Daemon, gui: Gui, ui: UI, screenshots: Path
) -> None:
    tree = UsbTree(daemon.workdir / "usb")
    tree.plug("1050", "0407", "A 1", manufacturer="Yubico", name="YubiKey")
    config = app_config("exec sleep 600")
    config["resources"]["key"] = {"type": "usb", "vendor": "1050", "product": "0407"}
    config["instances"] = {"one": {"application": "app", "resources": ["key"]}}
    c = await daemon.start(
        config, extra_args=["--usb-sysfs-root", str(tree.sysfs), "--usb-dev-root", str(tree.dev)]
    )
    gui.start("agent", daemon.address)
    await registrations(daemon, 1)
    req = await request(c, "usb:1050:0407:A%201")
    dialog = await ui.wait_window(AGENT, TITLE)
    texts = await ui.run(ui.texts, dialog)
    for expected in ("USB 1050:0407 serial A 1", "1050", "0407", "A 1", "Yubico YubiKey"):
        assert expected in texts, (expected, texts)
    assert "the whole device" in texts, texts
    ui.display.screenshot(screenshots / "agent-usb.png", ui.x_window(TITLE))
    ui.key(TITLE, "Escape")
    assert await wait_code(c, req) == 1
