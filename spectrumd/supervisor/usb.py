"""USB passthrough: which instance gets which host device, and when.

A running instance *wants* a device that matches one of its ``usb``
resources or one of its USB grants (``usb:VID:PID[:SERIAL]``). It gets the
device attached when it starts and whenever the device is plugged in while
it runs, if no other instance holds it (first come, first served: a device
held elsewhere stays there, and is offered again when released). A device
is detached when it is unplugged, when the instance stops, when the grant
that brought it ends, or on ``DetachUsb``; a device detached by ``DetachUsb``
is not attached again to that instance until it is plugged in anew.
``AttachUsb`` attaches any device, wanted or not, to a running instance;
it and ``DetachUsb`` go through the instance (:meth:`UsbService.attach_to`,
:meth:`UsbService.detach_from`): the lifecycle table says whether the VM can
take the call, and the call is serialized with the instance's other calls.

For each attach the daemon opens ``/dev/bus/usb/BBB/DDD`` itself and hands
the VMM a copy of the descriptor (``VmmControl.usb_attach``); it keeps none.
An attach that fails part way leaves the device unclaimed. Stopping does
not talk to the VMM (it has exited): the claims are released, which is all
there is to undo.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from spectrumd.errors import (
    Busy,
    Failed,
    InvalidArgument,
    InvalidState,
    NoSuchResource,
    Timeout,
)
from spectrumd.host.usb import UsbDevice, UsbHost
from spectrumd.host.usb_ids import UsbMatch, check_id
from spectrumd.model.types import Resource, UsbResource, VmmKind
from spectrumd.supervisor.resources import RunContext
from spectrumd.supervisor.statefile import write_atomically
from spectrumd.vmm.base import VmmControl, VmmError, VmSpec

if TYPE_CHECKING:
    # (The instance's start imports this module, through the VM spec.)
    from spectrumd.supervisor.instance import Instance

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RECORD = "usb.json"
HolderListener = Callable[[str, str], None]  # (device id, instance)


def usb_capable(vmm: VmmKind, resources: Iterable[Resource]) -> bool:
    """Whether an instance's VM has a USB controller: crosvm always; QEMU only
    with a usb resource (the guest's USB stack costs boot time)."""
    return vmm is VmmKind.crosvm or any(isinstance(r, UsbResource) for r in resources)


def resource_matches(resources: Iterable[Resource]) -> tuple[UsbMatch, ...]:
    return tuple(
        UsbMatch(r.vendor, r.product, r.serial) for r in resources if isinstance(r, UsbResource)
    )


@attrs.define(eq=False)
class _Attachment:
    handle: str
    explicit: bool  # by AttachUsb: stays until detached, whatever the matches


@attrs.define(eq=False)
class _Live:
    """One run of one instance, from prepare() until its teardown."""

    name: str
    log: logging.Logger
    matches: tuple[UsbMatch, ...]
    capable: bool
    # Where the attachments are recorded, for a daemon that re-adopts the VMM.
    record: Path
    control: VmmControl | None = None
    grants: dict[str, UsbMatch] = attrs.Factory(dict)
    attached: dict[str, _Attachment] = attrs.Factory(dict)
    # Detached by DetachUsb: not attached again until plugged in anew.
    declined: set[str] = attrs.Factory(set)
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    ended: bool = False

    def wants(self, dev: UsbDevice) -> bool:
        return dev.id not in self.declined and any(
            m.matches(dev.vendor, dev.product, dev.serial)
            for m in (*self.matches, *self.grants.values())
        )


class UsbService:
    """A ResourceDriver for ``usb`` resources, and the USB side of grants and the bus."""

    def __init__(self, host: UsbHost) -> None:
        # Every control call has its deadline in the run's BoundedControl.
        self.host = host
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_attached: list[HolderListener] = []
        self.on_detached: list[HolderListener] = []
        # Host events, passed on by device id (the bus layer sees no host types).
        self.on_plugged: list[Callable[[str], None]] = []
        self.on_unplugged: list[Callable[[str], None]] = []
        host.on_added.append(self._plugged)
        host.on_removed.append(self._unplugged)

    # -- ResourceDriver --------------------------------------------------------

    async def prepare(self, ctx: RunContext) -> None:
        self._register(ctx)

    def _register(self, ctx: RunContext) -> _Live:
        live = _Live(
            name=ctx.name,
            log=ctx.log,
            matches=resource_matches(ctx.resources),
            capable=usb_capable(ctx.definition.vmm, ctx.resources),
            record=ctx.run_dir / RECORD,
        )
        self._live[ctx.name] = live
        ctx.stack.callback(self._end, live)
        return live

    async def started(self, ctx: RunContext, spec: VmSpec) -> None:
        """Attach the present devices the instance wants. A device that is held
        elsewhere or that the VMM refuses is logged; the start goes on."""
        live = self._live.get(ctx.name)
        if live is None or ctx.control is None:
            return
        live.control = ctx.control
        live.capable = spec.usb or ctx.definition.vmm is VmmKind.crosvm
        await self._attach_wanted(live, self.host.devices.values())

    async def adopt(self, ctx: RunContext, spec: VmSpec) -> None:
        """A VMM kept running across a daemon restart: take back the devices its
        run record lists (still plugged in, same id), then attach what it wants."""
        live = self._register(ctx)
        live.control = ctx.control
        live.capable = spec.usb or ctx.definition.vmm is VmmKind.crosvm
        try:
            recorded = json.loads(live.record.read_text())
            assert isinstance(recorded, dict)
        except FileNotFoundError:
            recorded = {}
        except (OSError, ValueError, AssertionError) as e:
            live.log.error("cannot read %s: %s; earlier USB attachments are lost", live.record, e)
            recorded = {}
        async with live.lock:
            for dev_id, entry in recorded.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("handle"), str):
                    continue
                att = _Attachment(entry["handle"], bool(entry.get("explicit")))
                if dev_id in self.host.devices and not self.host.holder(dev_id):
                    self.host.claim(dev_id, live.name)
                    live.attached[dev_id] = att
                    self._tell(self.on_attached, dev_id, live.name)
                elif ctx.control is not None:
                    await self._quiet_detach(live, ctx.control, att.handle)
            self._save(live)
        await self._attach_wanted(live, self.host.devices.values())

    def _save(self, live: _Live) -> None:
        body = {k: {"handle": a.handle, "explicit": a.explicit} for k, a in live.attached.items()}
        try:
            write_atomically(live.record, json.dumps(body) + "\n")
        except OSError as e:
            live.log.warning("cannot record USB attachments in %s: %s", live.record, e)

    def _end(self, live: _Live) -> None:
        """Teardown of a run (after the VMM has gone): release every claim."""
        live.ended = True
        if self._live.get(live.name) is live:
            del self._live[live.name]
        freed = list(live.attached)
        live.attached.clear()
        for dev_id in freed:
            self.host.release(dev_id, live.name)
            self._tell(self.on_detached, dev_id, live.name)
        self._offer(freed)

    # -- host events -------------------------------------------------------------

    def _plugged(self, dev: UsbDevice) -> None:
        for cb in list(self.on_plugged):
            cb(dev.id)
        self._offer([dev.id])

    def _unplugged(self, dev: UsbDevice) -> None:
        # The device is gone: its claim ends now (a quick re-plug may be claimed
        # again at once); the VMM is told in the background, in order with the
        # instance's other USB calls.
        for cb in list(self.on_unplugged):
            cb(dev.id)
        for live in list(self._live.values()):
            live.declined.discard(dev.id)
            att = live.attached.pop(dev.id, None)
            if att is None:
                continue
            self.host.release(dev.id, live.name)
            self._save(live)
            self._tell(self.on_detached, dev.id, live.name)
            self._spawn(self._vmm_detach(live, dev.id, att, "unplugged"))

    def _offer(self, dev_ids: Iterable[str]) -> None:
        """Attach free devices to the first running instance that wants each."""
        for dev_id in dev_ids:
            dev = self.host.devices.get(dev_id)
            if dev is None or self.host.holder(dev_id):
                continue
            for live in self._live.values():
                if live.control is not None and live.wants(dev):
                    self._spawn(self._attach_wanted(live, [dev]))
                    break

    async def _vmm_detach(self, live: _Live, dev_id: str, att: _Attachment, why: str) -> None:
        async with live.lock:
            if live.ended or live.control is None:
                return
            try:
                await live.control.usb_detach(att.handle)
            except (VmmError, Timeout) as e:
                live.log.warning("USB device %s (%s): detach: %s", dev_id, why, e)
            else:
                live.log.info("USB device %s detached (%s)", dev_id, why)

    # -- attach and detach -------------------------------------------------------

    async def _attach_wanted(self, live: _Live, devices: Iterable[UsbDevice]) -> list[str]:
        """Attach each free device ``live`` wants; return the ids that are held elsewhere."""
        busy = []
        async with live.lock:
            for dev in list(devices):
                if live.ended or dev.id in live.attached or not live.wants(dev):
                    continue
                if self.host.holder(dev.id):
                    busy.append(dev.id)
                    continue
                try:
                    await self._attach(live, dev, explicit=False)
                except Busy:
                    busy.append(dev.id)
                except (Failed, InvalidArgument, InvalidState, Timeout) as e:
                    live.log.error("%s", e)
                except NoSuchResource as e:  # unplugged meanwhile
                    live.log.warning("USB device %s not attached: %s", dev.id, e)
        return busy

    async def _attach(self, live: _Live, dev: UsbDevice, explicit: bool) -> None:
        """Claim, open, hand to the VMM. With ``live.lock`` held.

        Raises Busy, NoSuchResource (gone), InvalidArgument (no USB controller),
        InvalidState (the run ended), Failed, Timeout; the device is then not claimed.
        """
        control = live.control
        if control is None or live.ended:
            raise InvalidState(f"cannot attach USB device {dev.id} to {live.name}: not running")
        if not live.capable:
            raise InvalidArgument(
                f"{live.name} has no USB controller: under QEMU, only an instance that "
                "holds a usb resource gets one"
            )
        self.host.claim(dev.id, live.name)
        try:
            fd = self.host.open(dev)
            try:
                handle = await control.usb_attach(fd, dev.id)
            finally:
                os.close(fd)
        except VmmError as e:
            self.host.release(dev.id, live.name)
            raise Failed(f"cannot attach USB device {dev.id} to {live.name}: {e}") from None
        except BaseException:
            self.host.release(dev.id, live.name)
            raise
        if live.ended or self.host.devices.get(dev.id) is not dev:
            # Stopped or unplugged while the VMM was attaching: undo.
            self.host.release(dev.id, live.name)
            if not live.ended:
                await self._quiet_detach(live, control, handle)
            raise InvalidState(f"USB device {dev.id} went away from {live.name} during the attach")
        live.attached[dev.id] = _Attachment(handle, explicit)
        self._save(live)
        live.log.info("USB device %s attached (%s, %s)", dev.id, dev.description, handle)
        self._tell(self.on_attached, dev.id, live.name)

    async def _quiet_detach(self, live: _Live, control: VmmControl, handle: str) -> None:
        try:
            await control.usb_detach(handle)
        except (VmmError, Timeout) as e:
            live.log.warning("USB detach of %s: %s", handle, e)

    def _running(self, name: str, what: str) -> _Live:
        live = self._live.get(name)
        if live is None or live.control is None or live.ended:
            raise InvalidState(f"cannot {what} {name}: it is not running")
        return live

    async def attach_to(self, inst: Instance, untrusted_id: str) -> UsbDevice:
        """``AttachUsb``: :meth:`attach`, under the instance's lock, if the table lets
        a control call on it now (running or paused; else InvalidState naming
        its state). Raises what :meth:`attach` raises."""
        return await inst.with_control(
            "attach a USB device to", lambda _control: self.attach(inst.name, untrusted_id)
        )

    async def detach_from(self, inst: Instance, untrusted_id: str) -> None:
        """``DetachUsb``: :meth:`detach`, as :meth:`attach_to` does it."""
        await inst.with_control(
            "detach a USB device from", lambda _control: self.detach(inst.name, untrusted_id)
        )

    async def attach(self, name: str, untrusted_id: str) -> UsbDevice:
        """Attach the device ``untrusted_id`` to the running instance ``name``.

        Raises InvalidArgument (malformed id; already attached here; no USB
        controller), NoSuchResource (no such device, or it vanished),
        InvalidState (not running), Busy (held by another instance, named),
        Failed (the node cannot be opened; the VMM refused), Timeout. On any
        error the device is left unclaimed by ``name``.
        """
        dev = self.host.get(untrusted_id)
        live = self._running(name, f"attach USB device {dev.id} to")
        async with live.lock:
            dev = self.host.get(dev.id)  # it may have gone while we waited
            if dev.id in live.attached:
                raise InvalidArgument(f"USB device {dev.id} is already attached to {name}")
            await self._attach(live, dev, explicit=True)
            live.declined.discard(dev.id)
        return dev

    async def detach(self, name: str, untrusted_id: str) -> None:
        """Detach a device from ``name``; it is not re-attached there until re-plugged.

        Raises InvalidArgument (malformed id, not attached to ``name``),
        InvalidState, Failed (the VMM refused: the device stays attached), Timeout.
        """
        dev_id = check_id(untrusted_id)
        live = self._running(name, f"detach USB device {dev_id} from")
        async with live.lock:
            att = live.attached.get(dev_id)
            if att is None:
                raise InvalidArgument(f"USB device {dev_id} is not attached to {name}")
            assert live.control is not None
            try:
                await live.control.usb_detach(att.handle)
            except VmmError as e:
                raise Failed(f"cannot detach USB device {dev_id} from {name}: {e}") from None
            del live.attached[dev_id]
            self._save(live)
            if dev_id in self.host.devices:
                live.declined.add(dev_id)
            self.host.release(dev_id, name)
            live.log.info("USB device %s detached on request", dev_id)
        self._tell(self.on_detached, dev_id, name)
        self._offer([dev_id])

    # -- grants --------------------------------------------------------------------

    def check_grantable(self, name: str, vmm: VmmKind, resources: Iterable[Resource]) -> None:
        """Raise InvalidArgument if the instance's VM cannot take USB devices."""
        if not usb_capable(vmm, resources):
            raise InvalidArgument(
                f"{name} has no USB controller: under QEMU, only an instance that holds "
                "a usb resource gets one"
            )

    async def grant_added(
        self, name: str, grant_id: str, match: UsbMatch, strict: bool = True
    ) -> list[str]:
        """A USB grant took effect on ``name``: attach the matching free devices,
        now and whenever one is plugged in while the grant lasts.

        Returns the ids attached. Raises InvalidState if ``name`` is not
        running; with ``strict`` (a new grant), Busy if matching devices are
        present but every one is held by another instance (the grant then
        has no effect here).
        """
        live = self._running(name, f"grant {match} to")
        live.grants[grant_id] = match
        matching = [
            d for d in self.host.devices.values() if match.matches(d.vendor, d.product, d.serial)
        ]
        for d in matching:
            live.declined.discard(d.id)
        busy = await self._attach_wanted(live, matching)
        attached = [d.id for d in matching if d.id in live.attached]
        if strict and busy and not attached:
            live.grants.pop(grant_id, None)
            holder = self.host.holder(busy[0])
            raise Busy(f'USB device {busy[0]} is attached to "{holder}"')
        return attached

    async def grant_removed(self, name: str, grant_id: str) -> None:
        """A USB grant ended: detach what only it brought (not AttachUsb's devices)."""
        live = self._live.get(name)
        if live is None or live.grants.pop(grant_id, None) is None:
            return
        freed = []
        async with live.lock:
            for dev_id, att in list(live.attached.items()):
                dev = self.host.devices.get(dev_id)
                if att.explicit or (dev is not None and live.wants(dev)):
                    continue
                if live.control is not None and not live.ended:
                    await self._quiet_detach(live, live.control, att.handle)
                del live.attached[dev_id]
                self._save(live)
                self.host.release(dev_id, name)
                live.log.info("USB device %s detached: its grant ended", dev_id)
                freed.append(dev_id)
        for dev_id in freed:
            self._tell(self.on_detached, dev_id, name)
        self._offer(freed)

    # -- queries ---------------------------------------------------------------------

    def rows(self) -> list[list[str]]:
        """(id, vendor, product, serial, description, holder) of every present device."""
        return [
            [d.id, d.vendor, d.product, d.serial, d.description, self.host.holder(d.id)]
            for d in self.host.devices.values()
        ]

    def attached_to(self, name: str) -> list[str]:
        live = self._live.get(name)
        return sorted(live.attached) if live is not None else []

    # -- plumbing ----------------------------------------------------------------------

    def _tell(self, listeners: list[HolderListener], dev_id: str, name: str) -> None:
        for cb in list(listeners):
            try:
                cb(dev_id, name)
            except Exception:
                log.exception("USB listener failed")

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the hotplug work started so far (tests, daemon exit)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.host.close()
