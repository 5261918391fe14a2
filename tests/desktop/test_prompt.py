"""A real guest asks through its portal; the desktop agent's dialog answers.

One guest, eight requests in a row:
- a path with a symlink in it is refused by the daemon before the agent is
  asked: no dialog, and the guest's spectrum-request prints why;
- a click in the first second does nothing, and a click after it grants (the
  guest reads the file);
- Deny, Escape and Enter deny;
- "For N minutes" with N typed in: the daemon's grant ends N minutes from now;
- "Permanently": the daemon's grant is permanent, and outlives the instance's run;
- a request still open when the instance stops closes its dialog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrumd.desktop.client import GRANT_IFACE
from tests.conftest import Daemon, readable_tmpdir
from tests.desktop.conftest import Gui
from tests.desktop.test_agent_bus import registrations, wait_sensitive
from tests.desktop.ui import UI
from tests.integration.helpers import app_config, marked_dir, props, wait_for, wait_log

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AGENT = "spectrum-agent"
TITLE = "Spectrum: one asks for access"


@pytest.fixture
def dirs() -> Iterator[list[Path]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(marked_dir(f"ask{i}.", f"marker-{i}")) for i in range(7)]


@pytest.fixture
def through_symlink() -> Iterator[Path]:
    """``BASE/link/sub``, with ``link`` a symlink to ``BASE/real``: a path the
    daemon refuses to grant, though it reaches a real directory."""
    with readable_tmpdir("sym.") as base:
        (base / "real" / "sub").mkdir(parents=True)
        (base / "link").symlink_to(base / "real")
        yield base / "link" / "sub"


def asker(dirs: list[Path], refused: Path) -> str:
    d = [str(x) for x in dirs]
    return (
        f'spectrum-request dir {refused} 2>&1; echo "refused rc=$?"; '
        f'p=$(spectrum-request dir {d[0]} --lifetime running); echo "first rc=$? $p"; '
        'cat "$p/marker"; '
        f'spectrum-request dir {d[1]}; echo "second rc=$?"; '
        f'spectrum-request dir {d[2]}; echo "third rc=$?"; '
        f'spectrum-request dir {d[3]}; echo "fourth rc=$?"; '
        f'p=$(spectrum-request dir {d[4]}); echo "fifth rc=$? $p"; cat "$p/marker"; '
        f'p=$(spectrum-request dir {d[5]}); echo "sixth rc=$? $p"; cat "$p/marker"; '
        f'spectrum-request dir {d[6]}; echo "seventh rc=$?"; '
        "exec sleep 600"
    )


async def grant_property(daemon: Daemon, path: str, name: str) -> Any:
    assert daemon.client is not None
    (value,) = await daemon.client.call(
        path, "org.freedesktop.DBus.Properties", "Get", "ss", [GRANT_IFACE, name]
    )
    return value.value


async def dialog_for(ui: UI, path: Path) -> object:
    """The agent's dialog once it shows ``path`` (the previous one may still be closing)."""
    deadline = time.monotonic() + 60
    while True:
        w = await ui.run(ui.window, AGENT, TITLE)
        if w is not None and str(path) in await ui.run(ui.texts, w):
            return w
        assert time.monotonic() < deadline, f"no dialog for {path}"
        await asyncio.sleep(0.05)


async def wait_texts(ui: UI, window: object, part: str, timeout: float = 20) -> None:
    """Until one of ``window``'s labels holds ``part``."""
    deadline = time.monotonic() + timeout
    while not any(part in t for t in await ui.run(ui.texts, window)):
        assert time.monotonic() < deadline, f"no label says {part!r}"
        await asyncio.sleep(0.05)


async def test_guest_request_through_the_dialog(
    daemon: Daemon,
    gui: Gui,
    ui: UI,
    dirs: list[Path],
    through_symlink: Path,
    screenshots: Path,
) -> None:
    c = await daemon.start(app_config(asker(dirs, through_symlink)))
    gui.start("agent", daemon.address)
    await registrations(daemon, 1)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])

    # 0. A path the daemon refuses: the guest is told why, and no dialog appears.
    text = await wait_log(log, "refused rc=", timeout=60)
    link = through_symlink.parent
    assert (
        f'spectrum-request: "{through_symlink}": component "{link}" is a symbolic link'
        " (no symlink may appear in a granted path)"
    ) in text, text[-800:]
    assert "refused rc=2" in text
    # Refused before it became a request: the audit log has none, so the agent had none.
    assert f'resource="{through_symlink}"' not in daemon.stderr_path.read_text()

    # 1. The dialog names the instance, the application, the host path and the access.
    # It is the first one the user sees: none came for the refused path.
    dialog = await dialog_for(ui, dirs[0])
    texts = await ui.run(ui.texts, dialog)
    for expected in ("one", "app", str(dirs[0]), "read-only"):
        assert expected in texts, (expected, texts)
    assert not any(str(through_symlink) in t for t in texts), texts
    allow = await ui.run(ui.find, dialog, "push button", "Allow")
    assert allow is not None
    # A click in the first second of the focus does nothing. The dialog loses the
    # focus (and says so), then gets it back and the click at once: GTK sees the two
    # back to back, however slow this test is. Nothing is granted, the dialog stays,
    # and its buttons become active a second after that focus.
    ui.unfocus()
    await wait_texts(ui, dialog, "once this window has the focus")
    assert not await ui.run(ui.sensitive, allow), "active without the focus"
    focused = time.monotonic()
    await ui.focus_and_click(TITLE, allow)
    await asyncio.sleep(0.5)
    (rows,) = await c.manager("ListGrants")
    assert rows == [], "an early click granted"
    assert "first rc=" not in log.read_text(errors="replace")
    assert await ui.run(ui.window, AGENT, TITLE) is not None, "the dialog went away"
    # After the delay the same click grants, and the guest reads the file.
    await wait_sensitive(ui, allow)
    armed_after = time.monotonic() - focused
    ui.display.screenshot(screenshots / "agent-dialog.png", ui.x_window(TITLE))
    await ui.click(TITLE, allow)
    text = await wait_log(log, "first rc=", timeout=30)
    assert f"first rc=0 /mnt/spectrum/{dirs[0].name}" in text
    await wait_log(log, "marker-0", timeout=20)
    (rows,) = await c.manager("ListGrants")
    assert [(r[1], r[2], r[4]) for r in rows] == [("one", str(dirs[0]), "running")]
    # The second counts from the focus, given just after ``focused``.
    assert armed_after >= 0.9, f"the buttons became active {armed_after:.2f} s after the focus"

    # 2. Deny denies.
    dialog = await dialog_for(ui, dirs[1])
    deny = await ui.run(ui.find, dialog, "push button", "Deny")
    ui.focus(TITLE)
    await wait_sensitive(ui, deny)
    await ui.click(TITLE, deny)
    assert "second rc=1" in await wait_log(log, "second rc=", timeout=30)

    # 3. Escape denies, at once (no delay for a denial).
    await dialog_for(ui, dirs[2])
    ui.key(TITLE, "Escape")
    assert "third rc=1" in await wait_log(log, "third rc=", timeout=30)

    # 4. Enter denies too, even once the buttons are active.
    dialog = await dialog_for(ui, dirs[3])
    ui.focus(TITLE)
    await wait_sensitive(ui, await ui.run(ui.find, dialog, "push button", "Allow"))
    ui.key(TITLE, "Return")
    assert "fourth rc=1" in await wait_log(log, "fourth rc=", timeout=30)
    (rows,) = await c.manager("ListGrants")
    assert len(rows) == 1, "no denial made a grant"

    # 5. "For N minutes", N typed in: the daemon's grant ends N minutes from now.
    dialog = await dialog_for(ui, dirs[4])
    ui.focus(TITLE)
    allow = await ui.run(ui.find, dialog, "push button", "Allow")
    await wait_sensitive(ui, allow)  # it takes the focus: type only after it
    # GTK 4.8 names grouped check buttons (shown as radio buttons) "check box".
    await ui.click(TITLE, await ui.run(ui.find, dialog, "check box", "For"))
    minutes = await ui.run(ui.find, dialog, "spin button", "Minutes")
    await ui.click(TITLE, minutes, across=0.2)  # in its text, left of its - and + buttons
    ui.display.xdotool("key", "ctrl+a")
    ui.type("7")
    ui.display.xdotool("key", "Tab")  # a spin button takes what was typed as it loses focus
    assert await ui.run(lambda: minutes.queryValue().currentValue) == 7
    asked_at = time.time()
    await ui.click(TITLE, allow)
    text = await wait_log(log, "fifth rc=", timeout=30)
    assert f"fifth rc=0 /mnt/spectrum/{dirs[4].name}" in text
    await wait_log(log, "marker-4", timeout=20)
    (rows,) = await c.manager("ListGrants")
    (until,) = [r for r in rows if r[2] == str(dirs[4])]
    assert until[4] == "until", until
    expires = await grant_property(daemon, until[5], "ExpiresAt") / 1e6
    assert asked_at + 7 * 60 - 2 < expires < time.time() + 7 * 60 + 2, (
        f"the grant ends {expires - asked_at:.0f} s after the click, not in 7 minutes"
    )

    # 6. "Permanently": a permanent grant.
    dialog = await dialog_for(ui, dirs[5])
    ui.focus(TITLE)
    allow = await ui.run(ui.find, dialog, "push button", "Allow")
    await wait_sensitive(ui, allow)
    permanently = "Permanently (also after restarts)"
    await ui.click(TITLE, await ui.run(ui.find, dialog, "check box", permanently))
    await ui.click(TITLE, allow)
    text = await wait_log(log, "sixth rc=", timeout=30)
    assert f"sixth rc=0 /mnt/spectrum/{dirs[5].name}" in text
    await wait_log(log, "marker-5", timeout=20)
    (rows,) = await c.manager("ListGrants")
    (permanent,) = [r for r in rows if r[2] == str(dirs[5])]
    assert permanent[4] == "permanent", permanent
    assert await grant_property(daemon, permanent[5], "ExpiresAt") == 0

    # 7. The instance stops while its request is open: the dialog closes by itself.
    await dialog_for(ui, dirs[6])
    await c.manager("StopInstance", "s", "one")
    await wait_for(c, "one", lambda p: p["State"] in ("stopped", "failed"), timeout=60)
    await ui.wait_window(AGENT, TITLE, gone=True, timeout=10)
    (rows,) = await c.manager("ListGrants")
    # The running and the 7-minute grants ended with the instance; the permanent one waits.
    assert [(r[2], r[4]) for r in rows] == [(str(dirs[5]), "permanent")], rows
    assert await grant_property(daemon, permanent[5], "State") == "waiting"
