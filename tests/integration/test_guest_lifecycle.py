"""The lifecycle on real QEMU guests (TCG), through the real D-Bus API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from spectrumd.bus.names import instance_path
from tests.conftest import Daemon
from tests.integration.helpers import (
    SignalRecorder,
    app_config,
    error_of,
    props,
    short,
    wait_for,
    wait_log,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TICKER = 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'


def ticks(path: Path) -> int:
    return path.read_text(errors="replace").count("tick ")


async def test_start_output_pause_resume_graceful_stop(daemon: Daemon) -> None:
    c = await daemon.start(app_config(TICKER))
    rec = await SignalRecorder().attach(c)
    await c.manager("StartInstance", "s", "one")
    p = await props(c, "one")
    assert p["State"] == "running"
    assert p["MainPID"] > 0 and p["StartedAt"] > 0
    log = Path(p["ConsoleLog"])
    await wait_for(c, "one", lambda p: p["GuestReady"])
    await wait_log(log, "tick 3")

    await c.instance_call("one", "Pause")
    assert (await props(c, "one"))["State"] == "paused"
    await asyncio.sleep(0.5)  # let output already in flight land
    before = ticks(log)
    await asyncio.sleep(2)
    assert ticks(log) == before, "a paused guest kept printing"

    await c.instance_call("one", "Resume")
    assert (await props(c, "one"))["State"] == "running"
    await wait_log(log, f"tick {before + 3}", timeout=30)

    t0 = time.monotonic()
    await c.manager("StopInstance", "s", "one")
    took = time.monotonic() - t0
    p = await props(c, "one")
    assert p["State"] == "stopped"
    assert "power button" in p["StateReason"], p["StateReason"]
    assert took < 15, f"graceful stop took {took:.1f}s"
    assert p["MainPID"] == 0 and not p["GuestReady"]
    assert rec.states(instance_path("one")) == [
        "starting",
        "running",
        "paused",
        "running",
        "stopping",
        "stopped",
    ]


async def test_application_output_and_exit(daemon: Daemon) -> None:
    c = await daemon.start(app_config("echo hello-from-the-guest; exit 3"))
    await c.manager("StartInstance", "s", "one")
    p = await wait_for(c, "one", lambda p: p["State"] in ("stopped", "failed"), timeout=90)
    assert p["State"] == "failed"
    assert p["StateReason"] == "application exited with status 3"
    assert "hello-from-the-guest" in Path(p["ConsoleLog"]).read_text(errors="replace")


async def test_kill_and_vmm_crash_give_reasons(daemon: Daemon) -> None:
    c = await daemon.start(app_config(TICKER))
    rec = await SignalRecorder().attach(c)
    await c.manager("StartInstance", "s", "one")
    await c.instance_call("one", "Kill")
    p = await props(c, "one")
    assert (p["State"], p["StateReason"], p["MainPID"]) == ("stopped", "killed", 0)

    # Start again, then kill the VMM behind spectrumd's back.
    await c.manager("StartInstance", "s", "one")
    pid = (await props(c, "one"))["MainPID"]
    os.kill(pid, signal.SIGKILL)
    p = await wait_for(c, "one", lambda p: p["State"] == "failed", timeout=20)
    assert p["StateReason"] == "vmm exited with signal 9 (SIGKILL)"
    await asyncio.sleep(0.2)
    assert rec.states(instance_path("one"))[-1] == "failed"

    # A failed instance can be started again.
    await c.manager("StartInstance", "s", "one")
    assert (await props(c, "one"))["State"] == "running"
    await c.instance_call("one", "Kill")


async def test_concurrent_starts_make_one_vmm(daemon: Daemon) -> None:
    c = await daemon.start(app_config(TICKER))
    results = await asyncio.gather(
        *(c.manager("StartInstance", "s", "one") for _ in range(3)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 2
    assert {short(e.name) for e in errors} == {"InvalidState"}  # type: ignore[attr-defined]
    assert "running" in str(errors[0])
    pid = (await props(c, "one"))["MainPID"]
    # Exactly one QEMU is our daemon's child (the other is the instance's file server).
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text()  # type: ignore[union-attr]
    qemus = [c for c in children.split() if Path(f"/proc/{c}/comm").read_text().startswith("qemu")]
    assert qemus == [str(pid)]
    e = await error_of(c.instance_call("one", "Resume"))
    assert short(e.name) == "InvalidState" and "running" in e.message
    await c.instance_call("one", "Kill")


async def test_stop_escalates_to_sigterm_then_sigkill(daemon: Daemon) -> None:
    cfg = app_config(TICKER)
    cfg["defaults"]["stop_timeout"] = 0  # no time for the power button: straight to SIGTERM
    c = await daemon.start(cfg)
    await c.manager("StartInstance", "s", "one")
    await c.manager("StopInstance", "s", "one")
    p = await props(c, "one")
    assert p["State"] == "stopped"
    assert p["StateReason"] == "vmm terminated with SIGTERM after the 0 s stop timeout"

    # A VMM that ignores even SIGTERM (here: stopped) is killed after 5 s.
    await c.manager("StartInstance", "s", "one")
    pid = (await props(c, "one"))["MainPID"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    await c.manager("StopInstance", "s", "one")
    p = await props(c, "one")
    assert p["State"] == "stopped"
    assert p["StateReason"].startswith("vmm killed with SIGKILL; SIGTERM did not end it")
    assert 4 < time.monotonic() - t0 < 15


async def test_spectrumctl_logs_and_watch(daemon: Daemon) -> None:
    c = await daemon.start(app_config("echo from-the-guest-console; exec sleep 600"))
    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spectrumd.cli",
        "--bus",
        daemon.address,
        "--json",
        "watch",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.5)  # let watch subscribe
        await c.manager("StartInstance", "s", "one")
        await wait_for(c, "one", lambda p: p["GuestReady"])
        await wait_log(Path((await props(c, "one"))["ConsoleLog"]), "from-the-guest-console")
        logs = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spectrumd.cli",
            "--bus",
            daemon.address,
            "logs",
            "one",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await logs.communicate()
        assert logs.returncode == 0
        assert b"from-the-guest-console" in out
        await c.instance_call("one", "Kill")
        seen = []
        assert watch.stdout is not None
        while "stopped" not in [e.get("state") for e in seen]:
            line = await asyncio.wait_for(watch.stdout.readline(), 20)
            seen.append(json.loads(line))
        states = [e["state"] for e in seen if e.get("instance") == "one" and "state" in e]
        assert states == ["starting", "running", "stopping", "stopped"]
    finally:
        watch.kill()
        await watch.wait()
