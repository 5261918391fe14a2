"""``spectrum-agent`` (the trusted prompt) and ``spectrum-manager`` (the window).

Both take ``--bus session|system|ADDRESS`` like spectrumctl (default:
``$SPECTRUM_BUS``, else the system bus). A bus that cannot be reached, or one
that closes, is said in a window and tried again every few seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from gi.repository import Gdk, Gio, GLib, Gtk

from spectrumd.desktop import client
from spectrumd.desktop.agent import Agent
from spectrumd.desktop.dialog import ConfirmDialog
from spectrumd.desktop.model import Answer, PendingRequest, ResourceView, printable

log = logging.getLogger("spectrum-agent")
RECONNECT_SECONDS = 3
AGENT_APP_ID = "org.spectrum_os.Spectrum1.Agent"
MANAGER_APP_ID = "org.spectrum_os.Spectrum1.Manager"


class StatusWindow(Gtk.Window):
    """A problem the user must know about the agent, e.g. another agent is registered."""

    def __init__(self, app: Gtk.Application, title: str) -> None:
        super().__init__(application=app, title=title)
        self.set_default_size(420, -1)
        self.label = Gtk.Label(label="", wrap=True, xalign=0.0)
        for side in ("top", "bottom", "start", "end"):
            getattr(self.label, f"set_margin_{side}")(18)
        self.set_child(self.label)


class DialogPrompter:
    """The agent's Prompter: one ConfirmDialog per shown request."""

    def __init__(self, app: Gtk.Application) -> None:
        self.app = app
        self.agent: Agent | None = None
        self.dialogs: dict[str, ConfirmDialog] = {}
        self._status: StatusWindow | None = None
        self._dismissed = ""  # the status text the user closed

    def show(self, req: PendingRequest, view: ResourceView) -> None:
        def answered(answer: Answer | None) -> None:
            if self.agent is not None:
                self.agent.end(req.id, answer)
            else:
                self.close(req.id)

        dialog = ConfirmDialog(self.app, req, view, answered)
        self.dialogs[req.id] = dialog
        dialog.present()

    def close(self, request_id: str) -> None:
        dialog = self.dialogs.pop(request_id, None)
        if dialog is not None:
            dialog.dismiss()

    def close_all(self) -> None:
        for rid in list(self.dialogs):
            self.close(rid)

    def status(self, text: str | None) -> None:
        if text is None:
            self._dismissed = ""
            if self._status is not None:
                self._status.destroy()
                self._status = None
            return
        label = f"{printable(text, 400)}\n\nTrying again every few seconds."
        if self._status is None and label == self._dismissed:
            return  # the user closed it; show it again only for news
        if self._status is None:
            self._status = StatusWindow(self.app, "Spectrum agent: not active")
            self._status.connect("close-request", self._status_closed)
            self._status.label.set_label(label)
            self._status.present()
        elif self._status.label.get_label() != label:
            # Retries repeat the message: update it, but never take the focus again.
            self._status.label.set_label(label)

    def notice(self, text: str) -> None:
        window = StatusWindow(self.app, "Spectrum agent: message")
        window.label.set_label(printable(text, 600))
        window.present()

    def _status_closed(self, _w: Gtk.Window) -> bool:
        if self._status is not None:
            self._dismissed = self._status.label.get_label()
        self._status = None
        return False


class Reconnecting:
    """Opens the bus, hands the connection to ``use``, and starts over when it closes."""

    def __init__(
        self,
        spec: str,
        use: Callable[[Gio.DBusConnection], None],
        lost: Callable[[str | None], None],
    ) -> None:
        self.spec = spec
        self.use = use
        self.lost = lost
        self.conn: Gio.DBusConnection | None = None

    def start(self) -> bool:
        try:
            conn = client.open_connection(self.spec)
        except client.ConnectError as e:
            log.warning("%s", e)
            self.lost(str(e))
            GLib.timeout_add_seconds(RECONNECT_SECONDS, self.start)
            return GLib.SOURCE_REMOVE
        conn.set_exit_on_close(False)
        conn.connect("closed", self._closed)
        self.conn = conn
        self.lost(None)
        self.use(conn)
        return GLib.SOURCE_REMOVE

    def _closed(self, _conn: Gio.DBusConnection, _remote: bool, _err: object) -> None:
        self.conn = None
        self.lost(f"the connection to the {self.spec} bus closed")
        GLib.timeout_add_seconds(RECONNECT_SECONDS, self.start)


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=what)
    p.add_argument(
        "--bus", help="session, system or a D-Bus address (default: $SPECTRUM_BUS or system)"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _display_or_exit(prog: str) -> None:
    # Not Gtk.init_check(): PyGObject calls it at import, and a second call says True.
    if Gdk.Display.get_default() is None:
        sys.exit(f"{prog}: cannot open a display (neither WAYLAND_DISPLAY nor DISPLAY works)")


def _app(app_id: str, prgname: str) -> Gtk.Application:
    # The program's name is what window lists and accessibility tools show.
    GLib.set_prgname(prgname)
    GLib.set_application_name(prgname)
    # NON_UNIQUE: uniqueness would need the session bus, which a test display or a
    # bare X session may not have; two agents are kept apart by spectrumd (Busy).
    return Gtk.Application(application_id=app_id, flags=Gio.ApplicationFlags.NON_UNIQUE)


def agent_main(argv: list[str] | None = None) -> int:
    args = _parser("spectrum-agent", "Confirm spectrumd's grant requests in dialogs.").parse_args(
        argv
    )
    logging.basicConfig(level=args.log_level.upper(), format="spectrum-agent: %(message)s")
    spec = client.bus_spec(args.bus)
    _display_or_exit("spectrum-agent")
    app = _app(AGENT_APP_ID, "spectrum-agent")
    prompter = DialogPrompter(app)

    def use(conn: Gio.DBusConnection) -> None:
        prompter.agent = Agent(conn, prompter)

    def lost(text: str | None) -> None:
        if text is not None:
            prompter.agent = None
            prompter.close_all()
        prompter.status(text)

    def activate(_app: Gtk.Application) -> None:
        app.hold()  # the agent lives without windows
        Reconnecting(spec, use, lost).start()

    app.connect("activate", activate)
    return app.run([sys.argv[0]])


def manager_main(argv: list[str] | None = None) -> int:
    from spectrumd.desktop.manager import ManagerWindow

    args = _parser(
        "spectrum-manager", "Instances, their state and what they can reach."
    ).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="spectrum-manager: %(message)s")
    spec = client.bus_spec(args.bus)
    _display_or_exit("spectrum-manager")
    app = _app(MANAGER_APP_ID, "spectrum-manager")

    def activate(_app: Gtk.Application) -> None:
        window = ManagerWindow(app)
        window.present()
        Reconnecting(spec, window.use_connection, window.connection_lost).start()

    app.connect("activate", activate)
    return app.run([sys.argv[0]])


if __name__ == "__main__":
    sys.exit(agent_main())
