"""``spectrumd``: load the configuration, serve the D-Bus API, supervise VMs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from dbus_fast import BusType, RequestNameReply
from dbus_fast.errors import DBusError

from spectrumd.bus.auth import CallerCheck
from spectrumd.bus.connection import SpectrumBus
from spectrumd.bus.grants import GrantsBus
from spectrumd.bus.manager import ManagerInterface
from spectrumd.bus.names import BUS_NAME
from spectrumd.daemon.notify import sd_notify
from spectrumd.errors import ConfigError, SpectrumError
from spectrumd.host.network import NetworkDriver
from spectrumd.supervisor import Environment, Supervisor
from spectrumd.supervisor.files import FileService
from spectrumd.supervisor.grants import GrantService
from spectrumd.supervisor.instance import Instance
from spectrumd.supervisor.portal import PortalDriver
from spectrumd.supervisor.requests import RequestBroker

log = logging.getLogger("spectrumd")

DEFAULT_STATE_DIR = Path("/var/lib/spectrumd")
DEFAULT_GUEST_DIR = Path("/var/cache/spectrumd/guest")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spectrumd", description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="JSON configuration file")
    p.add_argument(
        "--bus", default="system", help="session, system, or a D-Bus address (default: system)"
    )
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument(
        "--guest-dir",
        type=Path,
        default=Path(os.environ.get("SPECTRUMD_GUEST_DIR", DEFAULT_GUEST_DIR)),
        help="where the embedded default guest (vmlinuz, initramfs.img) lives",
    )
    p.add_argument(
        "--fs-user",
        default="nobody" if os.geteuid() == 0 else "",
        help="user the file server runs as (default: nobody when run as root; '' keeps ours)",
    )
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="network namespace (ip netns name) for every bridge and tap; it must exist "
        "(default: the daemon's own)",
    )
    p.add_argument("--console-log-size", type=int, default=1024 * 1024, metavar="BYTES")
    p.add_argument("--console-log-keep", type=int, default=3, metavar="N")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def bus_for(spec: str) -> SpectrumBus:
    if spec == "session":
        return SpectrumBus(bus_type=BusType.SESSION)
    if spec == "system":
        return SpectrumBus(bus_type=BusType.SYSTEM)
    return SpectrumBus(bus_address=spec)


async def serve(args: argparse.Namespace) -> int:
    files = FileService(user=args.fs_user or None)
    network = NetworkDriver(netns=args.netns)
    portal = PortalDriver()
    env = Environment(
        state_dir=args.state_dir.absolute(),
        guest_dir=args.guest_dir.absolute(),
        console_max_bytes=args.console_log_size,
        console_keep=args.console_log_keep,
        drivers=(files, network, portal),
    )
    env.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        sup = Supervisor(args.config, env)
    except ConfigError as e:
        print(f"spectrumd: {e}", file=sys.stderr)
        return 2
    try:
        await network.start()
    except SpectrumError as e:
        print(f"spectrumd: {e}", file=sys.stderr)
        await network.close()
        return 1
    try:
        try:
            await files.start()
        except SpectrumError as e:
            print(f"spectrumd: {e}", file=sys.stderr)
            return 1
        files.on_restart.append(lambda name: _remount(sup, name))
        try:
            return await _serve_bus(args, sup, files, portal, network)
        finally:
            await files.close()
    finally:
        await network.close()


def _remount(sup: Supervisor, name: str) -> None:
    inst = sup.instances.get(name)
    if inst is not None:
        inst.send_guest(b"mount-fs\n")


async def _serve_bus(
    args: argparse.Namespace,
    sup: Supervisor,
    files: FileService,
    portal: PortalDriver,
    network: NetworkDriver,
) -> int:
    grants = GrantService(
        sup.env.state_dir, sup.instances, lambda: sup.config.resources, files.set_exports
    )
    grants.load()
    broker = RequestBroker(grants)
    portal.broker = broker
    tasks: set[asyncio.Task[None]] = set()

    def instance_changed(inst: Instance, changed: frozenset[str]) -> None:
        if "state" in changed:
            task = asyncio.ensure_future(grants.instance_changed(inst))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    sup.on_changed.append(instance_changed)

    bus = await bus_for(args.bus).connect()
    auth = CallerCheck(bus)
    manager = ManagerInterface(bus, sup, auth, GrantsBus(bus, grants, broker, auth), network)
    manager.export_all()
    reply = await bus.request_name(BUS_NAME)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        print(f"spectrumd: the name {BUS_NAME} is already owned on this bus", file=sys.stderr)
        bus.disconnect()
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(sup))
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    stopped = asyncio.ensure_future(stop.wait())

    # Everything made at start-up lives as long as the daemon: keep it out of
    # full collections, which otherwise stall the loop for tens of ms.
    gc.collect()
    gc.freeze()
    log.info("serving %s with %d instances", BUS_NAME, len(sup.instances))
    sd_notify("READY=1", f"STATUS=serving {len(sup.instances)} instances")
    await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    sd_notify("STOPPING=1", "STATUS=stopping instances")
    if disconnected.done():
        log.error("lost the bus connection")
    log.info("stopping running instances")
    await sup.stop_all()
    await sup.close()
    stopped.cancel()
    if not disconnected.done():
        bus.disconnect()
    with contextlib.suppress(Exception):
        await disconnected
    return 1 if not stop.is_set() else 0


def _reload(sup: Supervisor) -> None:
    try:
        sup.reload()
    except SpectrumError as e:
        log.error("reload refused: %s", e)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        sys.exit(asyncio.run(serve(args)))
    except DBusError as e:
        print(f"spectrumd: D-Bus error: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, ValueError) as e:
        # e.g. no bus at the given address
        print(f"spectrumd: {e}", file=sys.stderr)
        sys.exit(1)
