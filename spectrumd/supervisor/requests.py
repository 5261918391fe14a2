"""Grant requests, confirmed by the trusted agent.

A request comes from a guest's portal port (its instance is the port's, never
a field of the message) or from an authorized host caller. The broker asks the
one registered agent; the answer becomes a grant (code 0), a denial (1) or an
end without a decision (2: no agent, timeout, agent gone, instance stopped,
cancelled). Only code 1 is a denial; nothing is remembered either way.
One request may be pending per instance: a flood from a guest reaches the
agent one at a time. An ad-hoc path is resolved when the request is made (no
symlink in any component): the agent is shown the resolved path, and the
directory held since then is what the grant gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Protocol

import attrs

from spectrumd.errors import Busy, SpectrumError
from spectrumd.host.paths import HeldDirectory
from spectrumd.supervisor.grants import LIFETIMES, Grant, GrantService, audit_line

log = logging.getLogger(__name__)

GRANTED, DENIED, ENDED = 0, 1, 2
CONFIRM_TIMEOUT = 120.0


@attrs.define(eq=False)
class Request:
    id: str
    instance: str
    application: str
    resource: str
    access: str
    lifetime: str
    expires_at_us: int
    origin: str  # "portal" or "bus"
    code: int | None = None
    grant: Grant | None = None
    reason: str = ""
    done: asyncio.Event = attrs.Factory(asyncio.Event)
    # An ad-hoc path as resolved at submit, until the grant takes it over.
    held: HeldDirectory | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Decision:
    """The agent's answer: the user's choice of lifetime, and for ``until`` the
    expiry (µs since the epoch; 0: the request's own). An empty or unknown
    lifetime keeps the request's."""

    allow: bool
    lifetime: str = ""
    expires_at_us: int = 0


class Agent(Protocol):
    async def confirm(self, req: Request) -> Decision:
        """Ask the user. Raises on dismissal or failure."""

    async def cancel(self, req: Request) -> None: ...


class AgentGone(Exception):
    """The agent disconnected while a question was open."""


class RequestBroker:
    def __init__(self, grants: GrantService, confirm_timeout: float = CONFIRM_TIMEOUT) -> None:
        self.grants = grants
        self.agent: Agent | None = None
        self.confirm_timeout = confirm_timeout
        self.pending: dict[str, Request] = {}  # by instance
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.on_new: list[Callable[[Request], None]] = []
        self.on_done: list[Callable[[Request], None]] = []

    def submit(
        self,
        instance: str,
        application: str,
        untrusted_resource: str,
        access: str,
        lifetime: str,
        expires_at_us: int,
        origin: str,
    ) -> Request:
        """Validate and queue a request; the answer arrives on ``req.done``.

        Raises Busy if the instance already has a pending request, and the
        grant checks' errors for a bad resource, access or lifetime.
        """
        if instance in self.pending:
            raise Busy(f"{instance} already has a pending request")
        checked = self.grants.validate(
            instance, untrusted_resource, access, lifetime, expires_at_us
        )
        held = checked if isinstance(checked, HeldDirectory) else None
        req = Request(
            id=secrets.token_hex(4),
            instance=instance,
            application=application,
            resource=held.path if held is not None else untrusted_resource,
            access=access,
            lifetime=lifetime,
            expires_at_us=expires_at_us,
            origin=origin,
            held=held,
        )
        self.pending[instance] = req
        audit_line(
            "request",
            id=req.id,
            instance=instance,
            resource=req.resource,
            access=access,
            lifetime=lifetime,
            origin=origin,
        )
        for cb in self.on_new:
            cb(req)
        self._tasks[req.id] = asyncio.ensure_future(self._run(req))
        return req

    async def _run(self, req: Request) -> None:
        try:
            agent = self.agent
            if agent is None:
                self._finish(req, ENDED, "no agent is registered to confirm requests")
                return
            try:
                async with asyncio.timeout(self.confirm_timeout):
                    decision = await agent.confirm(req)
            except asyncio.CancelledError:
                # Take the question off the agent's screen, then end the request.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(agent.cancel(req), 5)
                raise
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await agent.cancel(req)
                self._finish(req, ENDED, "the agent did not answer in time")
                return
            except AgentGone:
                self._finish(req, ENDED, "the agent disconnected")
                return
            except SpectrumError as e:
                self._finish(req, ENDED, f"the agent failed: {e}")
                return
            if not decision.allow:
                self._finish(req, DENIED, "denied by the user")
                return
            # The user chooses the lifetime (e.g. "running" where "permanent" was asked)
            # and, for "until", when it ends. The expiry goes only with "until".
            if decision.lifetime in LIFETIMES:
                req.lifetime = decision.lifetime
            if req.lifetime != "until":
                req.expires_at_us = 0
            elif decision.expires_at_us:
                req.expires_at_us = decision.expires_at_us
            held, req.held = req.held, None  # the grant owns it from here, made or not
            try:
                req.grant = await self.grants.create(
                    req.instance,
                    req.resource,
                    req.access,
                    req.lifetime,
                    req.expires_at_us,
                    origin="request",
                    held=held,
                )
            except SpectrumError as e:
                self._finish(req, ENDED, f"confirmed, but the grant failed: {e}")
                return
            self._finish(req, GRANTED, "granted")
        except asyncio.CancelledError:
            self._finish(req, ENDED, req.reason or "cancelled")
        except Exception as e:  # a bug must not leave the request hanging
            log.exception("request %s failed", req.id)
            self._finish(req, ENDED, f"internal error: {type(e).__name__}")

    def _finish(self, req: Request, code: int, reason: str) -> None:
        if req.code is not None:
            return
        if req.held is not None:
            req.held.close()
            req.held = None
        req.code, req.reason = code, reason
        if self.pending.get(req.instance) is req:
            del self.pending[req.instance]
        self._tasks.pop(req.id, None)
        audit_line(
            {GRANTED: "confirmed", DENIED: "denied"}.get(code, "request-ended"),
            id=req.id,
            instance=req.instance,
            resource=req.resource,
            reason=reason,
            grant=req.grant.id if req.grant else "",
        )
        req.done.set()
        for cb in self.on_done:
            cb(req)

    def cancel(self, req: Request, reason: str) -> None:
        """End a pending request without a decision (instance stopped, caller gone)."""
        task = self._tasks.get(req.id)
        if task is not None and req.code is None:
            req.reason = reason
            task.cancel()

    def cancel_instance(self, instance: str, reason: str) -> None:
        req = self.pending.get(instance)
        if req is not None:
            self.cancel(req, reason)

    def agent_gone(self) -> None:
        self.agent = None
        for req in list(self.pending.values()):
            task = self._tasks.get(req.id)
            if task is not None:
                req.reason = "the agent disconnected"
                task.cancel()
