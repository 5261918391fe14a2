"""VMMs registered with systemd-machined, where systemd runs: ``machinectl list``.

Each VMM is moved into a scope of its own, ``machine-NAME.scope`` in
``machine.slice`` (``CreateMachine``), so that systemd accounts for it apart from
spectrumd and a restart of ``spectrumd.service`` never touches it. The scope is
ordered before ``spectrum-instances.service``: at shutdown that unit's ExecStop
stops the instances gracefully before systemd stops their scopes. A machine
ends with its VMM (machined drops it when the scope empties); there is nothing
to unregister, and a re-adopted VMM is still in its scope.

Without systemd (no ``/run/systemd/system``) or without machined, nothing is
registered and the daemon works the same. A refused registration (a machine of
that name already exists, say) is logged; the instance runs anyway.
"""

import asyncio
import logging
from pathlib import Path

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from spectrumd.bus.connection import call_bus_daemon

log = logging.getLogger(__name__)

MACHINE1 = "org.freedesktop.machine1"
MACHINE1_PATH = "/org/freedesktop/machine1"
MACHINE1_MANAGER = "org.freedesktop.machine1.Manager"
SERVICE = "spectrumd"
STOPPED_BY = "spectrum-instances.service"
BOOTED_MARKER = Path("/run/systemd/system")  # sd_booted(3)
TIMEOUT = 10.0


def booted_with_systemd() -> bool:
    return BOOTED_MARKER.is_dir()


class Machines:
    """The daemon's link to machined; inert until :meth:`start` finds one."""

    def __init__(self) -> None:
        self._bus: MessageBus | None = None

    async def start(self) -> None:
        """Connect to the system bus if systemd runs and machined is there."""
        if not booted_with_systemd():
            log.info("systemd is not running: VMMs are not registered with machined")
            return
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except Exception as e:  # OSError, and dbus-fast's own errors on auth
            log.warning("cannot reach the system bus: VMMs are not registered: %s", e)
            return
        if not await _reachable(bus):
            log.warning("systemd-machined is not installed: VMMs are not registered")
            bus.disconnect()
            return
        self._bus = bus

    async def register(self, name: str, pid: int) -> None:
        """Move VMM ``pid`` into machine-NAME.scope. Never raises: logs what failed."""
        if self._bus is None:
            return
        properties = [
            ["Description", Variant("s", f"spectrum instance {name}")],
            ["Before", Variant("as", [STOPPED_BY])],
        ]
        msg = Message(
            destination=MACHINE1,
            path=MACHINE1_PATH,
            interface=MACHINE1_MANAGER,
            member="CreateMachine",
            signature="sayssusa(sv)",
            body=[name, b"", SERVICE, "vm", pid, "", properties],
        )
        try:
            async with asyncio.timeout(TIMEOUT):
                reply = await self._bus.call(msg)
        except Exception as e:  # OSError, TimeoutError, a dropped connection
            why = str(e) or type(e).__name__
            log.warning("%s: not registered with systemd-machined: %s", name, why)
            return
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else ""
            error = reply.error_name if reply is not None else "no reply"
            log.warning("%s: not registered with systemd-machined: %s: %s", name, error, detail)
            return
        log.info("%s: registered with systemd-machined (machine-%s.scope)", name, name)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None


async def _reachable(bus: MessageBus) -> bool:
    """Whether machine1 has an owner or can be activated."""
    for member in ("ListNames", "ListActivatableNames"):
        reply = await call_bus_daemon(bus, member, "")
        if reply.message_type == MessageType.METHOD_RETURN and MACHINE1 in reply.body[0]:
            return True
    return False
