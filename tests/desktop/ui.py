"""Reading and driving the GTK programs like a user: AT-SPI to see, xdotool to act.

AT-SPI calls block, so they run on one worker thread (``UI.run``), never on
the test's event loop directly. Clicks and keys are real X input events
(xdotool), so the click-through guard is met as a user's click would meet it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gi.repository import GLib

from tests.desktop.display import Display


class UI:
    def __init__(self, display: Display) -> None:
        self.display = display
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atspi")
        # Atspi finds the accessibility bus through these; set before the import.
        os.environ["AT_SPI_BUS_ADDRESS"] = display.a11y_bus
        os.environ["DISPLAY"] = display.display
        import pyatspi

        self.pyatspi = pyatspi

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- blocking helpers (run through ``run``) ------------------------------------

    def windows(self, app_name: str) -> list[Any]:
        desktop = self.pyatspi.Registry.getDesktop(0)
        out = []
        for i in range(desktop.childCount):
            try:
                app = desktop.getChildAtIndex(i)
                if app is not None and app.name == app_name:
                    out.extend(w for w in app if w is not None)
            except GLib.Error:
                continue  # an application that has just gone away
        return out

    def window(self, app_name: str, title_part: str) -> Any | None:
        for w in self.windows(app_name):
            try:
                if title_part in (w.name or ""):
                    return w
            except GLib.Error:
                continue  # closed while we looked
        return None

    def walk(self, acc: Any) -> list[Any]:
        """``acc`` and everything below it; what has gone meanwhile is left out."""
        out = [acc]
        try:
            children = [c for c in acc if c is not None]
        except GLib.Error:
            return out
        for child in children:
            out.extend(self.walk(child))
        return out

    def texts(self, window: Any) -> list[str]:
        out = []
        for a in self.walk(window):
            try:
                if a.getRoleName() == "label" and a.name:
                    out.append(a.name)
            except GLib.Error:
                continue
        return out

    def find(self, window: Any, role: str, name: str) -> Any | None:
        for a in self.walk(window):
            try:
                if a.getRoleName() == role and a.name == name:
                    return a
            except GLib.Error:
                continue
        return None

    def sensitive(self, acc: Any) -> bool:
        return bool(acc.getState().contains(self.pyatspi.STATE_SENSITIVE))

    def centre(self, acc: Any, across: float = 0.5) -> tuple[int, int]:
        """A point of ``acc`` in its window: ``across`` its width, half its height."""
        e = acc.queryComponent().getExtents(self.pyatspi.WINDOW_COORDS)
        return e.x + int(e.width * across), e.y + e.height // 2

    # -- async conveniences ------------------------------------------------------------

    async def wait_window(
        self, app_name: str, title_part: str, timeout: float = 20, gone: bool = False
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            w = await self.run(self.window, app_name, title_part)
            if (w is None) == gone:
                return w
            if time.monotonic() > deadline:
                names = [x.name for x in await self.run(self.windows, app_name)]
                state = "still there" if gone else "not shown"
                raise AssertionError(f"window {title_part!r} {state}; windows: {names}")
            await asyncio.sleep(0.05)

    def x_window(self, title: str) -> str:
        ids = self.display.xdotool("search", "--name", title).split()
        assert ids, f"no X window named {title!r}"
        return ids[-1]

    async def click(self, title: str, acc: Any, across: float = 0.5) -> None:
        """A real left click on ``acc``'s centre (or ``across`` its width), in the X
        window named ``title``."""
        x, y = await self.run(self.centre, acc, across)
        wid = self.x_window(title)
        self.display.xdotool("mousemove", "--window", wid, str(x), str(y), "click", "1")

    def focus(self, title: str) -> None:
        self.display.xdotool("windowfocus", "--sync", self.x_window(title))

    def unfocus(self) -> None:
        """Give the keyboard focus to the root window: every window loses it. The
        pointer goes to the screen's far corner first (no window is there): with
        the focus on the root, GTK takes a window under the pointer as focused."""
        width, height = self.display.xdotool("getdisplaygeometry").split()
        root = self.display.xdotool("search", "--maxdepth", "0", "--name", "").split()[0]
        self.display.xdotool(
            "mousemove", str(int(width) - 1), str(int(height) - 1), "windowfocus", root
        )

    async def focus_and_click(self, title: str, acc: Any) -> None:
        """Focus the X window named ``title`` and click ``acc``'s centre at once: one
        xdotool run, so the application gets the two events back to back however
        slow this test is."""
        x, y = await self.run(self.centre, acc)
        wid = self.x_window(title)
        self.display.xdotool(
            "windowfocus", "--sync", wid, "mousemove", "--window", wid, str(x), str(y), "click", "1"
        )

    def type(self, text: str) -> None:
        """Type ``text`` into whatever has the keyboard focus."""
        self.display.xdotool("type", "--delay", "50", text)

    def key(self, title: str, key: str) -> None:
        # Focus, then type through XTEST: GTK ignores events sent to a window (XSendEvent).
        self.focus(title)
        self.display.xdotool("key", key)
