"""The run as one object: a lifecycle that never hangs, whoever misbehaves.

Each test is one finding of issue 13, reproduced against the real daemon (a
real guest where a boot matters): a stop right after a daemon restart, a kill
during a start, a guest that pins its instance in ``stopping``, a control
call to a VMM that no longer answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.bus.names import INSTANCE_IFACE
from tests.conftest import Daemon
from tests.integration.helpers import (
    SignalRecorder,
    app_config,
    error_of,
    marked_dir,
    props,
    short,
    wait_for,
    wait_log,
)
from tests.integration.hostile import hostile_initrd, patched_init
from tests.integration.test_network import netns  # noqa: F401 (a fixture)
from tests.integration.test_restart import config as ticker_config
from tests.integration.test_restart import kill_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def docs() -> Iterator[Path]:
    with marked_dir("docs.", "marker-ok") as d:
        yield d


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def test_stop_right_after_a_daemon_restart_is_graceful(daemon: Daemon, docs: Path) -> None:
    c = await daemon.start(ticker_config(docs, ("a", "b")))
    for n in "ab":
        await c.manager("StartInstance", "s", n)
    for n in "ab":
        await wait_for(c, n, lambda p: p["GuestReady"], timeout=90)
    pids = {n: (await props(c, n))["MainPID"] for n in "ab"}
    await kill_daemon(daemon)

    c = await daemon.start()
    # At once, before the re-adopted guests have answered the new daemon.
    t0 = time.monotonic()
    await asyncio.gather(*(c.manager("StopInstance", "s", n) for n in "ab"))
    took = time.monotonic() - t0
    for n in "ab":
        p = await props(c, n)
        assert p["State"] == "stopped", p
        assert p["StateReason"] == "the guest shut down after the power button", p
        assert not alive(pids[n])
    # The power button did it, well inside the 20 s stop timeout.
    assert took < 15


async def test_kill_cancels_a_start_at_once(daemon: Daemon, short_tmp: Path) -> None:
    # A VMM that takes its time to come up: its control socket does not
    # answer for a minute, so without a cancellable start Kill waited for
    # the 30 s attach timeout.
    bindir = short_tmp / "slowvmm"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "qemu-system-x86_64"
    wrapper.write_text('#!/bin/sh\nsleep 60\nexec /usr/bin/qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    c = await daemon.start(app_config("sleep 600"), env=env)
    rec = await SignalRecorder().attach(c)
    path = await c.instance_path("one")

    start = asyncio.ensure_future(c.manager("StartInstance", "s", "one"))
    p = await wait_for(c, "one", lambda p: p["MainPID"] != 0, timeout=30)
    vmm = p["MainPID"]
    assert p["State"] == "starting"
    t0 = time.monotonic()
    await c.instance_call("one", "Kill")
    took = time.monotonic() - t0
    e = await error_of(start)
    assert short(e.name) == "Cancelled", e
    p = await props(c, "one")
    assert (p["State"], p["StateReason"], p["MainPID"]) == ("stopped", "killed", 0)
    assert took < 5
    assert not alive(vmm)
    assert not (daemon.state_dir / "run" / "one").exists()
    # Never running: the kill ended the start before the CPUs were started.
    assert "running" not in rec.states(path)
    assert rec.states(path)[-2:] == ["stopping", "stopped"]


async def test_a_guest_cannot_pin_its_instance_in_stopping(
    daemon: Daemon, guest_dir: Path, short_tmp: Path
) -> None:
    # The attacker is the guest itself (root in it): it reports "exited 0"
    # for its application, then neither powers off nor obeys the button.
    init = patched_init(
        guest_dir,
        'exec /sbin/spectrum-poweroff "command exited with status $rc"',
        'echo "spectrum-guest: staying up after the exit report"; sleep 3600',
    )
    initrd = hostile_initrd(
        guest_dir,
        short_tmp / "pin-stopping.img",
        {"/init": init, "/sbin/spectrum-poweroff": "#!/bin/sh\necho ignoring the power button\n"},
    )
    cfg = app_config("true")
    cfg["applications"]["app"] |= {"kernel": str(guest_dir / "vmlinuz"), "initrd": str(initrd)}
    cfg["defaults"]["stop_timeout"] = 3
    cfg["instances"] = {"one": {"application": "app"}, "two": {"application": "app"}}
    c = await daemon.start(cfg)

    await c.manager("StartInstance", "s", "one")
    p = await wait_for(c, "one", lambda p: p["State"] != "running", timeout=90)
    vmm = p["MainPID"]
    assert (p["State"], p["StateReason"]) == ("stopping", "application exited with status 0")
    await wait_log(Path(p["ConsoleLog"]), "staying up after the exit report", timeout=30)
    # stopping has a deadline: the stop timeout, then the escalation.
    p = await wait_for(c, "one", lambda p: p["State"] != "stopping", timeout=20)
    assert p["State"] == "stopped"
    assert p["StateReason"] == "vmm terminated with SIGTERM after the 3 s stop timeout"
    assert not alive(vmm)

    # Stop and StopAll on an instance the guest put in stopping join it, not skip it.
    await c.manager("StartInstance", "s", "two")
    await wait_for(c, "two", lambda p: p["State"] == "stopping", timeout=90)
    vmm = (await props(c, "two"))["MainPID"]
    t0 = time.monotonic()
    await asyncio.gather(c.instance_call("two", "Stop"), c.manager("StopAll"))
    assert time.monotonic() - t0 < 15
    assert (await props(c, "two"))["State"] == "stopped"
    assert not alive(vmm)


async def test_a_wedged_vmm_cannot_hold_an_instance(daemon: Daemon, netns: str) -> None:  # noqa: F811
    cfg = app_config("sleep 600")
    cfg["defaults"]["stop_timeout"] = 2
    cfg["resources"]["extra"] = {"type": "network"}
    c = await daemon.start(cfg, extra_args=["--netns", netns, "--control-timeout", "3"])
    await c.manager("StartInstance", "s", "one")
    await wait_for(c, "one", lambda p: p["GuestReady"], timeout=90)
    vmm = (await props(c, "one"))["MainPID"]
    os.kill(vmm, signal.SIGSTOP)  # QEMU stops answering QMP

    t0 = time.monotonic()
    path = await c.instance_path("one")
    e = await error_of(c.call(path, INSTANCE_IFACE, "AttachNetwork", "s", ["extra"]))
    assert short(e.name) == "Timeout", e
    assert "did not answer within 3 s" in e.message
    assert time.monotonic() - t0 < 8
    # The call that timed out left no tap behind.
    links = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", "type", "tun"], capture_output=True, text=True
    ).stdout
    assert links.strip() == ""

    # And Stop is not blocked: the button cannot get through, so it escalates.
    t0 = time.monotonic()
    await c.instance_call("one", "Stop")
    p = await props(c, "one")
    assert p["State"] == "stopped"
    assert p["StateReason"].startswith("vmm killed with SIGKILL"), p
    assert time.monotonic() - t0 < 15
    assert not alive(vmm)
