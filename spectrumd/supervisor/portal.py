"""The host side of the guest's portal port (``org.spectrum_os.portal``).

Lines of text, each at most 4096 bytes; the instance is the port's own, never
something the guest says.

guest → host: ``request ID KIND B64 ACCESS LIFETIME [SECONDS]``
  ID: 1-16 characters ``[A-Za-z0-9]``, chosen by the guest to match answers;
  KIND: ``dir`` (B64 is base64 of an absolute host directory) or
  ``resource`` (B64 is base64 of a configured resource's name);
  ACCESS: ``ro`` | ``rw``; LIFETIME: ``running`` | ``until`` | ``permanent``;
  SECONDS: for ``until``, how long from now.
host → guest: ``response ID CODE B64``
  CODE 0: granted, B64 is the path of the new entry in the guest
  (``/mnt/spectrum/NAME``); 1: denied; 2: ended otherwise; B64 is the reason.

A malformed line is dropped and logged; a well-formed request that cannot be
asked (one is pending already, bad path) is answered with code 2 at once.
A line over 4096 bytes is discarded whole (up to its newline); a guest that
leaves over ``MAX_PENDING_WRITE`` bytes of answers unread loses the port.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import Callable

from spectrumd.errors import SpectrumError
from spectrumd.supervisor.lines import MAX_LINE, WriteBound, guest_lines
from spectrumd.supervisor.requests import ENDED, GRANTED, Request, RequestBroker
from spectrumd.supervisor.resources import RunContext
from spectrumd.vmm.base import PORT_PORTAL, VmSpec

log = logging.getLogger(__name__)

MOUNT_ROOT = "/mnt/spectrum"
_ID = re.compile("[A-Za-z0-9]{1,16}")
MAX_SECONDS = 10 * 365 * 24 * 3600


class PortalRequest:
    """A parsed, still untrusted request line."""

    def __init__(self, rid: str, resource: str, access: str, lifetime: str, expires_us: int):
        self.id, self.resource, self.access = rid, resource, access
        self.lifetime, self.expires_at_us = lifetime, expires_us


def parse_request(untrusted_line: bytes, now_us: int) -> PortalRequest | str | None:
    """A request, or an ID to answer with an error, or None (drop: no usable ID)."""
    try:
        words = untrusted_line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        return None
    if len(words) < 2 or words[0] != "request" or not _ID.fullmatch(words[1]):
        return None
    rid = words[1]
    if len(words) not in (6, 7):
        return rid
    _, _, kind, b64, access, lifetime, *rest = words
    try:
        value = base64.b64decode(b64, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return rid
    if kind not in ("dir", "resource") or (kind == "dir") != value.startswith("/"):
        return rid
    expires = 0
    if lifetime == "until":
        if len(rest) != 1 or not rest[0].isdigit() or not 0 < int(rest[0]) <= MAX_SECONDS:
            return rid
        expires = now_us + int(rest[0]) * 1_000_000
    elif rest:
        return rid
    return PortalRequest(rid, value, access, lifetime, expires)


def response_line(rid: str, code: int, text: str) -> bytes:
    return f"response {rid} {code} {base64.b64encode(text.encode()).decode()}\n".encode()


class PortalDriver:
    """Gives every guest a portal port and turns its lines into broker requests."""

    def __init__(self, broker: RequestBroker | None = None) -> None:
        # Set by the daemon once the grants exist (they need the instances).
        self.broker = broker

    async def prepare(self, ctx: RunContext) -> None:
        ctx.ports.append(PORT_PORTAL)

    async def started(self, ctx: RunContext, spec: VmSpec) -> None:
        reader, writer = await asyncio.open_unix_connection(spec.port_socket(PORT_PORTAL))
        channel = PortalChannel(
            ctx.name, ctx.application.name, ctx.log, reader, writer, lambda: self.broker
        )
        task = asyncio.ensure_future(channel.serve())

        async def stop() -> None:
            if self.broker is not None:
                self.broker.cancel_instance(ctx.name, "the instance stopped")
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            writer.close()

        ctx.stack.push_async_callback(stop)

    async def adopt(self, ctx: RunContext, spec: VmSpec) -> None:
        await self.started(ctx, spec)


class PortalChannel:
    """One guest's portal connection: bounded in what it reads and what it queues.

    An over-long line is discarded whole; a guest that leaves more than
    ``MAX_PENDING_WRITE`` bytes of answers unread loses the channel (see
    :mod:`.lines`). Warnings are logged once per channel, then at DEBUG.
    """

    def __init__(
        self,
        instance: str,
        application: str,
        log: logging.Logger,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        broker: Callable[[], RequestBroker | None],
    ) -> None:
        self.instance, self.application = instance, application
        self._log = log
        self._reader = reader
        self._writer = writer
        self._broker = broker
        self.bound = WriteBound(writer, log, "portal")
        self._warned: set[str] = set()

    def _warn_once(self, what: str, *args: object) -> None:
        level = logging.DEBUG if what in self._warned else logging.WARNING
        self._warned.add(what)
        self._log.log(level, "portal: " + what, *args)

    async def serve(self) -> None:
        """Handle the guest's lines until the port closes or a bound is broken."""
        waiting: set[asyncio.Task[None]] = set()

        def discarded(total: int) -> None:
            self._warn_once("discarded an over-long line (over %d bytes)", MAX_LINE)

        try:
            async for untrusted_line in guest_lines(self._reader, self.bound, discarded):
                task = self._handle(untrusted_line)
                if task is not None:
                    waiting.add(task)
                    task.add_done_callback(waiting.discard)
        finally:
            for task in waiting:
                task.cancel()
            broker = self._broker()
            if self.bound.closed_for_overflow and broker is not None:
                # Nobody is left to hear the answer: take the question off the agent.
                req = broker.pending.get(self.instance)
                if req is not None and req.origin == "portal":
                    broker.cancel(req, "the guest lost its portal port")

    def _handle(self, untrusted_line: bytes) -> asyncio.Task[None] | None:
        parsed = parse_request(untrusted_line.rstrip(b"\r"), time.time_ns() // 1000)
        if parsed is None:
            self._warn_once("dropped a malformed line (%d bytes)", len(untrusted_line))
            return None
        if isinstance(parsed, str):
            self.bound.write(response_line(parsed, ENDED, "malformed request"))
            return None
        broker = self._broker()
        if broker is None:
            self.bound.write(response_line(parsed.id, ENDED, "requests are not accepted yet"))
            return None
        try:
            req = broker.submit(
                self.instance,
                self.application,
                parsed.resource,
                parsed.access,
                parsed.lifetime,
                parsed.expires_at_us,
                origin="portal",
            )
        except SpectrumError as e:
            self.bound.write(response_line(parsed.id, ENDED, e.message))
            return None
        return asyncio.ensure_future(self._answer(parsed.id, req))

    async def _answer(self, rid: str, req: Request) -> None:
        await req.done.wait()
        assert req.code is not None
        if req.code == GRANTED and req.grant is not None:
            text = f"{MOUNT_ROOT}/{req.grant.entry}"
        else:
            text = req.reason
        if self.bound.write(response_line(rid, req.code, text)):
            await self.bound.drain()
