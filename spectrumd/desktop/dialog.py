"""The confirmation dialog: one request, shown to the user who decides.

Against click-through (a click or key press meant for another window landing
here) it works like Qubes' prompt: the buttons stay inactive until the dialog
has been shown and focused for a second (model.ClickGuard), and losing focus
starts that second again. Enter and Escape always deny, and so does closing
the window; Deny is the default.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gi.repository import Gdk, GLib, Gtk, Pango

from spectrumd.desktop.model import (
    Answer,
    ClickGuard,
    PendingRequest,
    ResourceView,
    access_text,
    default_minutes,
    plan_answer,
    printable,
)
from spectrumd.desktop.widgets import instance_badge

TICK_MS = 100
WRAP_AT = 50
DENY_KEYS = (Gdk.KEY_Escape, Gdk.KEY_Return, Gdk.KEY_KP_Enter, Gdk.KEY_ISO_Enter)


def dialog_title(req: PendingRequest) -> str:
    return f"Spectrum: {printable(req.instance, 64)} asks for access"


class ConfirmDialog(Gtk.Window):
    """Calls ``on_answer`` once: an Answer (allow) or None (deny)."""

    def __init__(
        self,
        app: Gtk.Application,
        req: PendingRequest,
        view: ResourceView,
        on_answer: Callable[[Answer | None], None],
        delay: float | None = None,
    ) -> None:
        super().__init__(application=app, title=dialog_title(req))
        self.req = req
        self._on_answer = on_answer
        self._answered = False
        self._gone = False
        self.guard = ClickGuard() if delay is None else ClickGuard(delay)
        self.set_resizable(False)
        self.set_default_size(480, -1)

        box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=10)
        for side in ("top", "bottom", "start", "end"):
            getattr(box, f"set_margin_{side}")(16)
        self.set_child(box)

        # The instance's name on its colour, as in the management window.
        box.append(instance_badge(req.instance, big=True))

        app_name = printable(req.application, 64)
        if req.origin == "portal":
            asks = f"The application {app_name} asks for more access."
        else:
            asks = f"A program on the host asks for more access for {app_name}."
        headline = Gtk.Label(label=asks, xalign=0.0)
        box.append(headline)

        grid = Gtk.Grid(column_spacing=12, row_spacing=6)
        rows: list[tuple[str, str]] = [
            ("Instance", printable(req.instance, 64)),
            ("Application", printable(req.application, 64)),
            ("Resource", view.title),
            *[r for r in view.lines if r[1] != view.title],
            ("Access", access_text(req.access, view.kind)),
        ]
        for i, (key, value) in enumerate(rows):
            k = Gtk.Label(label=key, xalign=1.0, yalign=0.0)
            k.add_css_class("dim-label")
            v = Gtk.Label(label=value, xalign=0.0, selectable=False)
            if len(value) > WRAP_AT:
                # A wrapped label asks for the height it has at its narrowest: give
                # it a width, or the window grows tall and empty.
                v.set_wrap(True)
                v.set_wrap_mode(Pango.WrapMode.WORD_CHAR)
                v.set_width_chars(WRAP_AT)
                v.set_max_width_chars(WRAP_AT)
            grid.attach(k, 0, i, 1, 1)
            grid.attach(v, 1, i, 1, 1)
        box.append(grid)

        box.append(Gtk.Label(label="Allow for how long?", xalign=0.0))
        self.running = Gtk.CheckButton(label="While it runs")
        self.until = Gtk.CheckButton(label="For")
        self.permanent = Gtk.CheckButton(label="Permanently (also after restarts)")
        self.until.set_group(self.running)
        self.permanent.set_group(self.running)
        now_us = time.time_ns() // 1000
        asked = default_minutes(req, now_us)
        # The user may shorten what a request with an expiry asked for, not lengthen it.
        self.minutes = Gtk.SpinButton.new_with_range(1, asked if req.expires_at_us else 1440, 1)
        self.minutes.set_value(asked)
        self.minutes.update_property([Gtk.AccessibleProperty.LABEL], ["Minutes"])
        until_row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        until_row.append(self.until)
        until_row.append(self.minutes)
        until_row.append(Gtk.Label(label="minutes"))
        {"until": self.until, "permanent": self.permanent}.get(
            req.lifetime, self.running
        ).set_active(True)
        for w in (self.running, until_row, self.permanent):
            box.append(w)

        self.countdown = Gtk.Label(label="", xalign=0.0)
        self.countdown.add_css_class("dim-label")
        box.append(self.countdown)

        buttons = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8, halign=Gtk.Align.END)
        self.deny_button = Gtk.Button(label="Deny")
        self.allow_button = Gtk.Button(label="Allow")
        self.allow_button.add_css_class("destructive-action")
        self.deny_button.connect("clicked", lambda _b: self.answer(None))
        self.allow_button.connect("clicked", lambda _b: self._allow())
        buttons.append(self.deny_button)
        buttons.append(self.allow_button)
        box.append(buttons)
        self.set_default_widget(self.deny_button)

        keys = Gtk.EventControllerKey()
        keys.set_propagation_phase(Gtk.PropagationPhase.CAPTURE)
        keys.connect("key-pressed", self._key)
        self.add_controller(keys)
        self.connect("close-request", self._close_request)
        self.connect("map", lambda _w: self.guard.shown(time.monotonic(), self.is_active()))
        self.connect("notify::is-active", self._focus_changed)
        self._set_armed(False)
        self._tick_id = GLib.timeout_add(TICK_MS, self._tick)

    # -- the guard ---------------------------------------------------------------

    def _focus_changed(self, *_args: object) -> None:
        self.guard.focus(time.monotonic(), self.is_active())
        self._tick()

    def _tick(self) -> bool:
        if self._answered:
            self._tick_id = 0
            return GLib.SOURCE_REMOVE
        left = self.guard.remaining(time.monotonic())
        armed = left == 0.0
        if armed != self.allow_button.get_sensitive():
            self._set_armed(armed)
        if left is None:
            self.countdown.set_label("Buttons become active once this window has the focus.")
        elif not armed:
            self.countdown.set_label("Buttons become active in a moment…")
        else:
            self.countdown.set_label("Enter or Escape denies.")
        return GLib.SOURCE_CONTINUE

    def _set_armed(self, armed: bool) -> None:
        self.allow_button.set_sensitive(armed)
        self.deny_button.set_sensitive(armed)
        if armed:
            self.deny_button.grab_focus()

    # -- answers -----------------------------------------------------------------

    def _key(self, _ctl: Gtk.EventControllerKey, keyval: int, _code: int, _state: object) -> bool:
        if keyval in DENY_KEYS:
            self.answer(None)
            return True
        return False

    def _close_request(self, _w: Gtk.Window) -> bool:
        self.answer(None)
        self.dismiss()  # normally done already, by the agent that got the answer
        return True

    def _allow(self) -> None:
        # A click can only reach a sensitive button, but check the guard again: it is cheap.
        if not self.guard.armed(time.monotonic()):
            return
        if self.permanent.get_active():
            choice = "permanent"
        elif self.until.get_active():
            choice = "until"
        else:
            choice = "running"
        minutes = int(self.minutes.get_value())
        self.answer(plan_answer(self.req, choice, minutes, time.time_ns() // 1000))

    def answer(self, answer: Answer | None) -> None:
        if self._answered:
            return
        self._answered = True
        self._on_answer(answer)

    def dismiss(self) -> None:
        """Close without answering (the request ended elsewhere, or it was answered)."""
        self._answered = True
        if self._gone:
            return
        self._gone = True
        if self._tick_id:
            GLib.source_remove(self._tick_id)
            self._tick_id = 0
        self.destroy()
