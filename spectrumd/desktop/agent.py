"""The trusted agent on the bus: registers with spectrumd, turns Confirm calls
into dialogs (through a ``Prompter``), replies with the user's answer.

- Only spectrumd (the current owner of its name) may call the agent; anyone
  else gets AccessDenied and no dialog appears.
- When spectrumd's name gets a new owner (a restart), the agent registers
  again. When it goes, every open dialog closes.
- A request ends elsewhere (Cancel, timeout, instance stopped, daemon gone):
  its dialog closes. Its Response signal closes it too, should a Cancel not come.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from gi.repository import Gio, GLib

from spectrumd.bus.names import BUS_NAME
from spectrumd.desktop import client
from spectrumd.desktop.model import (
    Answer,
    PendingRequest,
    RequestQueue,
    ResourceView,
    describe_resource,
    parse_resource_list,
)

log = logging.getLogger(__name__)
RETRY_SECONDS = 3


class Prompter(Protocol):
    def show(self, req: PendingRequest, view: ResourceView) -> None: ...

    def close(self, request_id: str) -> None: ...

    def status(self, text: str | None) -> None:
        """A lasting problem the user must know, e.g. Busy (None: all is well)."""

    def notice(self, text: str) -> None:
        """Something that happened, e.g. an allowed grant that the daemon could not make."""


class Agent:
    def __init__(self, conn: Gio.DBusConnection, prompter: Prompter) -> None:
        self.conn = conn
        self.prompter = prompter
        self.queue = RequestQueue()
        self.daemon: str | None = None  # unique name of spectrumd's current owner
        self.registered = False
        self._invocations: dict[str, Gio.DBusMethodInvocation] = {}
        self._signals: dict[str, int] = {}
        self._allowed: set[str] = set()  # answered yes, Response not yet seen
        self._retry: int = 0
        info = Gio.DBusNodeInfo.new_for_xml(client.AGENT_XML).interfaces[0]
        self._reg_id = conn.register_object(client.AGENT_PATH, info, self._method_call, None, None)
        self._watch = client.watch_daemon(conn, self._appeared, self._vanished)

    # -- registration ------------------------------------------------------------

    def _appeared(self, owner: str) -> None:
        log.info("spectrumd is %s; registering", owner)
        if self.daemon not in (None, owner):
            self._forget_all()
        self.daemon = owner
        self._register()

    def _register(self) -> None:
        self._retry = 0
        owner = self.daemon
        if owner is None:
            return

        def done(_reply: Any, error: str | None) -> None:
            if self.daemon != owner:
                return
            if error is None:
                self.registered = True
                log.info("registered as the agent of %s", owner)
                self.prompter.status(None)
                return
            # Busy (another agent) and AccessDenied are for the user to see; try again
            # later, since the other agent may go and the policy may change.
            log.warning("%s", error)
            self.prompter.status(error)
            self._retry = GLib.timeout_add_seconds(RETRY_SECONDS, self._retry_now)

        client.manager_call(
            self.conn,
            "RegisterAgent",
            GLib.Variant("(o)", (client.AGENT_PATH,)),
            done,
            "Register as the agent",
        )

    def _retry_now(self) -> bool:
        self._retry = 0
        if self.daemon is not None and not self.registered:
            self._register()
        return GLib.SOURCE_REMOVE

    def _vanished(self) -> None:
        if self.daemon is not None:
            log.info("spectrumd left the bus; waiting for it")
        self.daemon = None
        self.registered = False
        if self._retry:
            GLib.source_remove(self._retry)
            self._retry = 0
        self._forget_all()

    def _forget_all(self) -> None:
        for req in self.queue.clear():
            self._drop(req.id)
            self.prompter.close(req.id)

    # -- calls from spectrumd ------------------------------------------------------

    def _method_call(
        self,
        _conn: Gio.DBusConnection,
        sender: str,
        _path: str,
        _iface: str,
        method: str,
        params: GLib.Variant,
        invocation: Gio.DBusMethodInvocation,
    ) -> None:
        if sender != self.daemon:
            log.warning("refused %s from %s, which is not spectrumd", method, sender)
            invocation.return_dbus_error(
                "org.freedesktop.DBus.Error.AccessDenied", f"only {BUS_NAME} may call its agent"
            )
            return
        if method == "Confirm":
            self._confirm(params.unpack(), invocation)
        elif method == "Cancel":
            (request_id,) = params.unpack()
            log.info("request %s was withdrawn", request_id)
            self.end(request_id, None)
            invocation.return_value(None)
        else:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod", method)

    def _confirm(self, args: tuple[Any, ...], invocation: Gio.DBusMethodInvocation) -> None:
        rid, instance, application, resource, access, lifetime, details = args
        expires = details.get("expires_at", 0)
        req = PendingRequest(
            id=rid,
            instance=instance,
            application=application,
            resource=resource,
            access=access,
            lifetime=lifetime,
            expires_at_us=int(expires) if isinstance(expires, int) else 0,
            origin=str(details.get("origin", "")),
        )
        if rid in self.queue:
            invocation.return_dbus_error(
                "org.spectrum_os.Spectrum1.Error.Busy", f"request {rid} is already open"
            )
            return
        self._invocations[rid] = invocation
        self._signals[rid] = self.conn.signal_subscribe(
            self.daemon,
            client.REQUEST_IFACE,
            "Response",
            client.REQUEST_PREFIX + rid,
            None,
            Gio.DBusSignalFlags.NONE,
            self._response,
            rid,
        )
        if self.queue.add(req):
            self._describe_then_show(req)

    def _describe_then_show(self, req: PendingRequest) -> None:
        """Ask spectrumd what the resource is (a configured name → its host
        path; USB ids → the present devices), then show the dialog."""
        views: dict[str, Any] = {}

        def show_when_ready() -> None:
            if "resources" not in views or "usb" not in views:
                return
            if req.id not in self.queue:
                return  # ended while we asked
            view = describe_resource(req.resource, views["resources"], views["usb"])
            self.prompter.show(req, view)

        def got_resources(reply: Any, error: str | None) -> None:
            views["resources"] = parse_resource_list(reply[0]) if error is None else {}
            show_when_ready()

        def got_usb(reply: Any, error: str | None) -> None:
            views["usb"] = reply[0] if error is None else []
            show_when_ready()

        client.manager_call(self.conn, "ListResources", None, got_resources, "List resources")
        if req.resource.startswith("usb:"):
            client.manager_call(self.conn, "ListUsbDevices", None, got_usb, "List USB devices")
        else:
            views["usb"] = []
        show_when_ready()

    def _response(
        self,
        _conn: Gio.DBusConnection,
        _sender: str | None,
        _path: str,
        _iface: str,
        _signal: str,
        params: GLib.Variant,
        rid: Any,
    ) -> None:
        code, results = params.unpack()
        if code == 2 and rid in self._allowed:
            # The user said yes, and the daemon could still not make the grant.
            self.prompter.notice(f"The grant was not made: {results.get('reason', 'unknown')}")
        self._allowed.discard(rid)
        if rid in self.queue:
            log.info("request %s ended elsewhere (code %d)", rid, code)
            self.end(rid, None)
        self._unsubscribe(rid)

    # -- answers ---------------------------------------------------------------

    def end(self, request_id: str, answer: Answer | None) -> None:
        """The user answered (``None``: deny), or the request ended elsewhere."""
        invocation = self._invocations.pop(request_id, None)
        if invocation is not None:
            req = self.queue.get(request_id)
            reply = (False, req.lifetime if req else "", 0)
            if answer is not None and answer.allow:
                reply = (True, answer.lifetime, answer.expires_at_us)
                self._allowed.add(request_id)
            invocation.return_value(GLib.Variant("(bst)", reply))
        self.prompter.close(request_id)
        nxt = self.queue.remove(request_id)
        if nxt is not None:
            self._describe_then_show(nxt)

    def _drop(self, rid: str) -> None:
        self._invocations.pop(rid, None)
        self._allowed.discard(rid)
        self._unsubscribe(rid)

    def _unsubscribe(self, rid: str) -> None:
        sub = self._signals.pop(rid, None)
        if sub is not None:
            self.conn.signal_unsubscribe(sub)
