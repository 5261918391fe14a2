"""The management window against a real spectrumd on a bus with the project's
system policy, and a real guest on a network in a namespace of its own.

- A reader (uid nobody, outside the group spectrum) sees the instances and
  their configured resources. Its Start and its Revoke are refused with a
  message; the instance stays stopped and the grant stays. Its agent is
  refused too, and says so.
- root's window starts the instance with its button and shows the new state
  within a second of the daemon's signal; it lists the guest's grant and its
  network, and its Revoke takes the directory away from the guest. Its Stop
  stops the guest gracefully, the row following the state; its Kill ends it.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, Variant

from spectrumd.bus.names import INSTANCE_IFACE, instance_path
from spectrumd.desktop.client import GRANT_IFACE
from tests.conftest import Daemon, kill_leftover_vmms, readable_tmpdir
from tests.desktop.conftest import Gui
from tests.desktop.ui import UI
from tests.integration.helpers import app_config, marked_dir, props, wait_for, wait_log
from tests.integration.test_grants import LISTER, output_after
from tests.integration.test_policy import NOBODY, SYSTEM_CONF, _bus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MANAGER = "spectrum-manager"
TITLE = "Spectrum instances"


@pytest.fixture
def policy_bus() -> Iterator[tuple[str, Path]]:
    d = Path(tempfile.mkdtemp(prefix="spm.", dir="/tmp"))
    d.chmod(0o755)  # nobody must reach the bus socket inside
    try:
        for address in _bus(d, SYSTEM_CONF):
            yield address, d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"spd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def texts_of(ui: UI) -> list[str]:
    w = await ui.run(ui.window, MANAGER, TITLE)
    return [] if w is None else await ui.run(ui.texts, w)


async def wait_text(ui: UI, pred: Any, what: str, timeout: float = 20) -> float:
    """Poll the window's labels until ``pred(texts)``; returns when it held."""
    deadline = time.monotonic() + timeout
    while True:
        texts = await texts_of(ui)
        if pred(texts):
            return time.monotonic()
        assert time.monotonic() < deadline, f"{what}; the window shows {texts}"
        await asyncio.sleep(0.05)


async def button(ui: UI, name: str) -> Any:
    w = await ui.wait_window(MANAGER, TITLE)
    b = await ui.run(ui.find, w, "push button", name)
    assert b is not None, f"no {name} button"
    return b


async def test_manager_window(
    policy_bus: tuple[str, Path],
    guest_dir: Path,
    netns: str,
    gui: Gui,
    ui: UI,
    screenshots: Path,
) -> None:
    address, tmp = policy_bus
    daemon = Daemon(address, tmp, guest_dir)
    config = app_config(LISTER, one={"application": "app", "resources": ["lan", "docs"]})
    try:
        with marked_dir("mgr.", "marker-from-the-host") as shared, readable_tmpdir("docs.") as docs:
            config["resources"]["docs"]["path"] = str(docs)
            await run_checks(daemon, config, netns, gui, ui, shared, screenshots)
    finally:
        await daemon.stop()
        kill_leftover_vmms(daemon.state_dir)


async def run_checks(
    daemon: Daemon,
    config: dict[str, Any],
    netns: str,
    gui: Gui,
    ui: UI,
    shared: Path,
    screenshots: Path,
) -> None:
    c = await daemon.start(config, extra_args=["--netns", netns])
    docs = config["resources"]["docs"]["path"]
    # A permanent grant is made while the instance is stopped: the reader sees it.
    (permanent,) = await c.manager(
        "Grant", "ssa{sv}", "one", str(shared), {"lifetime": Variant("s", "permanent")}
    )

    # 1. A reader sees the instance and its configured resources.
    reader = gui.start("manager", daemon.address, user=NOBODY)
    await ui.wait_window(MANAGER, TITLE)
    await wait_text(ui, lambda t: "one" in t and "stopped" in t, "no stopped instance")
    resources = [
        "lan (network) — isolated network",
        f"docs (directory) — {docs} (read-only)",
    ]
    await wait_text(ui, lambda t: all(r in t for r in resources), "no configured resources")
    texts = await texts_of(ui)
    assert texts.index("Resources") < texts.index(resources[0]) < texts.index("Grants"), texts
    # Its Start is refused, and the window says so.
    ui.focus(TITLE)
    await ui.click(TITLE, await button(ui, "Start"))
    await wait_text(
        ui, lambda t: any(x.startswith("Start one: Not allowed") for x in t), "no refusal shown"
    )
    ui.display.screenshot(screenshots / "manager-refused.png", ui.x_window(TITLE))
    assert (await props(c, "one"))["State"] == "stopped"
    # So is its Revoke; the grant stays.
    await wait_text(ui, lambda t: any(str(shared) in x for x in t), "the grant is not listed")
    await ui.click(TITLE, await button(ui, "Revoke"))
    refused = f"Revoke {shared}: Not allowed: the bus lets only root and the group spectrum do this"
    await wait_text(ui, lambda t: refused in t, "no refusal of the Revoke shown")
    (rows,) = await c.manager("ListGrants")
    assert [r[5] for r in rows] == [permanent], rows
    gui.stop(reader)
    await c.call(permanent, GRANT_IFACE, "Revoke")
    await ui.wait_window(MANAGER, TITLE, gone=True)
    # Nor may it be the agent: its window says so.
    agent = gui.start("agent", daemon.address, user=NOBODY)
    status = await ui.wait_window("spectrum-agent", "Spectrum agent: not active")
    text = " ".join(await ui.run(ui.texts, status))
    assert "Register as the agent: Not allowed" in text, text
    gui.stop(agent)

    # 2. root's window: Start, and the new state shows within a second of the signal.
    running_at: list[float] = []
    path = instance_path("one")

    def on_signal(msg: Message) -> bool:
        if (
            msg.member == "PropertiesChanged"
            and msg.path == path
            and msg.body[0] == INSTANCE_IFACE
            and "State" in msg.body[1]
            and msg.body[1]["State"].value == "running"
        ):
            running_at.append(time.monotonic())
        return False

    c.bus.add_message_handler(on_signal)
    await c.add_match(f"type='signal',interface='org.freedesktop.DBus.Properties',path='{path}'")
    gui.start("manager", daemon.address)
    await ui.wait_window(MANAGER, TITLE)
    await wait_text(ui, lambda t: "one" in t and "stopped" in t, "no stopped instance")
    # Watch the row's state label alone: one read per poll, so the poll's own
    # time (a walk of the whole window is slow on a loaded machine) is not counted.
    window = await ui.wait_window(MANAGER, TITLE)
    state_label = await ui.run(ui.find, window, "label", "stopped")
    assert state_label is not None
    ui.focus(TITLE)
    await ui.click(TITLE, await button(ui, "Start"))
    deadline = time.monotonic() + 60
    while (await ui.run(lambda: state_label.name)) != "running":
        assert time.monotonic() < deadline, "never shown running"
        await asyncio.sleep(0.02)
    shown_at = time.monotonic()
    assert running_at, "the daemon never said running"
    late = shown_at - running_at[0]
    print(f"the window showed 'running' {late * 1000:.0f} ms after the daemon's signal")
    assert late < 1.0, f"shown {late:.2f} s late"

    # 3. The guest's grant and network are listed; Revoke takes the directory away.
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_for(c, "one", lambda p: p["GuestReady"], timeout=60)
    await wait_log(log, "ls: ")
    before = time.time() + 600
    (gpath,) = await c.manager(
        "Grant", "ssa{sv}", "one", str(shared), {"duration": Variant("t", 600)}
    )
    # The window shows the expiry to the minute; the call may have crossed one.
    expiries = {time.strftime("%H:%M", time.localtime(t)) for t in (before, time.time() + 600)}
    await wait_log(log, "marker-from-the-host", timeout=20)
    (nets,) = [(await props(c, "one"))["NetworkInterfaces"]]
    tap = nets[0][1]
    await wait_text(
        ui,
        lambda t: any(str(shared) in x and any(f"until {e}" in x for e in expiries) for x in t),
        "no grant listed with its expiry",
    )
    await wait_text(ui, lambda t: any(f"lan: tap {tap}" in x for x in t), "no network listed")
    ui.display.screenshot(screenshots / "manager.png", ui.x_window(TITLE))
    ui.focus(TITLE)
    await ui.click(TITLE, await button(ui, "Revoke"))
    await wait_text(ui, lambda t: not any(str(shared) in x for x in t), "the grant stays listed")
    (rows,) = await c.manager("ListGrants")
    assert rows == [], f"{gpath} was not revoked"
    after = await output_after(log, settle=2.0, window=2.5)
    assert "ls: " in after and "marker-from-the-host" not in after, after[-500:]

    # 4. Stop from the window: the guest is asked to power off, and the row
    # follows the state until the instance is stopped.
    seen = [await ui.run(lambda: state_label.name)]
    ui.focus(TITLE)
    await ui.click(TITLE, await button(ui, "Stop"))
    deadline = time.monotonic() + 60
    while seen[-1] != "stopped":
        assert time.monotonic() < deadline, f"never shown stopped; shown: {seen}"
        await asyncio.sleep(0.02)
        if (shown := await ui.run(lambda: state_label.name)) != seen[-1]:
            seen.append(shown)
    assert seen == ["running", "stopping", "stopped"], seen
    state = await props(c, "one")
    assert state["State"] == "stopped", state
    line = f"State: stopped ({state['StateReason']})"
    await wait_text(ui, lambda t: line in t, "the reason is not shown")
    print(line)
    assert "SIGTERM" not in line and "SIGKILL" not in line and "killed" not in line, line

    # 5. Start again, and Kill from the window.
    await ui.click(TITLE, await button(ui, "Start"))
    await wait_for(c, "one", lambda p: p["State"] == "running", timeout=60)
    await wait_text(ui, lambda t: "running" in t, "not shown running")
    await ui.click(TITLE, await button(ui, "Kill"))
    await wait_for(c, "one", lambda p: p["State"] in ("stopped", "failed"), timeout=30)
    await wait_text(ui, lambda t: "running" not in t, "still shown running")
