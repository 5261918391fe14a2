"""The desktop's D-Bus layer, on Gio so that replies and signals arrive on the
GTK main loop. Calls are asynchronous and end in a callback with either the
reply or a message for the user; nothing here blocks the loop, except opening
the connection at start-up."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from gi.repository import Gio, GLib

from spectrumd.bus.names import BUS_NAME, INSTANCE_IFACE, MANAGER_IFACE, MANAGER_PATH
from spectrumd.desktop.model import error_text, split_gerror

log = logging.getLogger(__name__)

GRANT_IFACE = "org.spectrum_os.Spectrum1.Grant"
REQUEST_IFACE = "org.spectrum_os.Spectrum1.Request"
AGENT_IFACE = "org.spectrum_os.Spectrum1.Agent"
AGENT_PATH = "/org/spectrum_os/Spectrum1/desktop_agent"
REQUEST_PREFIX = MANAGER_PATH + "/request/"
GRANT_PREFIX = MANAGER_PATH + "/grant/"
CALL_TIMEOUT_MS = 30_000
# Start and Stop reply when the transition is over; a stop may wait for the guest.
LONG_CALL_TIMEOUT_MS = 180_000

# dbus/org.spectrum_os.Spectrum1.Agent.xml, which a unit test compares with this.
AGENT_XML = """<node>
  <interface name="org.spectrum_os.Spectrum1.Agent">
    <method name="Confirm">
      <arg name="request_id" direction="in" type="s" />
      <arg name="instance" direction="in" type="s" />
      <arg name="application" direction="in" type="s" />
      <arg name="resource" direction="in" type="s" />
      <arg name="access" direction="in" type="s" />
      <arg name="lifetime" direction="in" type="s" />
      <arg name="details" direction="in" type="a{sv}" />
      <arg name="allow" direction="out" type="b" />
      <arg name="lifetime" direction="out" type="s" />
      <arg name="expires_at" direction="out" type="t" />
    </method>
    <method name="Cancel">
      <arg name="request_id" direction="in" type="s" />
    </method>
  </interface>
</node>"""

Done = Callable[[Any, str | None], None]  # (unpacked reply or None, error text or None)


class ConnectError(Exception):
    """The bus cannot be reached; the message is for the user."""


def bus_spec(cli_value: str | None) -> str:
    """``--bus`` as spectrumctl reads it: the option, else ``$SPECTRUM_BUS``, else system."""
    return cli_value or os.environ.get("SPECTRUM_BUS") or "system"


def open_connection(spec: str) -> Gio.DBusConnection:
    """``session``, ``system`` or a D-Bus address. Raises ConnectError."""
    try:
        if spec in ("session", "system"):
            kind = Gio.BusType.SESSION if spec == "session" else Gio.BusType.SYSTEM
            return Gio.bus_get_sync(kind, None)
        flags = (
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
            | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
        )
        return Gio.DBusConnection.new_for_address_sync(spec, flags, None, None)
    except GLib.Error as e:
        raise ConnectError(f"cannot reach the {spec} bus: {e.message}") from None


def message_of(what: str, err: GLib.Error) -> str:
    """A GLib error from a call, as a line for the user (see model.error_text)."""
    # PyGObject hands over a copy of the GError, so strip_remote_error would not
    # change err.message: take the "GDBus.Error:NAME: " prefix off ourselves.
    name, message = split_gerror(err.message)
    if not name and err.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CLOSED):
        return f"{what}: the connection to the bus is closed"
    return error_text(what, name or "Failed", message)


def call(
    conn: Gio.DBusConnection,
    path: str,
    iface: str,
    method: str,
    args: GLib.Variant | None,
    done: Done,
    what: str,
    timeout_ms: int = CALL_TIMEOUT_MS,
) -> None:
    """Call ``method`` on spectrumd; ``done(reply, None)`` or ``done(None, message)``."""

    def finish(source: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
        try:
            reply = source.call_finish(result)
        except GLib.Error as e:
            done(None, message_of(what, e))
            return
        done(reply.unpack() if reply is not None else (), None)

    conn.call(
        BUS_NAME,
        path,
        iface,
        method,
        args,
        None,
        Gio.DBusCallFlags.NONE,
        timeout_ms,
        None,
        finish,
    )


def manager_call(
    conn: Gio.DBusConnection,
    method: str,
    args: GLib.Variant | None,
    done: Done,
    what: str,
) -> None:
    call(conn, MANAGER_PATH, MANAGER_IFACE, method, args, done, what)


def instance_call(conn: Gio.DBusConnection, path: str, method: str, done: Done, what: str) -> None:
    timeout = LONG_CALL_TIMEOUT_MS if method in ("Start", "Stop") else CALL_TIMEOUT_MS
    call(conn, path, INSTANCE_IFACE, method, None, done, what, timeout)


def revoke_grant(conn: Gio.DBusConnection, path: str, done: Done, what: str) -> None:
    call(conn, path, GRANT_IFACE, "Revoke", None, done, what)


def watch_daemon(
    conn: Gio.DBusConnection, appeared: Callable[[str], None], vanished: Callable[[], None]
) -> int:
    """Follow the owner of spectrumd's name (also across daemon restarts)."""
    return Gio.bus_watch_name_on_connection(
        conn,
        BUS_NAME,
        Gio.BusNameWatcherFlags.NONE,
        lambda _c, _name, owner: appeared(owner),
        lambda _c, _name: vanished(),
    )


def object_manager(conn: Gio.DBusConnection) -> Gio.DBusObjectManagerClient:
    """spectrumd's objects; follows the name's owner, so a restarted daemon's
    objects replace the old ones by themselves (object-added/removed)."""
    return Gio.DBusObjectManagerClient.new_sync(
        conn,
        Gio.DBusObjectManagerClientFlags.NONE,
        BUS_NAME,
        MANAGER_PATH,
        None,
        None,
        None,
    )


def cached(proxy: Gio.DBusProxy, name: str, default: Any = None) -> Any:
    value = proxy.get_cached_property(name)
    return default if value is None else value.unpack()
