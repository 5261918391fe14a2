"""Runtime grants: resources given to an instance for a while, and taken back.

A grant names an instance, a resource (a configured one, an ad-hoc host
directory such as a file chooser returns, or USB devices written
``usb:VID:PID[:SERIAL]``), an access (``ro``/``rw`` for directories; USB
ignores it) and a lifetime:

- ``running``: until the instance stops;
- ``until``: until ``expires_at_us`` (µs since the epoch);
- ``permanent``: until revoked; kept in ``STATE_DIR/grants.json`` and applied
  again whenever the instance starts.

A grant is ``active`` while its effect is applied (the instance runs) and
``waiting`` while the instance is not running (only permanent grants wait).
Ending a grant (revoke, expiry, instance stop) undoes its effect at once.
Every change is one ``audit`` log line.

An ad-hoc host directory is resolved once, when it is asked for, with no
symlink in any component (:mod:`spectrumd.host.paths`); the grant holds the
directory open while it is active, and the path is handed to the file server
only while it still resolves, symlink-free, to that same inode. A permanent
grant is resolved again at every start of its instance: if its path has become
a symlink, vanished or names another directory, it is not applied and stays
``waiting`` (one WARNING and an ``audit`` ``not-applied`` line give the
reason; the next start tries again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs

from spectrumd.errors import (
    Failed,
    InvalidArgument,
    InvalidState,
    NoSuchInstance,
    NoSuchResource,
    SpectrumError,
)
from spectrumd.host.paths import HeldDirectory, open_directory
from spectrumd.host.usb_ids import USB_GRANT_PREFIX, UsbMatch, parse_match
from spectrumd.lifecycle import is_up
from spectrumd.model.types import DirectoryResource, Resource
from spectrumd.supervisor.files import Export, Exports, exports_of
from spectrumd.supervisor.instance import Instance
from spectrumd.supervisor.statefile import write_atomically
from spectrumd.supervisor.usb import UsbService

log = logging.getLogger(__name__)
audit = logging.getLogger("spectrumd.audit")

LIFETIMES = ("running", "until", "permanent")
ACCESSES = ("ro", "rw")
GRANTS_FILE = "grants.json"
MAX_GRANTS = 1024


@attrs.define(eq=False)
class Grant:
    id: str
    instance: str
    resource: str  # a configured resource's name, or an absolute host path
    access: str  # "ro" | "rw"
    lifetime: str  # "running" | "until" | "permanent"
    expires_at_us: int = 0
    origin: str = "user"  # "user" | "request"
    state: str = "waiting"  # "active" | "waiting" | "ended"
    # For ad-hoc paths: the entry name under the guest's file mount.
    entry: str = ""
    # For ad-hoc paths, while active: the directory as resolved (no symlink in any
    # component), held open; None while waiting. Not persisted: resolved anew.
    held: HeldDirectory | None = attrs.field(default=None, repr=False)
    # Why a waiting grant was not applied at the last start ("" if it was).
    reason: str = ""

    def release(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None

    def to_json(self) -> dict[str, object]:
        return {
            k: getattr(self, k)
            for k in ("id", "instance", "resource", "access", "lifetime", "expires_at_us", "origin")
        }


def audit_line(event: str, **fields: object) -> None:
    """One structured line per security-relevant event: key=value, values JSON-quoted."""
    audit.info("%s %s", event, " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items()))


def check_lifetime(lifetime: str, expires_at_us: int, now_us: int) -> None:
    if lifetime not in LIFETIMES:
        raise InvalidArgument(f'lifetime "{lifetime[:32]}" is not one of {", ".join(LIFETIMES)}')
    if lifetime == "until":
        if expires_at_us <= now_us:
            raise InvalidArgument("expires_at is in the past")
    elif expires_at_us:
        raise InvalidArgument(f'expires_at only goes with lifetime "until", not "{lifetime}"')


def check_host_directory(untrusted_path: str) -> HeldDirectory:
    """An ad-hoc path: absolute, canonical, an existing directory with no symlink in
    any component, resolved once and held open (the caller closes it).

    Raises InvalidArgument naming the rule or the component that broke it."""
    return open_directory(untrusted_path)


ExportSetter = Callable[[str, Exports], Awaitable[None]]


class GrantService:
    """Keeps the grants, applies and undoes their effects, persists permanent ones."""

    def __init__(
        self,
        state_dir: Path,
        instances: Mapping[str, Instance],
        resources: Callable[[], Mapping[str, Resource]],
        set_exports: ExportSetter,
        usb: UsbService | None = None,
    ) -> None:
        self.path = state_dir / GRANTS_FILE
        self._usb = usb
        self._instances = instances
        self._resources = resources
        self._set_exports = set_exports
        self.grants: dict[str, Grant] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.on_added: list[Callable[[Grant], None]] = []
        self.on_removed: list[Callable[[Grant], None]] = []
        self.on_changed: list[Callable[[Grant], None]] = []

    # -- persistence ---------------------------------------------------------

    def load(self) -> None:
        """Read the grants an earlier daemon left; an unreadable file is logged and renamed
        aside, not fatal. They all wait for their instance: a ``running`` or ``until``
        grant whose instance is not re-adopted is dropped by :meth:`drop_orphans`."""
        try:
            raw = json.loads(self.path.read_text())
            entries = raw["grants"]
            assert isinstance(entries, list)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            aside = self.path.with_name(f"{GRANTS_FILE}.bad-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error(
                "cannot read %s (%s); permanent grants start empty, the file is kept as %s",
                self.path,
                e,
                aside,
            )
            return
        for entry in entries:
            try:
                g = Grant(
                    id=str(entry["id"]),
                    instance=str(entry["instance"]),
                    resource=str(entry["resource"]),
                    access=str(entry["access"]),
                    lifetime=str(entry.get("lifetime", "permanent")),
                    expires_at_us=int(entry.get("expires_at_us", 0)),
                    origin=str(entry.get("origin", "user")),
                )
                if g.lifetime not in LIFETIMES:
                    raise ValueError(f"lifetime {g.lifetime!r}")
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                log.error("skipping a bad entry in %s: %s", self.path, err)
                continue
            if g.instance in self._instances:
                g.entry = self._entry_name(g)
                self.grants[g.id] = g
                if g.lifetime == "until":
                    self._arm(g)

    def drop_orphans(self) -> None:
        """After re-adoption: forget ``running``/``until`` grants whose instance is not running."""
        dropped = False
        for g in list(self.grants.values()):
            inst = self._instances.get(g.instance)
            if g.lifetime != "permanent" and (inst is None or not inst.active):
                del self.grants[g.id]
                timer = self._timers.pop(g.id, None)
                if timer is not None:
                    timer.cancel()
                audit_line("ended-with-instance", id=g.id, instance=g.instance, resource=g.resource)
                dropped = True
        if dropped:
            self._save_quietly()

    def _arm(self, g: Grant) -> None:
        delay = max(0.0, g.expires_at_us / 1e6 - time.time())
        self._timers[g.id] = asyncio.get_running_loop().call_later(
            delay, lambda: asyncio.ensure_future(self.end(g.id, "expired"))
        )

    def _save_quietly(self) -> None:
        """Save for a grant whose loss on disk only matters across a daemon restart."""
        try:
            self._save()
        except Failed as e:
            log.error("%s", e)

    def _save(self, without: str | None = None) -> None:
        """Write the grants (but ``without``). Raises Failed; the file stays as it was."""
        body = {
            "version": 1,
            "grants": [g.to_json() for g in self.grants.values() if g.id != without],
        }
        try:
            write_atomically(self.path, json.dumps(body, indent=2) + "\n")
        except OSError as e:
            raise Failed(f"cannot write {self.path}: {e.strerror or e}") from None

    # -- creation -------------------------------------------------------------

    def _entry_name(self, g: Grant) -> str:
        if g.resource.startswith(USB_GRANT_PREFIX):
            return ""
        if not g.resource.startswith("/"):
            return g.resource
        base = os.path.basename(g.resource) or "root"
        taken = set(exports_of(self._instances[g.instance].resources))
        taken |= {o.entry for o in self.grants.values() if o.instance == g.instance and o is not g}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        return name

    def validate(
        self,
        instance: str,
        untrusted_resource: str,
        access: str,
        lifetime: str,
        expires_at_us: int,
        held: HeldDirectory | None = None,
    ) -> Resource | HeldDirectory | UsbMatch:
        """Check a grant before anyone is asked. Raises a named SpectrumError.

        An ad-hoc path is resolved here and returned open: the caller owns it
        (``held``, resolved earlier for the same path, is returned instead)."""
        if instance not in self._instances:
            raise NoSuchInstance(f'no instance "{instance}"')
        if access not in ACCESSES:
            raise InvalidArgument(f'access "{access[:16]}" is not ro or rw')
        check_lifetime(lifetime, expires_at_us, time.time_ns() // 1000)
        if untrusted_resource.startswith(USB_GRANT_PREFIX):
            match = parse_match(untrusted_resource)
            if self._usb is None:
                raise Failed("USB passthrough is not available in this daemon")
            inst = self._instances[instance]
            self._usb.check_grantable(instance, inst.definition.vmm, inst.resources)
            return match
        if untrusted_resource.startswith("/"):
            if held is not None and not held.closed and held.path == untrusted_resource:
                # Granted as asked: the very directory, if the path still names it.
                if not held.still_named():
                    raise Failed(
                        f'"{held.path}" was removed or replaced since it was asked for; '
                        "nothing was granted"
                    )
                return held
            return check_host_directory(untrusted_resource)
        res = self._resources().get(untrusted_resource)
        if res is None:
            raise NoSuchResource(f'no resource "{untrusted_resource[:64]}"')
        if not isinstance(res, DirectoryResource):
            raise InvalidArgument(
                f'resource "{res.name}" is a {res.type}; only directories can be granted so far'
            )
        if access == "rw" and not res.writable:
            raise InvalidArgument(f'resource "{res.name}" is read-only; it cannot be granted rw')
        return res

    async def create(
        self,
        instance: str,
        untrusted_resource: str,
        access: str = "ro",
        lifetime: str = "running",
        expires_at_us: int = 0,
        origin: str = "user",
        held: HeldDirectory | None = None,
    ) -> Grant:
        """Make a grant and apply it now if the instance runs. Raises a named SpectrumError.

        ``held``: the directory a request resolved when it was asked for; the
        grant takes it over (it is closed here if the grant is not made)."""
        checked = None
        try:
            checked = self.validate(
                instance, untrusted_resource, access, lifetime, expires_at_us, held
            )
            inst = self._instances[instance]
            if lifetime != "permanent" and not is_up(inst.state):
                raise InvalidState(
                    f"{instance} is {inst.state.value}: only a permanent grant can wait for a start"
                )
            if len(self.grants) >= MAX_GRANTS:
                raise Failed(f"too many grants (at most {MAX_GRANTS})")
        except BaseException:
            for d in (held, checked):
                if isinstance(d, HeldDirectory):
                    d.close()
            raise
        directory = checked if isinstance(checked, HeldDirectory) else None
        if held is not None and held is not directory:
            held.close()
        if directory is not None:
            untrusted_resource = directory.path  # what was resolved, shown to everyone
        if untrusted_resource.startswith(USB_GRANT_PREFIX):
            # One spelling per grant: lower-case ids, canonical serial.
            untrusted_resource = str(parse_match(untrusted_resource))
        g = Grant(
            id=secrets.token_hex(4),
            instance=instance,
            resource=untrusted_resource,
            access=access,
            lifetime=lifetime,
            expires_at_us=expires_at_us,
            origin=origin,
        )
        g.entry = self._entry_name(g)
        if is_up(inst.state):
            g.held = directory
        elif directory is not None:
            directory.close()  # a waiting grant is resolved anew at the start
        self.grants[g.id] = g
        try:
            # A permanent grant that cannot be kept on disk is refused; the others
            # only need the file if the daemon restarts while they last.
            if lifetime == "permanent":
                self._save()
            if is_up(inst.state):
                await self._apply_one(inst, g)
                if g.resource.startswith("/") and g.held is None:
                    raise InvalidArgument(g.reason)  # swapped since it was resolved
                g.state = "active"
        except BaseException:
            g.release()
            del self.grants[g.id]
            if lifetime == "permanent":
                self._save()
            raise
        if lifetime != "permanent":
            self._save_quietly()
        if lifetime == "until":
            self._arm(g)
        audit_line(
            "grant",
            id=g.id,
            instance=instance,
            resource=g.resource,
            access=access,
            lifetime=lifetime,
            expires_at_us=expires_at_us,
            origin=origin,
        )
        for cb in self.on_added:
            cb(g)
        return g

    # -- effects ----------------------------------------------------------------

    def _recheck_paths(self, inst: Instance) -> None:
        """Resolve the instance's path grants that hold nothing (a start), and check
        that those that hold a directory still name it. One that fails holds nothing
        and is left out of the exports: it is (or goes back to) ``waiting``, with its
        reason logged once."""
        for g in self.grants.values():
            if g.instance != inst.name or not g.resource.startswith("/"):
                continue
            before = g.reason
            if g.held is not None:
                if g.held.still_named():
                    continue
                g.release()
                g.reason = f'"{g.resource}" no longer names the directory that was granted'
            else:
                try:
                    g.held = check_host_directory(g.resource)
                    g.reason = ""
                    continue
                except SpectrumError as e:
                    g.reason = e.message
            if g.state == "active":
                g.state = "waiting"
                for cb in self.on_changed:
                    cb(g)
            if g.reason != before:
                log.warning("%s: grant %s is not applied: %s", inst.name, g.id, g.reason)
                audit_line(
                    "not-applied",
                    id=g.id,
                    instance=g.instance,
                    resource=g.resource,
                    reason=g.reason,
                )

    def exports_for(self, inst: Instance) -> Exports:
        """The exports of a running instance: an ad-hoc path only while it is held."""
        exports = exports_of(inst.resources)
        for g in self.grants.values():
            if g.instance != inst.name:
                continue
            if g.resource.startswith("/"):
                if g.held is not None:
                    exports[g.entry] = Export(g.held.path, g.access == "rw", g.held.fd)
            else:
                res = self._resources().get(g.resource)
                if isinstance(res, DirectoryResource):
                    exports[g.entry] = Export(str(res.path), g.access == "rw" and res.writable)
        return exports

    async def _apply(self, inst: Instance) -> None:
        self._recheck_paths(inst)
        await self._set_exports(inst.name, self.exports_for(inst))

    async def _apply_one(self, inst: Instance, g: Grant, strict: bool = True) -> None:
        """Give the grant's effect now. Raises Busy (``strict``: the matching USB
        devices are all held elsewhere), Failed."""
        if g.resource.startswith(USB_GRANT_PREFIX):
            if self._usb is not None:
                match = parse_match(g.resource)
                await self._usb.grant_added(inst.name, g.id, match, strict=strict)
        else:
            await self._apply(inst)

    async def _undo_one(self, inst: Instance, g: Grant) -> None:
        if g.resource.startswith(USB_GRANT_PREFIX):
            if self._usb is not None:
                await self._usb.grant_removed(inst.name, g.id)
        else:
            await self._apply(inst)

    async def end(self, grant_id: str, why: str) -> None:
        """Revoke or expire a grant: undo its effect, forget it, tell listeners."""
        g = self.grants.get(grant_id)
        if g is None:
            return
        if g.lifetime == "permanent":
            # Persisted first: a grant that cannot be forgotten on disk stays, whole.
            self._save(without=grant_id)
        del self.grants[grant_id]
        if g.lifetime != "permanent":
            self._save_quietly()
        timer = self._timers.pop(grant_id, None)
        if timer is not None:
            timer.cancel()
        g.state = "ended"
        g.release()
        inst = self._instances.get(g.instance)
        if inst is not None and is_up(inst.state):
            try:
                await self._undo_one(inst, g)
            except Failed as e:
                log.error("%s: cannot undo grant %s: %s", g.instance, g.id, e)
        audit_line(why, id=g.id, instance=g.instance, resource=g.resource)
        for cb in self.on_removed:
            cb(g)

    async def instance_changed(self, inst: Instance) -> None:
        """Up (a start, a re-adoption, also of a paused VM): set the exports to what they
        should be and apply permanent grants. Stop: end ``running``/``until`` grants."""
        mine = [g for g in self.grants.values() if g.instance == inst.name]
        if is_up(inst.state):
            try:
                await self._apply(inst)
            except Failed as e:
                log.error("%s: cannot apply grants: %s", inst.name, e)
                return
            for g in mine:
                if g.state != "waiting":
                    continue
                if g.resource.startswith("/") and g.held is None:
                    continue  # not applied (_recheck_paths logged why): it waits
                if g.resource.startswith(USB_GRANT_PREFIX):
                    try:
                        await self._apply_one(inst, g, strict=False)
                    except SpectrumError as e:
                        log.warning("%s: USB grant %s: %s", inst.name, g.id, e)
                g.state = "active"
                audit_line("reapplied", id=g.id, instance=g.instance, resource=g.resource)
                for cb in self.on_changed:
                    cb(g)
        elif not inst.active:
            for g in mine:
                if g.lifetime != "permanent":
                    await self.end(g.id, "ended-with-instance")
                    continue
                g.release()
                g.reason = ""  # a reason not to apply it is found (and logged) per start
                if g.state != "waiting":
                    g.state = "waiting"
                    for cb in self.on_changed:
                        cb(g)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for g in self.grants.values():
            g.release()
