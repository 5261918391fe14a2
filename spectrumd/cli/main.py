"""``spectrumctl``: list, inspect and control spectrumd's instances.

Exit status: 0 on success, 1 when the daemon answered with an error (its
message is printed), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dbus_fast import Message
from dbus_fast.errors import DBusError

from spectrumd.bus.names import INSTANCE_IFACE, INSTANCE_PREFIX, MANAGER_PATH, unescape_path_element
from spectrumd.cli import config_check, grants, usb
from spectrumd.cli.client import CallError, Client, connect

ACTIONS = ("start", "stop", "kill", "pause", "resume")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spectrumctl", description="Control spectrumd.")
    p.add_argument(
        "--bus",
        default=os.environ.get("SPECTRUM_BUS", "system"),
        help="session, system or a D-Bus address (default: $SPECTRUM_BUS or system)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list instances")
    sub.add_parser("status", help="show one instance").add_argument("name")
    for action in ACTIONS:
        action_parser = sub.add_parser(action, help=f"{action} an instance")
        if action == "stop":
            action_parser.add_argument("name", nargs="?")
            action_parser.add_argument(
                "--all", action="store_true", help="stop every running instance (shutdown)"
            )
        else:
            action_parser.add_argument("name")
    logs = sub.add_parser("logs", help="show an instance's console log")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    sub.add_parser("watch", help="print state changes as they happen")
    create = sub.add_parser("create", help="define an instance at run time")
    create.add_argument("name")
    create.add_argument("application")
    create.add_argument("resources", nargs="*")
    sub.add_parser("delete", help="delete a run-time instance").add_argument("name")
    sub.add_parser("reload", help="re-read the configuration")
    config = sub.add_parser("config", help="work with configuration files (no daemon needed)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a JSON configuration")
    check.add_argument("file", type=Path)
    check.add_argument("--data-file", type=Path, help="also the daemon's instances.json")
    grants.add_parsers(sub)
    usb.add_parsers(sub)
    sub.add_parser("applications", help="list applications")
    sub.add_parser("resources", help="list resources")
    return p


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _since(us: int) -> str:
    if not us:
        return ""
    t = datetime.datetime.fromtimestamp(us / 1e6).astimezone()
    return f" since {t.isoformat(timespec='seconds')}"


async def cmd_list(c: Client, args: argparse.Namespace) -> None:
    (rows,) = await c.manager("ListInstances")
    if args.json:
        _print_json([{"name": n, "application": a, "state": s, "path": p} for n, a, s, p in rows])
        return
    width = max([len(r[0]) for r in rows] + [8])
    print(f"{'INSTANCE':<{width}}  {'APPLICATION':<16}  STATE")
    for name, app, state, _path in rows:
        print(f"{name:<{width}}  {app:<16}  {state}")


async def cmd_status(c: Client, args: argparse.Namespace) -> None:
    props = await c.properties(await c.instance_path(args.name))
    if args.json:
        _print_json(props)
        return
    print(f"{props['Name']} (application {props['Application']})")
    print(f"  State:     {props['State']}{_since(props['StartedAt'])}")
    if props["StateReason"]:
        print(f"  Reason:    {props['StateReason']}")
    pid = f", pid {props['MainPID']}" if props["MainPID"] else ""
    print(f"  VMM:       {props['Vmm']}{pid}")
    print(f"  Resources: {', '.join(props['Resources']) or '(none)'}")
    print(f"  Guest:     {'ready' if props['GuestReady'] else 'not ready'}")
    if props["NeedsRestart"]:
        print("  Note:      the configuration changed; restart to apply it")
    print(f"  Console:   {props['ConsoleLog']}")


async def cmd_action(c: Client, args: argparse.Namespace) -> None:
    if args.command == "stop" and args.all:
        await c.manager("StopAll")
        return
    if not args.name:
        raise CallError("InvalidArgument", f"{args.command}: name an instance")
    await c.instance_call(args.name, args.command.capitalize())


def _follow(path: Path, follow: bool) -> None:
    """Print the log, then (with follow) new output, across rotations."""
    pos, ino = 0, None
    while True:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != ino or st.st_size < pos:
                    pos, ino = 0, st.st_ino
                f.seek(pos)
                data = f.read()
                pos += len(data)
        except FileNotFoundError:
            data = b""
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        if not follow:
            return
        time.sleep(0.2)


async def cmd_logs(c: Client, args: argparse.Namespace) -> None:
    props = await c.properties(await c.instance_path(args.name))
    path = Path(props["ConsoleLog"])
    if not args.follow and not await asyncio.to_thread(path.exists):
        print(f"{args.name} has no console output yet", file=sys.stderr)
        return
    await asyncio.to_thread(_follow, path, args.follow)


async def cmd_watch(c: Client, args: argparse.Namespace) -> None:
    queue: asyncio.Queue[Message] = asyncio.Queue()

    def handler(msg: Message) -> bool:
        if msg.path and msg.path.startswith(MANAGER_PATH):
            queue.put_nowait(msg)
        return False

    c.bus.add_message_handler(handler)
    await c.add_match(
        f"type='signal',interface='org.freedesktop.DBus.Properties',"
        f"member='PropertiesChanged',path_namespace='{MANAGER_PATH}'"
    )
    await c.add_match(
        f"type='signal',interface='org.freedesktop.DBus.ObjectManager',path='{MANAGER_PATH}'"
    )
    while True:
        msg = await queue.get()
        event = _describe_signal(msg)
        if event is None:
            continue
        if args.json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("instance",))
            print(f"{event['instance']}: {detail}", flush=True)


def _describe_signal(msg: Message) -> dict[str, Any] | None:
    if msg.member == "PropertiesChanged" and msg.body and msg.body[0] == INSTANCE_IFACE:
        name = unescape_path_element((msg.path or "").removeprefix(INSTANCE_PREFIX))
        changed = {k: v.value for k, v in msg.body[1].items()}
        out: dict[str, Any] = {"instance": name}
        for key in ("State", "StateReason", "GuestReady", "MainPID", "NeedsRestart"):
            if key in changed:
                out[key.lower()] = changed[key]
        return out if len(out) > 1 else None
    if msg.member in ("InterfacesAdded", "InterfacesRemoved") and msg.body:
        name = unescape_path_element(str(msg.body[0]).removeprefix(INSTANCE_PREFIX))
        return {"instance": name, "event": "added" if msg.member.endswith("Added") else "removed"}
    return None


async def cmd_create(c: Client, args: argparse.Namespace) -> None:
    (path,) = await c.manager(
        "CreateInstance", "ssasa{sv}", args.name, args.application, args.resources, {}
    )
    if args.json:
        _print_json({"name": args.name, "path": path})


async def cmd_delete(c: Client, args: argparse.Namespace) -> None:
    await c.manager("DeleteInstance", "s", args.name)


async def cmd_reload(c: Client, args: argparse.Namespace) -> None:
    await c.manager("Reload")


async def cmd_applications(c: Client, args: argparse.Namespace) -> None:
    (rows,) = await c.manager("ListApplications")
    if args.json:
        _print_json([{"name": n, "command": cmd} for n, cmd in rows])
        return
    for name, command in rows:
        print(f"{name}: {command}")


async def cmd_resources(c: Client, args: argparse.Namespace) -> None:
    (rows,) = await c.manager("ListResources")
    if args.json:
        _print_json([{"name": n, "type": t, "summary": s} for n, t, s in rows])
        return
    for name, kind, summary in rows:
        print(f"{name} ({kind}): {summary}")


COMMANDS = {
    "list": cmd_list,
    "status": cmd_status,
    "logs": cmd_logs,
    "watch": cmd_watch,
    "create": cmd_create,
    "delete": cmd_delete,
    "reload": cmd_reload,
    "applications": cmd_applications,
    "resources": cmd_resources,
    "grant": grants.cmd_grant,
    "grants": grants.cmd_grants,
    "revoke": grants.cmd_revoke,
    "agent": grants.cmd_agent,
    "usb": usb.cmd_usb,
    **dict.fromkeys(ACTIONS, cmd_action),
}


async def run(args: argparse.Namespace) -> int:
    try:
        bus = await connect(args.bus)
    except (OSError, ValueError, DBusError) as e:
        print(f"spectrumctl: cannot connect to the {args.bus} bus: {e}", file=sys.stderr)
        return 1
    try:
        await COMMANDS[args.command](Client(bus), args)
    except CallError as e:
        if args.json:
            print(json.dumps({"error": e.short, "message": e.message}), file=sys.stderr)
        else:
            print(f"spectrumctl: {e.message}", file=sys.stderr)
        return 1
    finally:
        bus.disconnect()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        sys.exit(config_check.check(args.file, args.data_file))
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        sys.exit(130)
