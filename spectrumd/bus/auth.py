"""The daemon's own check of who may change state (besides the bus policy).

Allowed: root, the daemon's own user (a session bus in tests and the demo),
and members of the group ``spectrum``. Everyone may read.
"""

import grp
import logging
import os
import pwd

from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from spectrumd.bus.connection import call_bus_daemon, current_sender
from spectrumd.errors import AccessDenied

log = logging.getLogger(__name__)

ADMIN_GROUP = "spectrum"
_CACHE_MAX = 1024


def uid_is_admin(uid: int, group: str = ADMIN_GROUP) -> bool:
    if uid in (0, os.getuid()):
        return True
    try:
        gid = grp.getgrnam(group).gr_gid
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(user.pw_name, user.pw_gid)


class CallerCheck:
    def __init__(self, bus: MessageBus, group: str = ADMIN_GROUP) -> None:
        self._bus = bus
        self._group = group
        # Unique names are never reused on a bus, so caching by them is safe.
        self._uids: dict[str, int] = {}

    async def _uid(self, sender: str) -> int:
        uid = self._uids.get(sender)
        if uid is None:
            reply = await call_bus_daemon(self._bus, "GetConnectionUnixUser", "s", sender)
            if reply.message_type != MessageType.METHOD_RETURN or not reply.body:
                raise AccessDenied("cannot identify the caller")
            uid = int(reply.body[0])
            if len(self._uids) >= _CACHE_MAX:
                self._uids.clear()
            self._uids[sender] = uid
        return uid

    async def require_admin(self, action: str) -> None:
        """Raise AccessDenied unless the current caller may ``action``."""
        sender = current_sender.get()
        if sender is None:
            raise AccessDenied(f"{action}: unknown caller")
        uid = await self._uid(sender)
        if not uid_is_admin(uid, self._group):
            log.info("refused %s to uid %d (%s)", action, uid, sender)
            raise AccessDenied(f"{action}: only root and the group {self._group} may do this")
