"""A real guest asks through its portal; the desktop agent's dialog answers.

One guest, five requests in a row: a click in the first second does nothing and
a click after it grants (the guest reads the file); Deny, Escape and Enter
deny; a request still open when the instance stops closes its dialog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
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
        yield [stack.enter_context(marked_dir(f"ask{i}.", f"marker-{i}")) for i in range(5)]


def asker(dirs: list[Path]) -> str:
    d = [str(x) for x in dirs]
    return (
        f'p=$(spectrum-request dir {d[0]} --lifetime running); echo "first rc=$? $p"; '
        'cat "$p/marker"; '
        f'spectrum-request dir {d[1]}; echo "second rc=$?"; '
        f'spectrum-request dir {d[2]}; echo "third rc=$?"; '
        f'spectrum-request dir {d[3]}; echo "fourth rc=$?"; '
        f'spectrum-request dir {d[4]}; echo "fifth rc=$?"; '
        "exec sleep 600"
    )


async def dialog_for(ui: UI, path: Path) -> object:
    """The agent's dialog once it shows ``path`` (the previous one may still be closing)."""
    deadline = time.monotonic() + 60
    while True:
        w = await ui.run(ui.window, AGENT, TITLE)
        if w is not None and str(path) in await ui.run(ui.texts, w):
            return w
        assert time.monotonic() < deadline, f"no dialog for {path}"
        await asyncio.sleep(0.05)


async def test_guest_request_through_the_dialog(
    daemon: Daemon, gui: Gui, ui: UI, dirs: list[Path], screenshots: Path
) -> None:
    c = await daemon.start(app_config(asker(dirs)))
    gui.start("agent", daemon.address)
    await registrations(daemon, 1)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])

    # 1. The dialog names the instance, the application, the host path and the access.
    dialog = await dialog_for(ui, dirs[0])
    seen = time.monotonic()
    texts = await ui.run(ui.texts, dialog)
    for expected in ("one", "app", str(dirs[0]), "read-only"):
        assert expected in texts, (expected, texts)
    allow = await ui.run(ui.find, dialog, "push button", "Allow")
    assert allow is not None
    # A click in the first second does nothing. The button is inactive before the
    # click and still after it, so the click landed inside that second.
    ui.focus(TITLE)
    assert not await ui.run(ui.sensitive, allow), "active at once"
    await ui.click(TITLE, allow)
    assert not await ui.run(ui.sensitive, allow), "the test was too slow to click early"
    await asyncio.sleep(0.5)
    (rows,) = await c.manager("ListGrants")
    assert rows == [], "an early click granted"
    assert "first rc=" not in log.read_text(errors="replace")
    assert await ui.run(ui.window, AGENT, TITLE) is not None, "the dialog went away"
    # After the delay the same click grants, and the guest reads the file.
    await wait_sensitive(ui, allow)
    armed_after = time.monotonic() - seen
    ui.display.screenshot(screenshots / "agent-dialog.png", ui.x_window(TITLE))
    await ui.click(TITLE, allow)
    text = await wait_log(log, "first rc=", timeout=30)
    assert f"first rc=0 /mnt/spectrum/{dirs[0].name}" in text
    await wait_log(log, "marker-0", timeout=20)
    (rows,) = await c.manager("ListGrants")
    assert [(r[1], r[2], r[4]) for r in rows] == [("one", str(dirs[0]), "running")]
    # The second counts from the focus, which came at most a poll or two before we saw it.
    assert armed_after >= 0.5, f"the buttons became active after {armed_after:.2f} s"

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

    # 5. The instance stops while its request is open: the dialog closes by itself.
    await dialog_for(ui, dirs[4])
    await c.manager("StopInstance", "s", "one")
    await wait_for(c, "one", lambda p: p["State"] in ("stopped", "failed"), timeout=60)
    await ui.wait_window(AGENT, TITLE, gone=True, timeout=10)
    (rows,) = await c.manager("ListGrants")
    assert rows == [], "the running grant ended with the instance"
