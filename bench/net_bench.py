"""Network setup benchmark: ``.venv/bin/python bench/net_bench.py`` (as root).

Creates its own network namespace (``spt-bench-XXXXXX``, deleted on the way
out) and runs spectrumd's NetworkService in it, as the daemon does for
``--netns``, without any VM: the time of ``prepare`` (bridges and taps for
one instance) with 1 and with 4 networks, first with the bridges to be made
and then with them in place (a second instance on the same networks), and
of the teardown. A probe task on the event loop sleeps 1 ms at a time and
records how late it wakes up: the longest overshoot while the operation runs
is the loop's stall. Target: at most 5 ms.

Prints a table; exits 0 whether or not the target is met, 1 if it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spectrumd.host.network import HostNetworks  # noqa: E402
from spectrumd.model.types import (  # noqa: E402
    Accel,
    Application,
    InstanceDef,
    NetworkResource,
    VmmKind,
)
from spectrumd.supervisor.networks import NetworkService  # noqa: E402
from spectrumd.supervisor.resources import RunContext  # noqa: E402

STALL_TARGET_MS = 5.0


class LagProbe:
    """Sleeps 1 ms in a loop; ``worst`` is the longest overshoot since ``reset``."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t - 0.001)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def reset(self) -> None:
        self.worst = 0.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def context(name: str, networks: list[NetworkResource], run_dir: Path) -> RunContext:
    app = Application(name="app", command="true")
    definition = InstanceDef(
        name=name,
        application="app",
        resources=tuple(n.name for n in networks),
        vmm=VmmKind.qemu,
        accel=Accel.tcg,
        stop_timeout=1,
    )
    return RunContext(
        name=name,
        definition=definition,
        application=app,
        resources=tuple(networks),
        run_dir=run_dir,
        stack=contextlib.AsyncExitStack(),
        log=logging.getLogger(name),
    )


def cpu_wait() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


@dataclass
class Sample:
    took: float  # seconds
    stall: float  # the loop's longest late wake-up
    waited: float  # of which the loop's thread waited for a CPU (another process ran)


async def timed(probe: LagProbe, op: Callable[[], Awaitable[object]]) -> Sample:
    await asyncio.sleep(0.005)  # let the probe settle
    probe.reset()
    w0 = cpu_wait()
    t0 = time.perf_counter()
    await op()
    took = time.perf_counter() - t0
    await asyncio.sleep(0.002)  # a stall at the very end shows on the next wake-up
    return Sample(took, probe.worst, cpu_wait() - w0)


async def bench(netns: str, rounds: int, run_dir: Path) -> dict[str, list[Sample]]:
    driver = NetworkService(HostNetworks(netns=netns))
    await driver.host.start()
    # As the daemon does once it is up: a full collection then scans only
    # what was allocated since, not every object of the startup.
    gc.freeze()
    probe = LagProbe()
    probe.start()
    rows: dict[str, list[Sample]] = {}
    try:
        for n in (1, 4):
            nets = [NetworkResource(name=f"net{i}", host_address=None) for i in range(n)]
            label = f"{n} network{'s' * (n > 1)}"
            fresh = rows.setdefault(f"{label}, new bridges", [])
            shared = rows.setdefault(f"{label}, bridges exist", [])
            down = rows.setdefault(f"{label}, teardown of both", [])
            for _ in range(rounds):
                first = context("first", nets, run_dir)
                second = context("second", nets, run_dir)
                # The first instance makes the bridges, the second finds them.
                fresh.append(await timed(probe, functools.partial(driver.prepare, first)))
                shared.append(await timed(probe, functools.partial(driver.prepare, second)))
                assert len(first.nets) == n and len(second.nets) == n
                a = await timed(probe, second.stack.aclose)
                b = await timed(probe, first.stack.aclose)
                down.append(Sample(a.took + b.took, max(a.stall, b.stall), a.waited + b.waited))
        idle = rows.setdefault("idle loop (probe baseline)", [])
        for _ in range(rounds):
            idle.append(await timed(probe, functools.partial(asyncio.sleep, 0.01)))
    finally:
        await probe.stop()
        await driver.host.close()
    return rows


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]


def table(rows: dict[str, list[Sample]]) -> None:
    print(
        f"{'case':32} {'median':>7} {'p90':>7} {'stall':>7} {'stall':>7} "
        f"{'stall':>7} {'cpu':>7} {'ours':>7}"
    )
    print(f"{'':32} {'':>7} {'':>7} {'median':>7} {'p90':>7} {'max':>7} {'wait':>7} {'max':>7}")
    for name, samples in rows.items():
        times = [x.took for x in samples]
        stalls = [x.stall for x in samples]
        worst = max(samples, key=lambda x: x.stall)
        # A stall longer than the time the loop's thread waited for a CPU
        # (other processes on the machine) is spectrumd's own.
        ours = max(max(0.0, x.stall - x.waited) for x in samples)
        verdict = "ok" if ours * 1000 <= STALL_TARGET_MS else "MISSED"
        print(
            f"{name:32} {ms(statistics.median(times)):>7} {ms(p90(times)):>7} "
            f"{ms(statistics.median(stalls)):>7} {ms(p90(stalls)):>7} {ms(worst.stall):>7} "
            f"{ms(worst.waited):>7} {ms(ours):>7} {verdict}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    netns = f"spt-bench-{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"net_bench: cannot create a network namespace (root needed): {e}", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="spt-bench.") as tmp:
            rows = asyncio.run(bench(netns, args.rounds, Path(tmp)))
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    print(f"network setup in a namespace, {args.rounds} rounds each; times in ms")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"stall target: {STALL_TARGET_MS:g} ms ('ours': stall minus the loop thread's CPU wait)")
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
