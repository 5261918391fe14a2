"""spectrumd start/kill cycles: ``.venv/bin/python bench/cycles_bench.py [--cycles N]``.

Starts its own private dbus-daemon and spectrumd with one QEMU instance (TCG, no
boot needed: StartInstance replies once the VMM runs and QMP answers), then runs
``--warmup`` StartInstance/Instance.Kill cycles, reads the daemon's VmRSS, open
descriptors and threads, runs ``--cycles`` more (timed), and reads them again.

Verdict "no growth beyond noise": RSS growth <= 2 MiB and descriptor growth <= 2.
Prints a table and exits 0 whatever the verdict (it is a measurement); exits 1
only when the benchmark itself could not run. Everything started here is ended by
pid on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import CallFailed, checked_call, child, kill_our_vmms, private_bus, status_kib
from dbus_fast import Message
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parent.parent
BUS_NAME = "org.spectrum_os.Spectrum1"
MANAGER_PATH = "/org/spectrum_os/Spectrum1"
MANAGER_IFACE = "org.spectrum_os.Spectrum1.Manager"
INSTANCE_IFACE = "org.spectrum_os.Spectrum1.Instance"
INSTANCE = "cycle"
RSS_NOISE_MIB = 2.0
FD_NOISE = 2


def config() -> dict[str, Any]:
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg"},
        "applications": {"app": {"command": "exec sleep 600", "memory_mib": 64}},
        "instances": {INSTANCE: {"application": "app"}},
    }


def sample(pid: int) -> dict[str, float]:
    return {
        "rss": status_kib(pid, "VmRSS") / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "children": len(children_of(pid)),
    }


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


async def call(bus: MessageBus, path: str, iface: str, member: str, *args: str) -> Message:
    return await checked_call(
        bus,
        Message(
            destination=BUS_NAME,
            path=path,
            interface=iface,
            member=member,
            signature="s" * len(args),
            body=list(args),
        ),
        member,
    )


async def wait_ready(bus: MessageBus, daemon: subprocess.Popen[str], log: Path) -> None:
    """Until spectrumd answers; RuntimeError with the end of its log if it does not."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await call(bus, MANAGER_PATH, MANAGER_IFACE, "ListInstances")
            return
        except CallFailed:
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = await asyncio.to_thread(log.read_text)
                raise RuntimeError("spectrumd did not come up:\n" + tail[-3000:]) from None
            await asyncio.sleep(0.05)


async def cycles(bus: MessageBus, path: str, n: int, starts: list[int], kills: list[int]) -> None:
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await call(bus, MANAGER_PATH, MANAGER_IFACE, "StartInstance", INSTANCE)
        t1 = time.perf_counter_ns()
        await call(bus, path, INSTANCE_IFACE, "Kill")
        t2 = time.perf_counter_ns()
        starts.append(t1 - t0)
        kills.append(t2 - t1)


async def measure(
    address: str, daemon: subprocess.Popen[str], log: Path, args: argparse.Namespace
) -> dict[str, Any]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        await wait_ready(bus, daemon, log)
        path = str((await call(bus, MANAGER_PATH, MANAGER_IFACE, "GetInstance", INSTANCE)).body[0])
        print(f"bench: {args.warmup} warm-up cycles ...", flush=True)
        await cycles(bus, path, args.warmup, [], [])
        await asyncio.sleep(1.0)
        before = sample(daemon.pid)
        print(f"bench: {args.cycles} timed cycles ...", flush=True)
        starts: list[int] = []
        kills: list[int] = []
        t0 = time.monotonic()
        await cycles(bus, path, args.cycles, starts, kills)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.0)
        after = sample(daemon.pid)
        props = await bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface="org.freedesktop.DBus.Properties",
                member="GetAll",
                signature="s",
                body=[INSTANCE_IFACE],
            )
        )
        assert props is not None
        final = {k: v.value for k, v in props.body[0].items()} if props.body else {}
    finally:
        bus.disconnect()
    return {
        "before": before,
        "after": after,
        "elapsed": elapsed,
        "starts": starts,
        "kills": kills,
        "final": final,
    }


def fmt_ms(ns: list[int]) -> str:
    q = statistics.quantiles(ns, n=10, method="inclusive")
    return f"median {statistics.median(ns) / 1e6:.1f} ms, p90 {q[-1] / 1e6:.1f} ms"


def report(r: dict[str, Any], args: argparse.Namespace, leftovers: list[str]) -> None:
    b, a = r["before"], r["after"]
    rss_growth = a["rss"] - b["rss"]
    fd_growth = a["fds"] - b["fds"]
    ok_rss = rss_growth <= RSS_NOISE_MIB
    ok_fds = fd_growth <= FD_NOISE
    rows = [
        ("metric", "before", "after", "growth", "verdict"),
        (
            "daemon VmRSS",
            f"{b['rss']:.1f} MiB",
            f"{a['rss']:.1f} MiB",
            f"{rss_growth:+.2f} MiB",
            "no growth beyond noise" if ok_rss else f"GROWTH (> {RSS_NOISE_MIB:g} MiB)",
        ),
        (
            "daemon open descriptors",
            str(b["fds"]),
            str(a["fds"]),
            f"{fd_growth:+d}",
            "no growth beyond noise" if ok_fds else f"GROWTH (> {FD_NOISE})",
        ),
        (
            "daemon threads",
            str(b["threads"]),
            str(a["threads"]),
            f"{a['threads'] - b['threads']:+d}",
            "info",
        ),
        (
            "daemon children",
            str(b["children"]),
            str(a["children"]),
            f"{a['children'] - b['children']:+d}",
            "info (VMMs and their file servers; 0 once all stopped)",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    n = len(r["starts"])
    print()
    print(f"cycles: {n} (after {args.warmup} warm-up) in {r['elapsed']:.1f} s")
    print(f"cycles per second: {n / r['elapsed']:.2f}")
    print(f"StartInstance: {fmt_ms(r['starts'])}")
    print(f"Instance.Kill: {fmt_ms(r['kills'])}")
    final = r["final"]
    print(
        f"instance at the end: {final.get('State')} ({final.get('StateReason')}), "
        f"MainPID {final.get('MainPID')}"
    )
    for line in leftovers:
        print(f"note: {line}")
    verdict = "no growth beyond noise" if ok_rss and ok_fds else "GROWTH"
    print(f"\nverdict: {verdict}")


def run(args: argparse.Namespace) -> None:
    guest_dir = Path(os.environ.get("SPECTRUMD_GUEST_DIR", "/var/cache/spectrumd/guest"))
    missing = [f for f in ("vmlinuz", "initramfs.img") if not (guest_dir / f).is_file()]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} in {guest_dir}: run `make guest`")
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 not found")
    workdir = Path(tempfile.mkdtemp(prefix="spc.", dir="/tmp"))
    state_dir = workdir / "state"
    try:
        config_path = workdir / "config.json"
        config_path.write_text(json.dumps(config()))
        with private_bus(workdir) as address:
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
                child(daemon_argv, "spectrumd", stderr=log, cwd=ROOT) as daemon,
            ):
                r = asyncio.run(measure(address, daemon, daemon_log, args))
                leftovers = []
                marker = os.fsencode(state_dir)
                for pid in children_of(daemon.pid):
                    with contextlib.suppress(OSError):
                        if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                            leftovers.append(f"a VMM (pid {pid}) still runs after the last Kill")
                if daemon.poll() is not None:
                    leftovers.append(f"spectrumd exited early (status {daemon.returncode})")
            errors = [
                line
                for line in daemon_log.read_text(errors="replace").splitlines()
                if line.startswith(("ERROR spectrumd.bus", "ERROR asyncio", "CRITICAL"))
            ]
            if errors:
                leftovers.append(
                    f"spectrumd logged {len(errors)} internal errors, first: {errors[0]}"
                )
        report(r, args, leftovers)
    finally:
        kill_our_vmms(state_dir)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=1000, help="timed start/kill cycles")
    p.add_argument("--warmup", type=int, default=50, help="untimed cycles first")
    args = p.parse_args()
    if args.cycles < 10 or args.warmup < 0:
        p.error("--cycles must be at least 10 and --warmup at least 0")
    t0 = time.monotonic()
    try:
        run(args)
    except (RuntimeError, OSError, CallFailed) as e:
        print(f"bench: could not run: {e}", file=sys.stderr)
        return 1
    print(f"(total {time.monotonic() - t0:.0f} s; exit status 0 whatever the verdict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
