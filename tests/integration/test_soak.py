"""Soak: many concurrent callers randomly driving 20 real QEMU instances, then invariants.

Eight callers, each on its own bus connection, call StartInstance, StopInstance,
Instance.Kill, Pause and Resume at random for a bounded time and count. Every
reply must be a success or a documented, explainable error. Afterwards the daemon
must tell the truth (State against MainPID against /proc), run exactly one QEMU per
running instance, and once everything is killed hold no QEMU, run directory, tap,
descriptor or child process more than it did before the soak.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrumd.bus.names import INSTANCE_IFACE, instance_path
from spectrumd.cli.client import CallError, Client, connect
from spectrumd.host import names
from tests.conftest import Daemon, proc_state
from tests.integration.helpers import file_servers, props, short, vmm_list, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

N_INSTANCES = 20
CALLERS = 8
DURATION = 45.0  # seconds of random calls
MAX_CALLS_PER_CALLER = 400  # and a bound on their number
CALL_DEADLINE = 60.0  # no single call may take longer than this (a hang is a failure)
CONTROL_TIMEOUT = 10.0  # the daemon's bound on one QMP control call (Environment)
STOP_TIMEOUT = 2  # seconds the power button gets before SIGTERM
FD_NOISE = 3
SEED = int(os.environ.get("SOAK_SEED", "0")) or random.randrange(1 << 30)

STATE_RE = re.compile(r"it is (stopped|starting|running|paused|stopping|failed)\b")


def soak_config() -> dict[str, Any]:
    # Even-numbered instances hold a network, so taps are made and removed too.
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": STOP_TIMEOUT},
        "applications": {"app": {"command": "exec sleep 600", "memory_mib": 64}},
        "resources": {"lan": {"type": "network"}},
        "instances": {
            f"s{k:02d}": {"application": "app", "resources": ["lan"] if k % 2 == 0 else []}
            for k in range(N_INSTANCES)
        },
    }


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"spt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


# -- what the host shows ---------------------------------------------------------


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def qemus_of(state_dir: Path) -> dict[int, str]:
    """Every VMM on the host that the daemon of ``state_dir`` started: pid → instance."""
    return {pid: name for name, pid in vmm_list(state_dir)}


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def taps(ns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {
        link["ifname"]
        for link in json.loads(out)
        if link["ifname"].startswith(names.TAP_PREFIX)
        and names.OWNED_NAME.fullmatch(link["ifname"])
    }


# -- the callers -----------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.ok: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self.bad: list[str] = []
        self.calls = 0


async def one_call(c: Client, method: str, name: str) -> None:
    if method in ("StartInstance", "StopInstance"):
        await c.manager(method, "s", name)
    else:
        await c.call(instance_path(name), INSTANCE_IFACE, method)


def acceptable(method: str, e: CallError, took: float) -> bool:
    """The errors a racing caller may see, each documented in the README.

    - InvalidState: the call is not possible in the state another caller left;
      the message names that state.
    - Cancelled: a StartInstance that another caller's Kill interrupted.
    - Timeout: only when the control call genuinely waited the daemon's whole
      control timeout (20 TCG guests on a small host can be slow to answer QMP).
    Everything else (Failed, org.freedesktop.DBus.Error.*) is a failure.
    """
    kind = short(e.name)
    if kind == "InvalidState":
        return STATE_RE.search(e.message) is not None
    if kind == "Cancelled":
        return method == "StartInstance"
    if kind == "Timeout":
        return method in ("Pause", "Resume", "StartInstance") and took >= CONTROL_TIMEOUT - 0.5
    return False


async def caller(address: str, rnd: random.Random, deadline: float, tally: Tally) -> None:
    bus = await connect(address)
    c = Client(bus)
    methods = ["StartInstance", "Kill", "StopInstance", "Pause", "Resume"]
    weights = [35, 20, 10, 15, 20]
    try:
        for _ in range(MAX_CALLS_PER_CALLER):
            if time.monotonic() >= deadline:
                break
            method = rnd.choices(methods, weights)[0]
            name = f"s{rnd.randrange(N_INSTANCES):02d}"
            tally.calls += 1
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(one_call(c, method, name), CALL_DEADLINE)
            except CallError as e:
                took = time.monotonic() - t0
                tally.errors[(method, short(e.name))] += 1
                if not acceptable(method, e, took):
                    tally.bad.append(f"{method}({name}) after {took:.1f}s: {e.name}: {e.message}")
            except TimeoutError:
                tally.bad.append(f"{method}({name}): no reply within {CALL_DEADLINE:g}s")
            else:
                tally.ok[method] += 1
            await asyncio.sleep(rnd.uniform(0, 0.05))
    finally:
        bus.disconnect()


async def monitor(d: Daemon, deadline: float, seen: list[str]) -> int:
    """While the callers run: never two QEMUs for one instance at any moment.
    Returns the number of samples taken."""
    samples = 0
    while time.monotonic() < deadline:
        per_instance = collections.Counter(qemus_of(d.state_dir.absolute()).values())
        seen.extend(f"{n}: {k} QEMUs at once" for n, k in per_instance.items() if k > 1)
        samples += 1
        await asyncio.sleep(0.25)
    return samples


# -- the invariants --------------------------------------------------------------


async def snapshot(c: Client) -> dict[str, dict[str, Any]]:
    return {f"s{k:02d}": await props(c, f"s{k:02d}") for k in range(N_INSTANCES)}


def check_consistent(d: Daemon, snap: dict[str, dict[str, Any]], ns: str) -> list[str]:
    """State against MainPID against /proc, one QEMU per running instance, taps."""
    problems = []
    qemus = qemus_of(d.state_dir.absolute())
    live_taps = taps(ns)
    for name, p in snap.items():
        state, pid = p["State"], p["MainPID"]
        mine = [q for q, owner in qemus.items() if owner == name]
        tap = names.tap_name(name, "lan")
        has_lan = int(name[1:]) % 2 == 0
        if state in ("running", "paused", "stopping"):
            if pid == 0:
                problems.append(f"{name} is {state} with MainPID 0")
            elif proc_state(pid) in ("", "Z"):
                problems.append(f"{name} is {state} but its MainPID {pid} is not alive")
            elif qemus.get(pid) != name:
                problems.append(f"{name}: MainPID {pid} is not a VMM of this instance")
            if mine != [pid]:
                problems.append(f"{name} is {state} with MainPID {pid} but QEMUs {mine}")
            if has_lan and tap not in live_taps:
                problems.append(f"{name} is {state} without its tap {tap}")
        elif state in ("stopped", "failed"):
            if pid != 0:
                problems.append(f"{name} is {state} with MainPID {pid}")
            if p["StartedAt"] != 0:
                problems.append(f"{name} is {state} with StartedAt {p['StartedAt']}")
            if mine:
                problems.append(f"{name} is {state} but QEMUs {mine} run for it")
            if (d.state_dir / "run" / name).exists():
                problems.append(f"{name} is {state} but its run directory is left")
            if has_lan and tap in live_taps:
                problems.append(f"{name} is {state} but its tap {tap} is left")
        else:
            problems.append(f"{name} is {state} although no call is in flight")
    expected = {p["MainPID"] for p in snap.values() if p["MainPID"]}
    if set(qemus) != expected:
        problems.append(f"QEMUs with our state dir {sorted(qemus)} != MainPIDs {sorted(expected)}")
    return problems


def stray_children(d: Daemon, vmms: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """Children of the daemon other than the processes in ``vmms`` (VMMs, file servers)."""
    assert d.proc is not None
    out = []
    for pid in sorted(children_of(d.proc.pid)):
        line = cmdline(pid).replace(b"\0", b" ").decode(errors="replace")
        alive = proc_state(pid) not in ("", "Z")
        if alive and pid in vmms:
            continue
        out.append(f"{pid} [{proc_state(pid)}] {line[:160]}")
    return out


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return out


async def test_soak_random_concurrent_callers(daemon: Daemon, netns: str) -> None:
    c = await daemon.start(soak_config(), extra_args=["--netns", netns])
    assert daemon.proc is not None
    pid = daemon.proc.pid

    # Warm up once per kind of instance (with and without a network), so that
    # what the daemon opens on first use is in the baseline.
    for name in ("s00", "s01"):
        await c.manager("StartInstance", "s", name)
        await c.instance_call(name, "Kill")
    await asyncio.sleep(0.5)
    fds_before = fd_count(pid)
    assert stray_children(daemon) == []

    print(f"soak seed {SEED} (set SOAK_SEED to repeat)")
    master = random.Random(SEED)
    deadline = time.monotonic() + DURATION
    tallies = [Tally() for _ in range(CALLERS)]
    violations: list[str] = []
    watch = asyncio.ensure_future(monitor(daemon, deadline, violations))
    await asyncio.gather(
        *(
            caller(daemon.address, random.Random(master.getrandbits(32)), deadline, t)
            for t in tallies
        )
    )
    samples = await watch
    assert samples > 20 and violations == [], violations[:10]
    ok: collections.Counter[str] = sum((t.ok for t in tallies), collections.Counter())
    errors: collections.Counter[tuple[str, str]] = sum(
        (t.errors for t in tallies), collections.Counter()
    )
    bad = [b for t in tallies for b in t.bad]
    print(f"calls {sum(t.calls for t in tallies)}; succeeded {dict(ok)}; errors {dict(errors)}")
    assert bad == [], f"{len(bad)} unacceptable replies, first ones:\n" + "\n".join(bad[:15])
    # The soak did real work: every kind of call succeeded often enough.
    for method, least in [
        ("StartInstance", 40),
        ("Kill", 15),
        ("StopInstance", 3),
        ("Pause", 10),
        ("Resume", 3),
    ]:
        assert ok[method] >= least, f"only {ok[method]} successful {method} calls: {dict(ok)}"

    # Quiet now: no call is in flight, so every instance is in a settled state.
    snap = await snapshot(c)
    (rows,) = await c.manager("ListInstances")
    listed = {n: s for n, _app, s, _path in rows}
    assert listed == {n: p["State"] for n, p in snap.items()}, "ListInstances disagrees"
    problems = check_consistent(daemon, snap, netns)
    assert problems == [], "\n".join(problems)
    running = sorted(n for n, p in snap.items() if p["State"] in ("running", "paused"))
    print(f"after the soak: {len(running)} running or paused: {running}")
    vmms = {p["MainPID"] for p in snap.values() if p["MainPID"]}
    # One file server per running instance, and none for any other.
    servers = file_servers(daemon.state_dir)
    assert sorted(servers) == running, servers
    assert stray_children(daemon, vmms | set(servers.values())) == []

    # Kill everything that runs; then nothing may be left.
    results = await asyncio.gather(
        *(c.instance_call(n, "Kill") for n in running), return_exceptions=True
    )
    assert [r for r in results if r is not None] == []
    for k in range(N_INSTANCES):
        await wait_for(c, f"s{k:02d}", lambda p: p["State"] in ("stopped", "failed"), timeout=20)
    snap = await snapshot(c)
    problems = check_consistent(daemon, snap, netns)
    assert problems == [], "\n".join(problems)
    assert qemus_of(daemon.state_dir.absolute()) == {}
    run_dir = daemon.state_dir / "run"
    left = (
        sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else []
    )
    assert left == [], f"left in {run_dir}: {left}"
    assert taps(netns) == set()
    assert file_servers(daemon.state_dir) == {}
    assert stray_children(daemon) == []
    await asyncio.sleep(0.5)
    fds_after = fd_count(pid)
    print(f"daemon descriptors: {fds_before} before the soak, {fds_after} after")
    assert fds_after <= fds_before + FD_NOISE, (
        f"the daemon holds {fds_after} descriptors, {fds_before} before the soak; now:\n"
        + "\n".join(fd_targets(pid))
    )

    # The daemon logged no internal error (a bug reaching wire_errors, a failing
    # listener, an exception nobody retrieved).
    lines = daemon.stderr_path.read_text(errors="replace").splitlines()
    internal = [
        # The report and what follows it (the task, the traceback).
        "\n".join(lines[i : i + 12])
        for i, line in enumerate(lines)
        if line.startswith(("ERROR spectrumd.bus.errors", "ERROR asyncio", "CRITICAL"))
        or "change listener failed" in line
        or "exception was never retrieved" in line
    ]
    assert internal == [], "\n---\n".join(internal[:5])

    # spectrumctl tells the same truth.
    r = subprocess.run(
        [sys.executable, "-m", "spectrumd.cli", "--bus", daemon.address, "--json", "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert {e["name"]: e["state"] for e in json.loads(r.stdout)} == {
        n: p["State"] for n, p in snap.items()
    }
