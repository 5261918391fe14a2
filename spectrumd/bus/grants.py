"""Grant and Request objects, and the trusted agent, on D-Bus.

- ``/org/spectrum_os/Spectrum1/grant/ID``, interface ``…Grant``
- ``/org/spectrum_os/Spectrum1/request/ID``, interface ``…Request``: emits
  ``Response(u code, a{sv} results)`` once and stays readable for a minute
  (``Code`` is -1 while pending). Subscribe to ``Response`` before calling
  ``RequestGrant``: an answer can come before the call's reply.
- The agent is a client object implementing ``…Agent``; spectrumd calls its
  ``Confirm`` and ``Cancel`` and accepts answers only from the unique name
  that registered it.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast import Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusInt32, DBusObjectPath, DBusSignature, DBusStr, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from spectrumd.bus.auth import CallerCheck
from spectrumd.bus.connection import call_bus_daemon
from spectrumd.bus.errors import wire_errors
from spectrumd.bus.names import MANAGER_PATH, instance_path
from spectrumd.errors import AccessDenied, Busy, Failed
from spectrumd.supervisor.grants import Grant, GrantService, audit_line
from spectrumd.supervisor.requests import AgentGone, Decision, Request, RequestBroker

log = logging.getLogger(__name__)

GRANT_IFACE = "org.spectrum_os.Spectrum1.Grant"
REQUEST_IFACE = "org.spectrum_os.Spectrum1.Request"
AGENT_IFACE = "org.spectrum_os.Spectrum1.Agent"
GRANT_PREFIX = MANAGER_PATH + "/grant/"
REQUEST_PREFIX = MANAGER_PATH + "/request/"
REQUEST_LINGER = 60.0

ResponseResults = Annotated[dict[str, Variant], DBusSignature("a{sv}")]


def grant_path(grant_id: str) -> str:
    return GRANT_PREFIX + grant_id


def request_path(request_id: str) -> str:
    return REQUEST_PREFIX + request_id


class GrantInterface(ServiceInterface):
    def __init__(self, grant: Grant, grants: GrantService, auth: CallerCheck) -> None:
        super().__init__(GRANT_IFACE)
        self.grant = grant
        self._grants = grants
        self._auth = auth
        self._last_state = grant.state

    def refresh(self) -> None:
        if self.grant.state != self._last_state:
            self._last_state = self.grant.state
            self.emit_properties_changed({"State": self.grant.state})

    @dbus_property(access=PropertyAccess.READ)
    def Instance(self) -> DBusObjectPath:
        return instance_path(self.grant.instance)

    @dbus_property(access=PropertyAccess.READ)
    def Resource(self) -> DBusStr:
        return self.grant.resource

    @dbus_property(access=PropertyAccess.READ)
    def Access(self) -> DBusStr:
        return self.grant.access

    @dbus_property(access=PropertyAccess.READ)
    def Lifetime(self) -> DBusStr:
        return self.grant.lifetime

    @dbus_property(access=PropertyAccess.READ)
    def ExpiresAt(self) -> DBusUInt64:
        return self.grant.expires_at_us

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.grant.state

    @dbus_property(access=PropertyAccess.READ)
    def Origin(self) -> DBusStr:
        return self.grant.origin

    @dbus_property(access=PropertyAccess.READ)
    def Entry(self) -> DBusStr:
        return self.grant.entry

    @dbus_method()
    @wire_errors
    async def Revoke(self) -> None:
        await self._auth.require_admin(f"revoke grant {self.grant.id}")
        await self._grants.end(self.grant.id, "revoked")


class RequestInterface(ServiceInterface):
    def __init__(self, req: Request, cancel: Any, auth: CallerCheck) -> None:
        super().__init__(REQUEST_IFACE)
        self.req = req
        self._cancel = cancel
        self._auth = auth

    @dbus_property(access=PropertyAccess.READ)
    def Instance(self) -> DBusObjectPath:
        return instance_path(self.req.instance)

    @dbus_property(access=PropertyAccess.READ)
    def Resource(self) -> DBusStr:
        return self.req.resource

    @dbus_property(access=PropertyAccess.READ)
    def Code(self) -> DBusInt32:
        return -1 if self.req.code is None else self.req.code

    @dbus_property(access=PropertyAccess.READ)
    def Reason(self) -> DBusStr:
        return self.req.reason

    @dbus_signal()
    def Response(self) -> Annotated[list[Any], DBusSignature("ua{sv}")]:
        results: dict[str, Variant] = {"reason": Variant("s", self.req.reason)}
        if self.req.grant is not None:
            results["grant"] = Variant("o", grant_path(self.req.grant.id))
        return [self.req.code, results]

    @dbus_method()
    @wire_errors
    async def Cancel(self) -> None:
        await self._auth.require_admin(f"cancel request {self.req.id}")
        self._cancel(self.req, "cancelled by a caller")


class DBusAgent:
    """The registered agent, reached over the bus (implements requests.Agent)."""

    def __init__(self, bus: MessageBus, owner: str, path: str) -> None:
        self.bus = bus
        self.owner = owner
        self.path = path
        self.gone = False

    async def _call(self, member: str, signature: str, body: list[Any]) -> Message:
        reply = await self.bus.call(
            Message(
                destination=self.owner,
                path=self.path,
                interface=AGENT_IFACE,
                member=member,
                signature=signature,
                body=body,
            )
        )
        assert reply is not None
        if reply.sender != self.owner:
            raise Failed(f"an answer came from {reply.sender}, not the agent")
        if reply.message_type == MessageType.ERROR:
            if self.gone or reply.error_name in (
                "org.freedesktop.DBus.Error.NoReply",
                "org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner",
            ):
                raise AgentGone()
            raise Failed(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return reply

    async def confirm(self, req: Request) -> Decision:
        details = {"origin": Variant("s", req.origin)}
        if req.expires_at_us:
            details["expires_at"] = Variant("t", req.expires_at_us)
        reply = await self._call(
            "Confirm",
            "ssssssa{sv}",
            [
                req.id,
                req.instance,
                req.application,
                req.resource,
                req.access,
                req.lifetime,
                details,
            ],
        )
        # (b allow, s lifetime, t expires_at); an agent may leave out the expiry.
        if reply.signature == "bst":
            allow, lifetime, expires_at = reply.body
            return Decision(bool(allow), str(lifetime), int(expires_at))
        if reply.signature == "bs":
            allow, lifetime = reply.body
            return Decision(bool(allow), str(lifetime))
        raise Failed(f"the agent answered with signature {reply.signature!r}, not 'bst'")

    async def cancel(self, req: Request) -> None:
        if not self.gone:
            await self._call("Cancel", "s", [req.id])


async def watch_name(bus: MessageBus, name: str, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` once the unique ``name`` has left the bus (also if it already has)."""

    def handler(msg: Message) -> bool:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == "org.freedesktop.DBus"
            and msg.body
            and msg.body[0] == name
            and msg.body[2] == ""
        ):
            bus.remove_message_handler(handler)
            on_gone()
        return False

    bus.add_message_handler(handler)
    rule = f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{name}'"
    await call_bus_daemon(bus, "AddMatch", "s", rule)
    # It may have gone before the match existed.
    reply = await call_bus_daemon(bus, "NameHasOwner", "s", name)
    if reply.body and reply.body[0] is False:
        bus.remove_message_handler(handler)
        on_gone()


class GrantsBus:
    """Exports grants and requests as they come and go; keeps the agent registration."""

    def __init__(
        self, bus: MessageBus, grants: GrantService, broker: RequestBroker, auth: CallerCheck
    ) -> None:
        self.bus = bus
        self.grants = grants
        self.broker = broker
        self.auth = auth
        self.grant_objects: dict[str, GrantInterface] = {}
        self.request_objects: dict[str, RequestInterface] = {}
        self.agent: DBusAgent | None = None
        grants.on_added.append(self._export_grant)
        grants.on_removed.append(self._unexport_grant)
        grants.on_changed.append(self._grant_changed)
        broker.on_new.append(self._export_request)
        broker.on_done.append(self._request_done)

    def export_all(self) -> None:
        for g in self.grants.grants.values():
            self._export_grant(g)

    def _export_grant(self, g: Grant) -> None:
        iface = GrantInterface(g, self.grants, self.auth)
        self.grant_objects[g.id] = iface
        self.bus.export(grant_path(g.id), iface)

    def _unexport_grant(self, g: Grant) -> None:
        iface = self.grant_objects.pop(g.id, None)
        if iface is not None:
            self.bus.unexport(grant_path(g.id), iface)

    def _grant_changed(self, g: Grant) -> None:
        iface = self.grant_objects.get(g.id)
        if iface is not None:
            iface.refresh()

    def _export_request(self, req: Request) -> None:
        iface = RequestInterface(req, self.broker.cancel, self.auth)
        self.request_objects[req.id] = iface
        self.bus.export(request_path(req.id), iface)

    def _request_done(self, req: Request) -> None:
        iface = self.request_objects.get(req.id)
        if iface is None:
            return
        iface.emit_properties_changed({"Code": req.code, "Reason": req.reason})
        iface.Response()
        asyncio.get_running_loop().call_later(REQUEST_LINGER, self._unexport_request, req.id)

    def _unexport_request(self, request_id: str) -> None:
        iface = self.request_objects.pop(request_id, None)
        if iface is not None:
            self.bus.unexport(request_path(request_id), iface)

    async def register_agent(self, sender: str, path: str) -> None:
        """Raises Busy if another agent is registered."""
        if self.agent is not None and not self.agent.gone:
            raise Busy(f"an agent is already registered (by {self.agent.owner})")
        agent = DBusAgent(self.bus, sender, path)
        self.agent = agent
        self.broker.agent = agent
        audit_line("agent-registered", owner=sender, path=path)
        await watch_name(self.bus, sender, lambda: self._agent_gone(agent))

    def unregister_agent(self, sender: str) -> None:
        """Raises AccessDenied unless ``sender`` registered the current agent."""
        if self.agent is None or self.agent.owner != sender:
            raise AccessDenied("only the connection that registered the agent may unregister it")
        self._agent_gone(self.agent)

    def _agent_gone(self, agent: DBusAgent) -> None:
        agent.gone = True
        if self.agent is agent:
            self.agent = None
            audit_line("agent-gone", owner=agent.owner)
            self.broker.agent_gone()
