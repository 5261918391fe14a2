"""spectrumd benchmark: ``make bench`` (``.venv/bin/python bench/run.py``).

Starts its own private dbus-daemon, a bare dbus-fast echo service (the peer) and
spectrumd with 100 configured instances, then measures:

1. ``ObjectManager.GetManagedObjects`` (what desktop clients such as GLib's
   GDBusObjectManagerClient call first) against ``Managed(u)`` of a bare dbus-fast
   service returning a same-size precomputed ``a{oa{sa{sv}}}``, both called the same
   way (low-level ``bus.call(Message(...))``), interleaved in blocks.
   Target: median <= 2x the peer's median. ListInstances and Echo are shown too.
2. From a state change inside spectrumd's objects to the PropertiesChanged a
   client process receives: the supervisor and bus layer run in this process on
   their own connection (a real dbus-daemon in between). An instance goes through
   real transitions, a start that fails at once (its kernel is missing):
   ``stopped/failed -> starting -> failed``, each stamped by a listener at the
   instance's state change (before the bus layer's own listener runs); the client
   is a separate process that stamps each PropertiesChanged carrying ``State`` on
   arrival. Target: median <= 2 ms.
3. The daemon's overhead of ``StartInstance`` up to the exec of the VMM: a shim named
   ``qemu-system-x86_64`` first on spectrumd's PATH records the time and execs the real
   QEMU. The shim's own cost (exec of the shell, reading the clock) is measured alone
   and subtracted. Target: median <= 20 ms. Needs the embedded guest (``make guest``).
4. spectrumd's idle RSS with the 100 instances configured. Target: <= 60 MiB.

``--only NAME`` (``managed``, ``signals``, ``rss``, ``start``; repeatable) runs
just those. Prints a table and exits 0 whether or not the targets are met (it is a
measurement); exits 1 only when the benchmark itself could not run. Everything started here is
ended by pid on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import CallFailed, checked_call, child, kill_our_vmms, private_bus, status_kib
from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVICE = Path(__file__).resolve().parent / "echo_service.py"
SIGNAL_CLIENT = Path(__file__).resolve().parent / "signal_client.py"

BUS_NAME = "org.spectrum_os.Spectrum1"
MANAGER_PATH = "/org/spectrum_os/Spectrum1"
MANAGER_IFACE = "org.spectrum_os.Spectrum1.Manager"
INSTANCE_IFACE = "org.spectrum_os.Spectrum1.Instance"
ECHO_NAME = "org.spectrum_os.BenchEcho"
ECHO_PATH = "/org/spectrum_os/BenchEcho"
ECHO_IFACE = "org.spectrum_os.BenchEcho"

N_INSTANCES = 100
MANAGED_RATIO_TARGET = 2.0
SIGNAL_TARGET_MS = 2.0
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
START_OVERHEAD_TARGET_MS = 20.0
RSS_TARGET_MIB = 60.0
QEMU = "qemu-system-x86_64"


# -- small helpers ------------------------------------------------------------


def median_ms(ns: list[int]) -> float:
    return statistics.median(ns) / 1e6


def p90_ms(ns: list[int]) -> float:
    return statistics.quantiles(ns, n=10, method="inclusive")[-1] / 1e6


def config(n: int) -> dict[str, Any]:
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg"},
        "applications": {"app": {"command": "sleep 3600", "memory_mib": 128}},
        "instances": {f"i{k:03d}": {"application": "app"} for k in range(n)},
    }


def parse_stamps(path: Path) -> list[int]:
    """CLOCK_REALTIME stamps written by the shim, in ns (``date +%s%N`` or bash's
    ``$EPOCHREALTIME``, seconds and microseconds)."""
    if not path.exists():
        return []
    return parse_stamp_words(path.read_text().split())


def parse_stamp_words(words: list[str]) -> list[int]:
    out = []
    for line in words:
        parts = re.split(r"[^0-9]", line)
        if len(parts) == 2:
            out.append(int(parts[0]) * 1_000_000_000 + int(parts[1].ljust(6, "0")[:6]) * 1000)
        else:
            out.append(int(line))
    return out


EXEC_MARK = "spectrum-bench-exec"


def exec_stamps(vmm_log: Path) -> list[int]:
    """The stamps a VMM shim wrote to its stderr (the run's vmm.log): a confined VMM
    can write nowhere else."""
    if not vmm_log.exists():
        return []
    lines = vmm_log.read_text(errors="replace").splitlines()
    words = [line.split()[1] for line in lines if line.startswith(EXEC_MARK + " ")]
    return parse_stamp_words(words)


def write_shim(path: Path, stamp_file: Path | None, target: str) -> None:
    """A shell script that appends a CLOCK_REALTIME stamp to stamp_file (None: to its
    stderr, marked) and execs target.

    bash reads the clock without a fork (``$EPOCHREALTIME``, microseconds); plain sh
    needs ``date +%s%N`` (a fork and an exec more).
    """
    bash = shutil.which("bash")
    to = f">>'{stamp_file}'" if stamp_file is not None else ">&2"
    mark = "" if stamp_file is not None else EXEC_MARK + " "
    if bash is not None:
        body = f"#!{bash}\nprintf '{mark}%s\\n' \"$EPOCHREALTIME\" {to}\n"
    else:
        body = f'#!/bin/sh\necho "{mark}$(date +%s%N)" {to}\n'
    path.write_text(body + f"exec '{target}' \"$@\"\n")
    path.chmod(0o755)


def probe_shim_cost(probe: Path, stamp_file: Path) -> int:
    """One run of the shim alone (exec'ing /bin/true): ns from the spawn to its stamp."""
    before = len(parse_stamps(stamp_file))
    t0 = time.time_ns()
    pid = os.posix_spawn(str(probe), [str(probe)], os.environ)
    os.waitpid(pid, 0)
    stamps = parse_stamps(stamp_file)
    if len(stamps) != before + 1:
        raise RuntimeError("the shim probe wrote no time stamp")
    return stamps[-1] - t0


# -- the table ----------------------------------------------------------------


@dataclass
class Row:
    metric: str
    value: str
    peer: str = "-"
    ratio: str = "-"
    verdict: str = "info"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: str) -> None:
        self.rows.append(Row(*args))

    def print(self) -> None:
        header = Row("metric", "value", "peer/target", "ratio", "verdict")
        table = [header, *self.rows]
        cols = [
            [r.metric for r in table],
            [r.value for r in table],
            [r.peer for r in table],
            [r.ratio for r in table],
            [r.verdict for r in table],
        ]
        widths = [max(len(c) for c in col) for col in cols]
        print()
        for i, r in enumerate(table):
            cells = [r.metric, r.value, r.peer, r.ratio, r.verdict]
            line = "  ".join(
                c.ljust(w) if j in (0, 2, 4) else c.rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            print(line.rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        for note in self.notes:
            print(f"note: {note}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- D-Bus calls --------------------------------------------------------------


async def call(bus: MessageBus, make: Callable[[], Message]) -> Message:
    return await checked_call(bus, make())


def manager_msg(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    return Message(
        destination=BUS_NAME,
        path=MANAGER_PATH,
        interface=MANAGER_IFACE,
        member=member,
        signature=signature,
        body=body or [],
    )


def list_instances() -> Message:
    return manager_msg("ListInstances")


def managed_objects() -> Message:
    return Message(
        destination=BUS_NAME,
        path=MANAGER_PATH,
        interface=OBJECT_MANAGER_IFACE,
        member="GetManagedObjects",
    )


def echo() -> Message:
    return Message(
        destination=ECHO_NAME,
        path=ECHO_PATH,
        interface=ECHO_IFACE,
        member="Echo",
        signature="s",
        body=["hello"],
    )


def echo_u(member: str, arg: int) -> Callable[[], Message]:
    def make() -> Message:
        return Message(
            destination=ECHO_NAME,
            path=ECHO_PATH,
            interface=ECHO_IFACE,
            member=member,
            signature="u",
            body=[arg],
        )

    return make


async def timed(bus: MessageBus, make: Callable[[], Message], n: int, out: list[int]) -> None:
    for _ in range(n):
        t0 = time.perf_counter_ns()
        reply = await bus.call(make())
        t1 = time.perf_counter_ns()
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            await call(bus, make)  # raises with the error's text
        out.append(t1 - t0)


def unmarshal_us(reply: Message, n: int = 500) -> float:
    """The client's cost of decoding this reply: dbus-fast's unmarshaller, in process."""
    data = bytes(reply._marshall(False))  # type: ignore[attr-defined]
    t0 = time.perf_counter_ns()
    for _ in range(n):
        reader = Unmarshaller(io.BytesIO(data))
        reader.unmarshall()
    return (time.perf_counter_ns() - t0) / n / 1000


def reply_size(reply: Message) -> int:
    """Bytes of the reply on the wire (dbus-fast's marshaller, else an estimate)."""
    try:
        return len(reply._marshall(False))  # type: ignore[attr-defined]
    except Exception:
        return sum(len(str(f)) + 8 for entry in reply.body[0] for f in entry)


# -- the benchmark ------------------------------------------------------------


@dataclass
class Setup:
    address: str
    config_path: Path
    daemon: subprocess.Popen[str]
    daemon_log: Path
    state_dir: Path
    guest_dir: Path
    stamp_file: Path
    probe: Path
    probe_stamps: Path
    shim_ok: bool


async def wait_ready(bus: MessageBus, s: Setup) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await call(bus, list_instances)
            return
        except CallFailed:
            if s.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "spectrumd did not come up:\n" + s.daemon_log.read_text()[-3000:]
                ) from None
            await asyncio.sleep(0.05)


async def interleaved(
    bus: MessageBus, makes: list[Callable[[], Message]], calls: int, warmup: int
) -> list[list[int]]:
    """Each call ``calls`` times, in short blocks that alternate their order (load
    changes on the host hit every method alike); ns per call."""
    scratch: list[int] = []
    for make in makes:
        await timed(bus, make, warmup, scratch)
    outs: list[list[int]] = [[] for _ in makes]
    plan = list(zip(makes, outs, strict=True))
    done, block = 0, 50
    while done < calls:
        n = min(block, calls - done)
        for make, out in plan:
            await timed(bus, make, n, out)
        plan.reverse()  # ABC CBA ...: no method always runs first
        done += n
    return outs


async def bench_managed(bus: MessageBus, rep: Report, calls: int, warmup: int) -> None:
    first = await call(bus, managed_objects)
    count = len(first.body[0])
    if count != N_INSTANCES:
        rep.notes.append(f"GetManagedObjects returned {count} objects, expected {N_INSTANCES}")
    peer_call = echo_u("Managed", count)
    peer_first = await call(bus, peer_call)
    mgd, peer, lst, ech = await interleaved(
        bus, [managed_objects, peer_call, list_instances, echo], calls, warmup
    )
    ratio = statistics.median(mgd) / statistics.median(peer)
    rep.add(
        f"GetManagedObjects median ({N_INSTANCES} inst, n={len(mgd)})",
        f"{median_ms(mgd):.3f} ms",
        f"peer {median_ms(peer):.3f} ms (<= {MANAGED_RATIO_TARGET:g}x)",
        f"{ratio:.2f}x",
        verdict(ratio <= MANAGED_RATIO_TARGET),
    )
    rep.add(
        "GetManagedObjects p90",
        f"{p90_ms(mgd):.3f} ms",
        f"peer {p90_ms(peer):.3f} ms",
        f"{p90_ms(mgd) / p90_ms(peer):.2f}x",
    )
    rep.add(
        "  reply sizes",
        f"{reply_size(first)} B",
        f"peer {reply_size(peer_first)} B",
        f"{reply_size(first) / reply_size(peer_first):.2f}x",
    )
    rep.add(
        "  of which the client decodes the reply",
        f"{unmarshal_us(first) / 1000:.3f} ms",
        "(dbus-fast, in process)",
    )
    rep.add(
        f"ListInstances median ({N_INSTANCES} inst)",
        f"{median_ms(lst):.3f} ms",
        f"echo {median_ms(ech):.3f} ms",
        f"{statistics.median(lst) / statistics.median(ech):.2f}x",
    )


async def bench_signals(s: Setup, rep: Report, n: int) -> None:
    """An instance's State change → PropertiesChanged received by another process."""
    # The daemon's own layers, in this process, on a connection of their own.
    sys.path.insert(0, str(ROOT))
    from spectrumd.bus.auth import CallerCheck
    from spectrumd.bus.connection import SpectrumBus
    from spectrumd.bus.grants import GrantsBus
    from spectrumd.bus.manager import ManagerInterface
    from spectrumd.bus.names import instance_path
    from spectrumd.errors import Failed
    from spectrumd.supervisor import Environment, Instance, Supervisor
    from spectrumd.supervisor.grants import GrantService
    from spectrumd.supervisor.requests import RequestBroker

    async def no_exports(name: str, exports: Any) -> None:
        return None

    # The daemon logs each failed start (and the unconfined VMM it would have run):
    # to a file, as its stderr would, so that the cost stays in the measurement.
    logger = logging.getLogger("spectrumd")
    handler = logging.FileHandler(s.state_dir.with_name("signals-bench.log"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # No guest: every start fails at once, a real stopped/failed → starting → failed.
    env = Environment(
        state_dir=s.state_dir.with_name("state-signals"),
        guest_dir=s.state_dir.with_name("no-guest"),
    )
    sup = Supervisor(s.config_path, env)
    bus = await SpectrumBus(bus_address=s.address).connect()
    grants = GrantService(env.state_dir, sup.instances, lambda: sup.config.resources, no_exports)
    auth = CallerCheck(bus)
    manager = ManagerInterface(bus, sup, auth, GrantsBus(bus, grants, RequestBroker(grants), auth))
    manager.export_all()
    inst = sup.get("i000")
    changes: list[tuple[str, int]] = []

    def stamp(changed_inst: Instance, changed: frozenset[str]) -> None:
        if "state" in changed:
            changes.append((changed_inst.state.value, time.time_ns()))

    # First: the moment of the change, before the supervisor's listener (and the
    # bus layer behind it) does its work.
    inst.listeners.insert(0, stamp)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SIGNAL_CLIENT),
        s.address,
        bus.unique_name or "",
        instance_path(inst.name),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    got: list[int] = []
    try:
        assert client.stdout is not None and client.stdin is not None
        if (await client.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the signal client did not start")
        for _ in range((n + 1) // 2):
            try:
                await inst.start()
            except Failed:
                pass
            else:
                raise RuntimeError("the bench instance started; it should fail at once")
            await asyncio.sleep(0.004)  # one start at a time: latency, not throughput
        async with asyncio.timeout(10):
            for state, sent in changes:
                stamp_ns, received = (await client.stdout.readline()).decode().split(" ", 1)
                if received.strip() != state:
                    raise RuntimeError(f"PropertiesChanged out of order: {received!r}, {state!r}")
                got.append(int(stamp_ns) - sent)
    finally:
        if client.stdin is not None:
            client.stdin.close()
        await client.wait()
        bus.disconnect()
        logger.removeHandler(handler)
        handler.close()
    if {state for state, _t in changes} != {"starting", "failed"}:
        raise RuntimeError(f"unexpected states: {sorted({state for state, _t in changes})}")
    med = median_ms(got)
    rep.add(
        f"State change to PropertiesChanged median (n={len(got)})",
        f"{med:.3f} ms",
        f"<= {SIGNAL_TARGET_MS:g} ms",
        f"{med / SIGNAL_TARGET_MS:.2f}",
        verdict(med <= SIGNAL_TARGET_MS),
    )
    rep.add("State change to PropertiesChanged p90", f"{p90_ms(got):.3f} ms")
    for which in ("starting", "failed"):
        mine = [ns for (state, _t), ns in zip(changes, got, strict=True) if state == which]
        rep.add(f"  to {which}: median, p90", f"{median_ms(mine):.3f} ms", f"{p90_ms(mine):.3f} ms")


async def bench_rss(s: Setup, rep: Report) -> None:
    await asyncio.sleep(1.0)
    rss = status_kib(s.daemon.pid, "VmRSS") / 1024
    hwm = status_kib(s.daemon.pid, "VmHWM") / 1024
    rep.add(
        f"spectrumd idle RSS ({N_INSTANCES} inst)",
        f"{rss:.1f} MiB",
        f"<= {RSS_TARGET_MIB:g} MiB",
        f"{rss / RSS_TARGET_MIB:.2f}",
        verdict(rss <= RSS_TARGET_MIB),
    )
    rep.add("spectrumd peak RSS so far (VmHWM)", f"{hwm:.1f} MiB")


async def bench_start(bus: MessageBus, s: Setup, rep: Report, runs: int) -> None:
    metric = "StartInstance overhead to VMM exec"
    missing = [f for f in ("vmlinuz", "initramfs.img") if not (s.guest_dir / f).is_file()]
    if missing or not s.shim_ok:
        why = (
            f"no {', '.join(missing)} in {s.guest_dir}: run `make guest`"
            if missing
            else f"{QEMU} not found"
        )
        rep.add(metric, "skipped", f"<= {START_OVERHEAD_TARGET_MS:g} ms", "-", "SKIP")
        rep.notes.append(f"start overhead not measured: {why}")
        return

    name = "i000"
    path = str((await call(bus, lambda: manager_msg("GetInstance", "s", [name]))).body[0])

    def kill_msg() -> Message:
        return Message(destination=BUS_NAME, path=path, interface=INSTANCE_IFACE, member="Kill")

    raw: list[int] = []
    replies: list[int] = []
    shim_cost: list[int] = []
    for i in range(runs + 1):  # the first run is a warm-up
        t0 = time.time_ns()
        try:
            await call(bus, lambda: manager_msg("StartInstance", "s", [name]))
        except CallFailed as e:
            rep.add(metric, "error", f"<= {START_OVERHEAD_TARGET_MS:g} ms", "-", "FAIL")
            rep.notes.append(f"StartInstance failed: {e}")
            return
        t1 = time.time_ns()
        stamps = exec_stamps(s.state_dir / "run" / name / "vmm.log")
        try:
            await call(bus, kill_msg)
        except CallFailed as e:
            rep.add(metric, "error", f"<= {START_OVERHEAD_TARGET_MS:g} ms", "-", "FAIL")
            rep.notes.append(f"Instance.Kill failed: {e}")
            return
        if len(stamps) != 1:
            raise RuntimeError(f"the shim recorded {len(stamps)} execs for one start")
        if i > 0:
            raw.append(stamps[-1] - t0)
            replies.append(t1 - t0)
        # The shim alone, under the same load, right after each start.
        for _ in range(2):
            shim_cost.append(await asyncio.to_thread(probe_shim_cost, s.probe, s.probe_stamps))

    shim = statistics.median(shim_cost)
    corrected = [r - shim for r in raw]
    med = statistics.median(corrected) / 1e6
    rep.add(
        f"{metric} (n={len(raw)}, shim cost removed)",
        f"{med:.2f} ms",
        f"<= {START_OVERHEAD_TARGET_MS:g} ms",
        f"{med / START_OVERHEAD_TARGET_MS:.2f}",
        verdict(med <= START_OVERHEAD_TARGET_MS),
    )
    rep.add(
        "  raw (call -> shim stamp), median / p90",
        f"{median_ms(raw):.2f} ms",
        f"p90 {p90_ms(raw):.2f} ms",
    )
    rep.add(
        f"  shim cost alone (spawn+shell+clock, n={len(shim_cost)})",
        f"{shim / 1e6:.2f} ms",
        f"min {min(shim_cost) / 1e6:.2f} ms",
    )
    rep.add(
        "StartInstance full reply (QMP attached), median",
        f"{median_ms(replies):.1f} ms",
        f"p90 {p90_ms(replies):.1f} ms",
    )


async def measure(s: Setup, args: argparse.Namespace) -> Report:
    rep = Report()
    bus = await MessageBus(bus_address=s.address).connect()
    try:
        await wait_ready(bus, s)
        steps: list[tuple[str, str, Callable[[], Awaitable[None]]]] = [
            (
                "managed",
                f"GetManagedObjects vs a bare service, {args.calls} calls each",
                lambda: bench_managed(bus, rep, args.calls, args.warmup),
            ),
            (
                "signals",
                f"State change to PropertiesChanged, {args.signals} changes",
                lambda: bench_signals(s, rep, args.signals),
            ),
            ("rss", "idle RSS", lambda: bench_rss(s, rep)),
            (
                "start",
                f"StartInstance + Kill, {args.starts} runs",
                lambda: bench_start(bus, s, rep, args.starts),
            ),
        ]
        for name, what, step in steps:
            if args.only and name not in args.only:
                continue
            print(f"bench: {what} ...", flush=True)
            try:
                await step()
            except (CallFailed, RuntimeError, OSError) as e:
                rep.add(what, "error", "-", "-", "FAIL")
                rep.notes.append(f"{what}: {e}")
    finally:
        bus.disconnect()
    return rep


def run(args: argparse.Namespace) -> Report:
    guest_dir = Path(os.environ.get("SPECTRUMD_GUEST_DIR", "/var/cache/spectrumd/guest"))
    workdir = Path(tempfile.mkdtemp(prefix="spb.", dir="/tmp"))
    state_dir = workdir / "state"
    try:
        config_path = workdir / "config.json"
        config_path.write_text(json.dumps(config(N_INSTANCES)))

        real_qemu = shutil.which(QEMU)
        shim_dir = workdir / "shim"
        shim_dir.mkdir(mode=0o755)
        # A VMM (its own uid) reaches the shim, as it would /usr/bin.
        workdir.chmod(0o711)
        stamp_file = workdir / "exec-stamps"
        probe = workdir / "probe"
        probe_stamps = workdir / "probe-stamps"
        if real_qemu is not None:
            # A confined VMM writes only to what it inherits: the stamp goes to stderr.
            write_shim(shim_dir / QEMU, None, real_qemu)
            write_shim(probe, probe_stamps, "/bin/true")
        env = dict(os.environ, PATH=f"{shim_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")

        with private_bus(workdir) as address:
            echo_argv = [sys.executable, str(ECHO_SERVICE), address]
            with child(echo_argv, "echo service", stdout=subprocess.PIPE) as echo_proc:
                assert echo_proc.stdout is not None
                if echo_proc.stdout.readline().strip() != "ready":
                    raise RuntimeError("the echo service did not start")

                daemon_log = workdir / "spectrumd.log"
                daemon_argv = [
                    sys.executable,
                    "-m",
                    "spectrumd",
                    "--bus",
                    address,
                    "--config",
                    str(config_path),
                    "--state-dir",
                    str(state_dir),
                    "--guest-dir",
                    str(guest_dir),
                ]
                with (
                    open(daemon_log, "w") as log,
                    child(daemon_argv, "spectrumd", stderr=log, env=env, cwd=ROOT) as daemon,
                ):
                    s = Setup(
                        address=address,
                        config_path=config_path,
                        daemon=daemon,
                        daemon_log=daemon_log,
                        state_dir=state_dir,
                        guest_dir=guest_dir,
                        stamp_file=stamp_file,
                        probe=probe,
                        probe_stamps=probe_stamps,
                        shim_ok=real_qemu is not None,
                    )
                    rep = asyncio.run(measure(s, args))
                    if daemon.poll() is not None:
                        rep.notes.append(f"spectrumd exited early (status {daemon.returncode})")
                errors = [
                    line
                    for line in daemon_log.read_text(errors="replace").splitlines()
                    if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line
                ]
                if errors:
                    rep.notes.append(f"spectrumd logged {len(errors)} error lines, first:")
                    rep.notes.extend(errors[:3])
        return rep
    finally:
        kill_our_vmms(state_dir)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="timed calls per method")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls per method first")
    p.add_argument("--starts", type=int, default=15, help="timed StartInstance runs")
    p.add_argument("--signals", type=int, default=300, help="timed state changes")
    p.add_argument(
        "--only",
        action="append",
        choices=["managed", "signals", "rss", "start"],
        help="run just this bench (repeatable; default: all)",
    )
    args = p.parse_args()
    t0 = time.monotonic()
    try:
        rep = run(args)
    except (RuntimeError, OSError, CallFailed) as e:
        print(f"bench: could not run: {e}", file=sys.stderr)
        return 1
    rep.print()
    print(f"\n(total {time.monotonic() - t0:.0f} s; exit status 0 whatever the verdicts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
