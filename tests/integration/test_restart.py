"""Restarting or crashing spectrumd never stops running instances (re-adoption)."""

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.bus.grants import GRANT_IFACE
from tests.conftest import Daemon
from tests.integration.helpers import (
    app_config,
    file_servers,
    marked_dir,
    props,
    vmms,
    wait_for,
    wait_log,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Prints a tick and what the shared directory holds, twice a second.
TICKER = (
    'i=0; while true; do echo "tick $i $(cat /mnt/spectrum/*/marker 2>/dev/null)"; '
    "i=$((i+1)); sleep 0.5; done"
)


@pytest.fixture
def docs() -> Iterator[Path]:
    with marked_dir("docs.", "marker-ok") as d:
        yield d


def config(docs: Path, names: tuple[str, ...]) -> dict[str, object]:
    cfg = app_config(TICKER, **{n: {"application": "app", "resources": ["docs"]} for n in names})
    cfg["resources"]["docs"]["path"] = str(docs)  # type: ignore[index]
    return cfg


async def kill_daemon(d: Daemon) -> None:
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    await d.proc.wait()
    await d.stop()


@pytest.fixture
def extra() -> Iterator[Path]:
    with marked_dir("extra.", "granted-ok") as d:
        yield d


async def test_crash_and_restart_keep_instances_running(
    daemon: Daemon, docs: Path, extra: Path
) -> None:
    names = ("a", "b", "c")
    c = await daemon.start(config(docs, names))
    for n in names:
        await c.manager("StartInstance", "s", n)
    for n in names:
        await wait_for(c, n, lambda p: p["GuestReady"], timeout=90)
    before = {n: (await props(c, n))["MainPID"] for n in names}
    log = Path((await props(c, "a"))["ConsoleLog"])
    await wait_log(log, "marker-ok")
    (grant,) = await c.manager("Grant", "ssa{sv}", "a", str(extra), {})
    await wait_log(log, "granted-ok")

    servers = file_servers(daemon.state_dir)
    assert sorted(servers) == sorted(names)
    await kill_daemon(daemon)
    await asyncio.sleep(1)
    assert vmms(daemon.state_dir) == before, "the VMMs kept running without their daemon"
    assert file_servers(daemon.state_dir) == servers, "so did their file servers"

    c = await daemon.start()
    for n in names:
        p = await wait_for(c, n, lambda p: p["GuestReady"], timeout=30)
        assert (p["State"], p["MainPID"]) == ("running", before[n])
        assert p["StateReason"] == "re-adopted after a daemon restart"
    (rows,) = await c.manager("ListInstances")
    assert sorted((r[0], r[2]) for r in rows) == [(n, "running") for n in names]
    # The console log goes on, and the same file servers still serve the guests.
    assert file_servers(daemon.state_dir) == servers
    size = log.stat().st_size
    await asyncio.sleep(3)
    fresh = log.read_bytes()[size:].decode(errors="replace")
    assert "tick" in fresh and "marker-ok" in fresh, fresh[-800:]
    # A grant for as long as the instance runs outlives the daemon's restart.
    (rows,) = await c.manager("ListGrants")
    assert [r[5] for r in rows] == [grant]
    assert "granted-ok" in fresh, fresh[-800:]
    # The new daemon changes the adopted file server's exports at once.
    await c.call(grant, GRANT_IFACE, "Revoke")
    size = log.stat().st_size
    await asyncio.sleep(2)
    # Past the tick that may have been printed as the revocation came.
    fresh = log.read_bytes()[size:].decode(errors="replace").split("\n", 2)[-1]
    assert "tick" in fresh and "granted-ok" not in fresh, fresh[-800:]
    assert "marker-ok" in fresh, fresh[-800:]

    # The adopted VMMs are controlled as before: pause, a graceful stop, a kill.
    await c.instance_call("a", "Pause")
    assert (await props(c, "a"))["State"] == "paused"
    await c.instance_call("a", "Resume")
    await c.manager("StopInstance", "s", "a")
    p = await props(c, "a")
    assert p["State"] == "stopped" and "power button" in p["StateReason"]
    await c.instance_call("b", "Kill")

    # A clean exit (SIGTERM) leaves them running too.
    assert await daemon.stop() == 0
    assert set(vmms(daemon.state_dir)) == {"c"}
    c = await daemon.start()
    assert (await props(c, "c"))["State"] == "running"
    assert (await props(c, "a"))["State"] == "stopped"
    await c.instance_call("c", "Kill")
    assert vmms(daemon.state_dir) == {}


async def test_vmm_that_died_while_the_daemon_was_down(daemon: Daemon, docs: Path) -> None:
    c = await daemon.start(config(docs, ("a", "b", "c")))
    for n in ("a", "b", "c"):
        await c.manager("StartInstance", "s", n)
    pid = (await props(c, "a"))["MainPID"]
    c_vmm = (await props(c, "c"))["MainPID"]
    await kill_daemon(daemon)
    os.kill(pid, signal.SIGKILL)
    # c's file server dies too: c's guest can never reach its files again.
    os.kill(file_servers(daemon.state_dir)["c"], signal.SIGKILL)
    await asyncio.sleep(0.5)
    # A garbage record must not stop the daemon either.
    (daemon.state_dir / "run" / "zz").mkdir()
    (daemon.state_dir / "run" / "zz" / "state.json").write_text("{not json")
    c = await daemon.start()
    p = await props(c, "a")
    assert (p["State"], p["StateReason"], p["MainPID"]) == (
        "failed",
        "exited while spectrumd was not running",
        0,
    )
    assert not (daemon.state_dir / "run" / "a").exists()
    assert (await props(c, "b"))["State"] == "running"
    assert "cannot read a run record" in daemon.stderr_path.read_text()
    p = await props(c, "c")
    assert (p["State"], p["MainPID"]) == ("failed", 0), p
    assert "file server is gone" in p["StateReason"], p
    assert "c" not in vmms(daemon.state_dir) and c_vmm not in vmms(daemon.state_dir).values()
    # A failed instance starts again.
    await c.manager("StartInstance", "s", "a")
    await c.instance_call("a", "Kill")
    await c.instance_call("b", "Kill")
    assert file_servers(daemon.state_dir) == {}


# Killed at several points of a start (before, during and after the VMM's spawn;
# a start takes about a second here) and early in a stop.
@pytest.mark.parametrize(
    ("during", "after"), [("start", 0.05), ("start", 0.3), ("start", 0.8), ("stop", 0.2)]
)
async def test_daemon_killed_during_a_transition(
    daemon: Daemon, docs: Path, during: str, after: float
) -> None:
    c = await daemon.start(config(docs, ("a",)))
    if during == "stop":
        await c.manager("StartInstance", "s", "a")
        await wait_for(c, "a", lambda p: p["GuestReady"], timeout=90)
    call = asyncio.ensure_future(
        c.manager("StartInstance" if during == "start" else "StopInstance", "s", "a")
    )
    await asyncio.sleep(after)
    await kill_daemon(daemon)
    call.cancel()
    await asyncio.sleep(1)
    c = await daemon.start()
    p = await props(c, "a")
    running = vmms(daemon.state_dir)
    # Consistent: one VMM and an instance that says so, or none and a stopped one.
    # The new daemon takes back a VMM whose start was recorded; one whose start was
    # cut short it ends. Stopping: the guest had the power button before the old
    # daemon died, and the new one sees its power-off through.
    if p["State"] in ("running", "stopping"):
        assert running == {"a": p["MainPID"]}, p
        if p["State"] == "running":
            await c.instance_call("a", "Kill")
        p = await wait_for(c, "a", lambda p: p["State"] in ("stopped", "failed"), timeout=60)
        assert p["MainPID"] == 0 and vmms(daemon.state_dir) == {}, p
    else:
        assert p["State"] in ("stopped", "failed") and p["MainPID"] == 0, p
        assert running == {}, running
    assert file_servers(daemon.state_dir) == {}
    (rows,) = await c.manager("ListInstances")
    assert [(r[0], r[2]) for r in rows] == [("a", (await props(c, "a"))["State"])]


async def test_stop_all(daemon: Daemon, docs: Path) -> None:
    c = await daemon.start(config(docs, ("a", "b", "c")))
    await c.manager("StartInstance", "s", "a")
    await c.manager("StartInstance", "s", "b")
    await c.manager("StopAll")
    assert [(await props(c, n))["State"] for n in ("a", "b", "c")] == ["stopped"] * 3
    assert vmms(daemon.state_dir) == {}


async def test_restart_policy_restarts_a_failed_instance(daemon: Daemon, docs: Path) -> None:
    cfg = config(docs, ("a",))
    cfg["instances"]["a"]["restart"] = "on-failure"  # type: ignore[index]
    c = await daemon.start(cfg)
    await c.manager("StartInstance", "s", "a")
    pid = (await props(c, "a"))["MainPID"]
    os.kill(pid, signal.SIGKILL)
    p = await wait_for(c, "a", lambda p: p["State"] == "running" and p["MainPID"] != pid, 30)
    assert p["StateReason"] == "restarted after: vmm exited with signal 9 (SIGKILL)"
    # A stop asked for is not a failure: no restart.
    await c.instance_call("a", "Kill")
    await asyncio.sleep(2)
    assert (await props(c, "a"))["State"] == "stopped"
