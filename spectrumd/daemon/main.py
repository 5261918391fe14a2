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
from spectrumd.bus.machined import Machines
from spectrumd.bus.manager import ManagerInterface
from spectrumd.bus.names import BUS_NAME
from spectrumd.daemon.confine import StartupError, adopt_ids, confinement
from spectrumd.daemon.notify import FdStore, sd_notify, start_watchdog
from spectrumd.errors import ConfigError, SpectrumError
from spectrumd.host import uids
from spectrumd.host.network import HostNetworks
from spectrumd.host.uids import DEFAULT_RANGE
from spectrumd.host.usb import DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, UsbHost
from spectrumd.model.types import VmmKind
from spectrumd.supervisor import Environment, Supervisor, process
from spectrumd.supervisor.files import FileService
from spectrumd.supervisor.grants import GrantService
from spectrumd.supervisor.instance import Instance
from spectrumd.supervisor.networks import NetworkService
from spectrumd.supervisor.portal import PortalDriver
from spectrumd.supervisor.requests import CONFIRM_TIMEOUT, RequestBroker
from spectrumd.supervisor.usb import UsbService
from spectrumd.virtiofs.spin import DEFAULT_POLL_MAX_US
from spectrumd.vmm import BACKENDS
from spectrumd.vmm.crosvm import CrosvmBackend

log = logging.getLogger("spectrumd")

DEFAULT_STATE_DIR = Path("/var/lib/spectrumd")
DEFAULT_GUEST_DIR = Path("/var/cache/spectrumd/guest")


def _microseconds(text: str) -> int:
    if not text.isdigit() or int(text) > 10**6:
        raise argparse.ArgumentTypeError(f"{text} is not a number of microseconds (0 to 1000000)")
    return int(text)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


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
        "--no-machined",
        dest="machined",
        action="store_false",
        help="do not register VMMs with systemd-machined (by default they are, where "
        "systemd runs and machined is installed)",
    )
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="network namespace (ip netns name) for every bridge and tap; it must exist "
        "(default: the daemon's own)",
    )
    p.add_argument(
        "--uid-range",
        default=str(DEFAULT_RANGE),
        metavar="FIRST-LAST",
        help="uids (== gids) each running instance's VMM and file server get, two an "
        "instance; they must be nobody's (default: %(default)s)",
    )
    p.add_argument(
        "--unsafe-unconfined-vmm",
        action="store_true",
        help="run VMMs as root with no sandbox (a warning at every start); for kernels "
        "without Landlock",
    )
    p.add_argument(
        "--usb-sysfs-root",
        type=Path,
        default=DEFAULT_SYSFS_ROOT,
        metavar="DIR",
        help="where the host's USB devices are listed (default: %(default)s)",
    )
    p.add_argument(
        "--usb-dev-root",
        type=Path,
        default=DEFAULT_DEV_ROOT,
        metavar="DIR",
        help="where their device nodes are (default: %(default)s)",
    )
    p.add_argument(
        "--control-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="deadline of every VMM control call (pause, hot-plug, power button; "
        "default: %(default)g)",
    )
    p.add_argument(
        "--confirm-timeout",
        type=_seconds,
        default=CONFIRM_TIMEOUT,
        metavar="SECONDS",
        help="how long a grant request waits for the agent's answer before it ends "
        "(code 2; default: %(default)g)",
    )
    p.add_argument(
        "--file-server-poll",
        type=_microseconds,
        default=DEFAULT_POLL_MAX_US,
        metavar="MICROSECONDS",
        help="the longest each file server polls for its guest's next request before "
        "it sleeps; 0: it always sleeps (default: %(default)d)",
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
    try:
        async with contextlib.AsyncExitStack() as stack:
            return await _serve(args, stack)
    except StartupError as e:
        print(f"spectrumd: {e}", file=sys.stderr)
        return e.status


async def _serve(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> int:
    files = FileService(
        args.state_dir.absolute(), args.control_timeout, poll_max_us=args.file_server_poll
    )
    host_networks = HostNetworks(netns=args.netns)
    network = NetworkService(host_networks)
    portal = PortalDriver()
    usb = UsbService(UsbHost(args.usb_sysfs_root, args.usb_dev_root))
    # crosvm's serial connections, kept across restarts by systemd.
    kept = FdStore.from_environment()
    crosvm = BACKENDS[VmmKind.crosvm]
    assert isinstance(crosvm, CrosvmBackend)
    crosvm.keeper = kept if kept.active else None
    stack.callback(setattr, crosvm, "keeper", None)
    machines = Machines()
    if args.machined:
        await machines.start()
        stack.callback(machines.close)
    allocator, abi = confinement(args)
    env = Environment(
        state_dir=args.state_dir.absolute(),
        guest_dir=args.guest_dir.absolute(),
        console_max_bytes=args.console_log_size,
        console_keep=args.console_log_keep,
        drivers=(files, network, portal, usb),
        machines=machines,
        control_timeout=args.control_timeout,
        uids=allocator,
        landlock_abi=abi,
    )
    try:
        sup = Supervisor(args.config, env)
        if allocator is not None:
            uids.check_range(allocator.range, len(sup.instances), (), ())
    except ConfigError as e:
        raise StartupError(str(e), 2) from None
    except SpectrumError as e:
        raise StartupError(str(e)) from None
    # Root's alone; a crosvm reaches its own directory run/NAME/vmm through
    # these (search, no read).
    (env.state_dir / "run").mkdir(parents=True, exist_ok=True)
    for d in (env.state_dir, env.state_dir / "run"):
        d.chmod(0o711)
    # VMMs an earlier daemon left running: their taps must survive the cleanup.
    records = sup.read_records()
    adopt_ids(allocator, records)
    live = {n for n, r in records.items() if process.start_time(r.pid) == r.start_time}
    stack.push_async_callback(host_networks.close)
    try:
        await host_networks.start(adopt=live)
    except SpectrumError as e:
        raise StartupError(str(e)) from None

    grants = GrantService(
        env.state_dir, sup.instances, lambda: sup.config.resources, files.set_exports, usb=usb
    )
    grants.load()
    stack.callback(grants.close)
    broker = RequestBroker(grants, args.confirm_timeout)
    portal.broker = broker
    tasks: set[asyncio.Task[None]] = set()

    def instance_changed(inst: Instance, changed: frozenset[str]) -> None:
        if "state" in changed:
            task = asyncio.ensure_future(grants.instance_changed(inst))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    sup.on_changed.append(instance_changed)
    await usb.host.start()
    stack.push_async_callback(usb.close)
    await sup.adopt_all(records)
    for name in kept.close_unclaimed():
        log.info("dropped a kept connection no VMM claimed: %s", name)
    grants.drop_orphans()
    # On the way out the VMMs keep running; the next daemon adopts them.
    stack.push_async_callback(sup.close)
    stack.push_async_callback(sup.detach_all)

    bus = await bus_for(args.bus).connect()
    stack.callback(bus.disconnect)
    auth = CallerCheck(bus)
    manager = ManagerInterface(
        bus, sup, auth, GrantsBus(bus, grants, broker, auth), network, usb=usb
    )
    manager.export_all()
    reply = await bus.request_name(BUS_NAME)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise StartupError(f"the name {BUS_NAME} is already owned on this bus")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(sup))
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    stopped = asyncio.ensure_future(stop.wait())
    watchdog = start_watchdog()
    if watchdog is not None:
        stack.callback(watchdog.cancel)

    # Everything made at start-up lives as long as the daemon: keep it out of
    # full collections, which otherwise stall the loop for tens of ms.
    gc.collect()
    gc.freeze()
    log.info("serving %s with %d instances", BUS_NAME, len(sup.instances))
    sd_notify("READY=1", f"STATUS=serving {len(sup.instances)} instances")
    await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    sd_notify("STOPPING=1", "STATUS=leaving the instances running")
    if disconnected.done():
        log.error("lost the bus connection")
    stopped.cancel()
    return 0 if stop.is_set() else 1


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
    # qemu.qmp logs a VMM's closed connection at ERROR; the supervisor reports
    # what it means (an exit, a failed call) itself.
    if args.log_level != "debug":
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        sys.exit(asyncio.run(serve(args)))
    except DBusError as e:
        print(f"spectrumd: D-Bus error: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, ValueError) as e:
        # e.g. no bus at the given address
        print(f"spectrumd: {e}", file=sys.stderr)
        sys.exit(1)
