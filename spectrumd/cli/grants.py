"""``spectrumctl grant|grants|revoke|agent``."""

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Annotated, Any

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from spectrumd.bus.names import MANAGER_PATH
from spectrumd.cli.client import CallError, Client

AGENT_IFACE = "org.spectrum_os.Spectrum1.Agent"
GRANT_IFACE = "org.spectrum_os.Spectrum1.Grant"
AGENT_PATH = "/org/spectrum_os/Spectrum1/agent"
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` → seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m, 2h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("grant", help="give an instance a resource or host directory at run time")
    g.add_argument("name")
    g.add_argument("resource", help="a configured resource, or an absolute host directory")
    access = g.add_mutually_exclusive_group()
    access.add_argument("--ro", dest="access", action="store_const", const="ro", default="ro")
    access.add_argument("--rw", dest="access", action="store_const", const="rw")
    life = g.add_mutually_exclusive_group()
    life.add_argument("--for", dest="duration", type=parse_duration, metavar="DURATION")
    life.add_argument("--until-stop", action="store_true", help="until the instance stops")
    life.add_argument("--permanent", action="store_true", help="until revoked, across restarts")
    sub.add_parser("grants", help="list grants")
    sub.add_parser("revoke", help="end a grant").add_argument("id")
    sub.add_parser("agent", help="confirm grant requests from this terminal")


async def cmd_grant(c: Client, args: argparse.Namespace) -> None:
    options: dict[str, Variant] = {"access": Variant("s", args.access)}
    if args.duration:
        options["duration"] = Variant("t", args.duration)
    elif args.permanent:
        options["lifetime"] = Variant("s", "permanent")
    (path,) = await c.manager("Grant", "ssa{sv}", args.name, args.resource, options)
    grant_id = str(path).rsplit("/", 1)[-1]
    if args.json:
        print(json.dumps({"id": grant_id, "path": path}))
    else:
        print(grant_id)


async def cmd_grants(c: Client, args: argparse.Namespace) -> None:
    (rows,) = await c.manager("ListGrants")
    if args.json:
        keys = ("id", "instance", "resource", "access", "lifetime", "path")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return
    print(f"{'ID':<10} {'INSTANCE':<16} {'ACCESS':<6} {'LIFETIME':<10} RESOURCE")
    for gid, inst, res, access, lifetime, _path in rows:
        print(f"{gid:<10} {inst:<16} {access:<6} {lifetime:<10} {res}")


async def cmd_revoke(c: Client, args: argparse.Namespace) -> None:
    if not re.fullmatch("[0-9a-f]{1,32}", args.id):
        raise CallError("InvalidArgument", f"{args.id!r} is not a grant id")
    await c.call(f"{MANAGER_PATH}/grant/{args.id}", GRANT_IFACE, "Revoke")


# (allow, lifetime, expires_at): the lifetime and expiry asked for (0: the request's own).
ConfirmReply = Annotated[list[Any], DBusSignature("bst")]
Details = Annotated[dict[str, Variant], DBusSignature("a{sv}")]


class TerminalAgent(ServiceInterface):
    """Asks the person at this terminal, one request at a time."""

    def __init__(self) -> None:
        super().__init__(AGENT_IFACE)
        self._lock = asyncio.Lock()
        self._cancelled: set[str] = set()

    @dbus_method()
    async def Confirm(
        self,
        request_id: DBusStr,
        instance: DBusStr,
        application: DBusStr,
        resource: DBusStr,
        access: DBusStr,
        lifetime: DBusStr,
        details: Details,
    ) -> ConfirmReply:
        async with self._lock:
            if request_id in self._cancelled:
                return [False, lifetime, 0]
            until = ""
            if "expires_at" in details:
                left = details["expires_at"].value / 1e6 - time.time()
                until = f" for {max(0, int(left))} s"
            print(
                f"\n{instance} ({application}) asks for {resource!r}, "
                f"{'read-write' if access == 'rw' else 'read-only'}, {lifetime}{until}."
            )
            print("Allow? [y/N] ", end="", flush=True)
            answer = await asyncio.to_thread(sys.stdin.readline)
            if request_id in self._cancelled:
                print(f"(request {request_id} was withdrawn)")
                return [False, lifetime, 0]
            return [answer.strip().lower() in ("y", "yes"), lifetime, 0]

    @dbus_method()
    def Cancel(self, request_id: DBusStr) -> None:
        self._cancelled.add(request_id)
        print(f"\n(request {request_id} was withdrawn; press Enter)", flush=True)


async def cmd_agent(c: Client, args: argparse.Namespace) -> None:
    c.bus.export(AGENT_PATH, TerminalAgent())
    await c.manager("RegisterAgent", "o", AGENT_PATH)
    print("spectrumctl agent: confirming requests here; Ctrl-C to stop", flush=True)
    await c.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
