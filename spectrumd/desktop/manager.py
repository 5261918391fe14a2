"""The management window: every instance with its live state, and what the
selected one can reach now (resources, grants, USB devices, networks).

Live means signals, not polling: the ObjectManager's object-added/removed and
PropertiesChanged (through GDBusObjectManagerClient's proxies), and the
Manager's USB signals. Any user the bus policy lets read sees it all; what a
user may not do (Start, Revoke, and listing USB devices, for callers outside
root and the group ``spectrum``) is refused by the bus or the daemon, and the
refusal is shown in the window's message bar.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gi.repository import Gio, GLib, Gtk, Pango

from spectrumd.bus.names import INSTANCE_IFACE, MANAGER_IFACE, MANAGER_PATH
from spectrumd.desktop import client
from spectrumd.desktop.model import (
    access_text,
    describe_resource,
    lifetime_text,
    parse_resource_list,
    printable,
)
from spectrumd.desktop.widgets import colour_chip, instance_badge

log = logging.getLogger(__name__)
USB_SIGNALS = ("UsbDeviceAdded", "UsbDeviceRemoved", "UsbDeviceAttached", "UsbDeviceDetached")
# Which buttons make sense in which state; the daemon decides anyway (InvalidState).
CAN_START = ("stopped", "failed")
CAN_STOP = ("starting", "running", "paused")
CAN_KILL = ("starting", "running", "paused", "stopping")


def _section(title: str) -> Gtk.Label:
    label = Gtk.Label(label=title, xalign=0.0)
    label.add_css_class("heading")
    label.set_margin_top(12)
    return label


def _text(value: str, dim: bool = False) -> Gtk.Label:
    label = Gtk.Label(label=value, xalign=0.0, wrap=True)
    label.set_wrap_mode(Pango.WrapMode.WORD_CHAR)
    if dim:
        label.add_css_class("dim-label")
    return label


class InstanceRow(Gtk.ListBoxRow):
    def __init__(self, path: str, name: str) -> None:
        super().__init__()
        self.path = path
        self.instance_name = name  # not "name": Gtk.Widget has a property of that name
        box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8)
        for side in ("top", "bottom", "start", "end"):
            getattr(box, f"set_margin_{side}")(6)
        box.append(colour_chip(name))
        title = Gtk.Label(label=printable(name, 64), xalign=0.0, hexpand=True)
        box.append(title)
        self.state = Gtk.Label(label="", xalign=1.0)
        self.state.add_css_class("dim-label")
        box.append(self.state)
        self.set_child(box)

    def update(self, state: str) -> None:
        self.state.set_label(printable(state, 20))


def _by_name(a: InstanceRow, b: InstanceRow) -> int:
    return (a.instance_name > b.instance_name) - (a.instance_name < b.instance_name)


class ManagerWindow(Gtk.ApplicationWindow):
    def __init__(self, app: Gtk.Application) -> None:
        super().__init__(application=app, title="Spectrum instances")
        self.set_default_size(920, 600)
        self.conn: Gio.DBusConnection | None = None
        self.om: Gio.DBusObjectManagerClient | None = None
        self.rows: dict[str, InstanceRow] = {}
        self.selected: str | None = None
        self.resources: dict[str, tuple[str, str]] = {}
        self.usb: list[Any] | None = None
        self.usb_error = ""
        self._subscriptions: list[int] = []
        self._shown_key = ""

        outer = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        self.set_child(outer)
        self.message_bar = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8)
        for side in ("top", "bottom", "start", "end"):
            getattr(self.message_bar, f"set_margin_{side}")(6)
        self.message = Gtk.Label(label="", xalign=0.0, hexpand=True, wrap=True)
        self.message.add_css_class("error")
        dismiss = Gtk.Button(label="Dismiss")
        dismiss.connect("clicked", lambda _b: self.show_message(None))
        self.message_bar.append(self.message)
        self.message_bar.append(dismiss)
        self.message_bar.set_visible(False)
        outer.append(self.message_bar)

        paned = Gtk.Paned(orientation=Gtk.Orientation.HORIZONTAL, vexpand=True)
        paned.set_position(280)
        outer.append(paned)
        self.list = Gtk.ListBox()
        self.list.set_sort_func(_by_name)
        self.list.connect("row-selected", self._row_selected)
        left = Gtk.ScrolledWindow()
        left.set_child(self.list)
        paned.set_start_child(left)
        self.details = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=6)
        for side in ("top", "bottom", "start", "end"):
            getattr(self.details, f"set_margin_{side}")(16)
        right = Gtk.ScrolledWindow(hexpand=True)
        right.set_child(self.details)
        paned.set_end_child(right)
        self._render_details()

    # -- connection ----------------------------------------------------------------

    def use_connection(self, conn: Gio.DBusConnection) -> None:
        self.conn = conn
        try:
            self.om = client.object_manager(conn)
        except GLib.Error as e:
            self.show_message(client.message_of("Watch spectrumd", e))
            return
        self.om.connect("object-added", lambda _m, _o: self._objects_changed())
        self.om.connect("object-removed", self._object_removed)
        self.om.connect("interface-proxy-properties-changed", self._properties_changed)
        self.om.connect("notify::name-owner", lambda *_a: self._owner_changed())
        for member in USB_SIGNALS:
            self._subscriptions.append(
                conn.signal_subscribe(
                    None,
                    MANAGER_IFACE,
                    member,
                    MANAGER_PATH,
                    None,
                    Gio.DBusSignalFlags.NONE,
                    lambda *_a: self._fetch_usb(),
                )
            )
        self._owner_changed()

    def connection_lost(self, text: str | None) -> None:
        if text is None:
            return
        self.conn = None
        self.om = None
        self._subscriptions.clear()
        self._clear_rows()
        self.show_message(text)

    def _owner_changed(self) -> None:
        if self.om is None:
            return
        if self.om.get_name_owner() is None:
            self.show_message("spectrumd is not running; waiting for it")
            self._clear_rows()
            return
        self.show_message(None)
        self._fetch_resources()
        self._fetch_usb()
        self._objects_changed()

    def _fetch_resources(self) -> None:
        if self.conn is None:
            return

        def done(reply: Any, error: str | None) -> None:
            if error is not None:
                self.show_message(error)
                return
            self.resources = parse_resource_list(reply[0])
            self._render_details()

        client.manager_call(self.conn, "ListResources", None, done, "List resources")

    def _fetch_usb(self) -> None:
        if self.conn is None:
            return

        def done(reply: Any, error: str | None) -> None:
            # Readers outside root and "spectrum" may not list devices: say so in place.
            self.usb, self.usb_error = (reply[0], "") if error is None else (None, error)
            self._render_details()

        client.manager_call(self.conn, "ListUsbDevices", None, done, "List USB devices")

    # -- objects ---------------------------------------------------------------------

    def _instances(self) -> dict[str, Gio.DBusProxy]:
        if self.om is None:
            return {}
        out = {}
        for obj in self.om.get_objects():
            proxy = obj.get_interface(INSTANCE_IFACE)
            if isinstance(proxy, Gio.DBusProxy):
                out[obj.get_object_path()] = proxy
        return out

    def _grants(self, instance_path: str) -> list[Gio.DBusProxy]:
        if self.om is None:
            return []
        found = []
        for obj in self.om.get_objects():
            proxy = obj.get_interface(client.GRANT_IFACE)
            if (
                isinstance(proxy, Gio.DBusProxy)
                and client.cached(proxy, "Instance") == instance_path
            ):
                found.append(proxy)
        return sorted(found, key=lambda p: p.get_object_path())

    def _objects_changed(self) -> None:
        instances = self._instances()
        for path in [p for p in self.rows if p not in instances]:
            self.list.remove(self.rows.pop(path))
        for path, proxy in instances.items():
            row = self.rows.get(path)
            if row is None:
                row = InstanceRow(path, client.cached(proxy, "Name", path))
                self.rows[path] = row
                self.list.append(row)
            row.update(client.cached(proxy, "State", "unknown"))
        if self.selected is None and self.rows:
            first = self.list.get_row_at_index(0)
            if first is not None:
                self.list.select_row(first)
        self._render_details()

    def _object_removed(self, _m: Gio.DBusObjectManager, obj: Gio.DBusObject) -> None:
        if obj.get_object_path() == self.selected:
            self.selected = None
        self._objects_changed()

    def _properties_changed(self, _m: Any, _obj: Any, proxy: Gio.DBusProxy, *_rest: Any) -> None:
        path = proxy.get_object_path()
        row = self.rows.get(path)
        if row is not None:
            row.update(client.cached(proxy, "State", "unknown"))
        self._render_details()

    def _clear_rows(self) -> None:
        for row in self.rows.values():
            self.list.remove(row)
        self.rows.clear()
        self.selected = None
        self._render_details()

    def _row_selected(self, _list: Gtk.ListBox, row: InstanceRow | None) -> None:
        self.selected = row.path if row is not None else None
        self._render_details()

    # -- details ---------------------------------------------------------------------

    def _details_key(self) -> str:
        """All the pane shows; it is rebuilt only when this changes (rebuilding on
        every signal would churn widgets, and their accessibility objects, for nothing)."""
        proxy = self._instances().get(self.selected or "")
        if proxy is None:
            return ""
        parts: list[Any] = [proxy.get_object_path()]
        for p in (proxy, *self._grants(proxy.get_object_path())):
            parts.append(p.get_object_path())
            parts.extend((n, client.cached(p, n)) for n in sorted(p.get_cached_property_names()))
        parts += [self.usb, self.usb_error, sorted(self.resources.items())]
        return repr(parts)

    def _render_details(self) -> None:
        key = self._details_key()
        if key == self._shown_key and self.details.get_first_child() is not None:
            return
        self._shown_key = key
        while (child := self.details.get_first_child()) is not None:
            self.details.remove(child)
        proxy = self._instances().get(self.selected or "")
        if proxy is None:
            self.details.append(_text("No instance selected.", dim=True))
            return
        path = proxy.get_object_path()
        name = client.cached(proxy, "Name", "")
        state = client.cached(proxy, "State", "unknown")
        self.details.append(instance_badge(name, big=True))
        reason = client.cached(proxy, "StateReason", "")
        self.details.append(
            _text(f"State: {printable(state, 20)}" + (f" ({printable(reason)})" if reason else ""))
        )
        buttons = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        for method, allowed in (("Start", CAN_START), ("Stop", CAN_STOP), ("Kill", CAN_KILL)):
            b = Gtk.Button(label=method)
            b.set_sensitive(state in allowed or state not in CAN_KILL + CAN_START)
            b.connect("clicked", self._instance_action, path, method, name)
            buttons.append(b)
        self.details.append(buttons)

        started = client.cached(proxy, "StartedAt", 0)
        facts = [
            ("Application", client.cached(proxy, "Application", "")),
            ("VMM", client.cached(proxy, "Vmm", "")),
            ("VMM pid", str(client.cached(proxy, "MainPID", 0) or "—")),
            (
                "Started",
                time.strftime("%H:%M:%S", time.localtime(started / 1e6)) if started else "—",
            ),
            ("Guest ready", "yes" if client.cached(proxy, "GuestReady", False) else "no"),
        ]
        for key, value in facts:
            self.details.append(_text(f"{key}: {printable(str(value), 80)}"))

        self.details.append(_section("Resources"))
        resources = client.cached(proxy, "Resources", [])
        if not resources:
            self.details.append(_text("none configured", dim=True))
        for res in resources:
            kind, summary = self.resources.get(res, ("", ""))
            extra = f" — {printable(summary)}" if summary else ""
            self.details.append(_text(f"{printable(res, 64)} ({kind or '?'}){extra}"))

        self.details.append(_section("Grants"))
        grants = self._grants(path)
        if not grants:
            self.details.append(_text("none", dim=True))
        now_us = time.time_ns() // 1000
        for g in grants:
            self.details.append(self._grant_row(g, now_us))

        self.details.append(_section("USB devices"))
        if self.usb is None:
            self.details.append(_text(self.usb_error or "not known yet", dim=True))
        else:
            held = [d for d in self.usb if d[5] == name]
            if not held:
                self.details.append(_text("none", dim=True))
            for dev_id, _v, _p, _s, description, _holder in held:
                self.details.append(_text(f"{printable(description or '?')} ({printable(dev_id)})"))

        self.details.append(_section("Networks"))
        nets = client.cached(proxy, "NetworkInterfaces", [])
        if not nets:
            self.details.append(_text("none", dim=True))
        for network, tap, mac in nets:
            self.details.append(
                _text(
                    f"{printable(network, 64)}: tap {printable(tap, 20)}, MAC {printable(mac, 20)}"
                )
            )

    def _grant_row(self, g: Gio.DBusProxy, now_us: int) -> Gtk.Widget:
        resource = client.cached(g, "Resource", "")
        view = describe_resource(resource, self.resources, self.usb or [])
        lifetime = client.cached(g, "Lifetime", "")
        expires = client.cached(g, "ExpiresAt", 0)
        when = lifetime_text(lifetime, expires, now_us)
        if lifetime == "until" and expires:
            when = "until " + time.strftime("%H:%M:%S", time.localtime(expires / 1e6))
        line = (
            f"{view.title} — {access_text(client.cached(g, 'Access', ''), view.kind)}, {when}, "
            f"{printable(client.cached(g, 'State', ''), 16)}"
            f" (by {printable(client.cached(g, 'Origin', ''), 16)})"
        )
        row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8)
        label = _text(line)
        label.set_hexpand(True)
        row.append(label)
        revoke = Gtk.Button(label="Revoke")
        gpath = g.get_object_path()
        revoke.connect("clicked", self._revoke, gpath, view.title)
        row.append(revoke)
        return row

    # -- actions ---------------------------------------------------------------------

    def _instance_action(self, _b: Gtk.Button, path: str, method: str, name: str) -> None:
        if self.conn is None:
            return

        def done(_reply: Any, error: str | None) -> None:
            if error is not None:
                self.show_message(error)

        client.instance_call(self.conn, path, method, done, f"{method} {printable(name, 64)}")

    def _revoke(self, _b: Gtk.Button, path: str, what: str) -> None:
        if self.conn is None:
            return

        def done(_reply: Any, error: str | None) -> None:
            if error is not None:
                self.show_message(error)

        client.revoke_grant(self.conn, path, done, f"Revoke {what}")

    def show_message(self, text: str | None) -> None:
        self.message.set_label(text or "")
        self.message_bar.set_visible(text is not None)
