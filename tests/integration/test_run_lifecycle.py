"""The run as one object: a lifecycle that never hangs, whoever misbehaves.

Each test is one finding of issue 13, reproduced against the real daemon (a
real guest where a boot matters): a stop right after a daemon restart, a kill
or a stop during a start, a guest that pins its instance in ``stopping``, a
control call to a VMM that no longer answers.
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
    file_servers,
    marked_dir,
    props,
    short,
    vmms,
    wait_for,
    wait_log,
)
from tests.integration.hostile import hostile_initrd, patched_init
from tests.integration.test_crosvm import crosvm_config, standin_env
from tests.integration.test_network import netns  # noqa: F401 (a fixture)
from tests.integration.test_restart import config as ticker_config
from tests.integration.test_restart import kill_daemon
from tests.integration.test_usb import Signals, holders
from tests.usb_tree import UsbTree

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


def taps(ns: str) -> str:
    """The tun/tap links in the network namespace ``ns``, one a line ("" if none)."""
    return subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "type", "tun"], capture_output=True, text=True
    ).stdout.strip()


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


def gated_qemu(bindir: Path) -> Path:
    """A ``qemu-system-x86_64`` first on PATH that waits at a gate, then execs the real
    one: a start held open with the VMM spawned, as long as the test wants. It is
    one process (a shell blocked opening a FIFO) that SIGTERM ends. Returns the
    file that opens the gate for good."""
    bindir.mkdir(exist_ok=True)
    fifo, opened = bindir / "gate", bindir / "open"
    if not fifo.exists():
        os.mkfifo(fifo)
    fifo.chmod(0o644)  # the VMM's own uid reads it
    opened.unlink(missing_ok=True)
    wrapper = bindir / "qemu-system-x86_64"
    wrapper.write_text(
        f'#!/bin/sh\n[ -e {opened} ] || read go < {fifo}\nexec /usr/bin/qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(0o755)
    return opened


async def test_stop_during_a_start_cancels_it_and_leaves_nothing(
    daemon: Daemon,
    short_tmp: Path,
    docs: Path,
    netns: str,  # noqa: F811
) -> None:
    bindir = short_tmp / "gatedvmm"
    opened = gated_qemu(bindir)
    cfg = app_config("sleep 600")
    cfg["resources"]["docs"]["path"] = str(docs)
    cfg["instances"] = {
        "one": {"application": "app", "resources": ["lan", "docs"]},
        "two": {"application": "app"},
    }
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    c = await daemon.start(cfg, env=env, extra_args=["--netns", netns])
    rec = await SignalRecorder().attach(c)
    path = await c.instance_path("one")

    starts = {n: asyncio.ensure_future(c.manager("StartInstance", "s", n)) for n in ("one", "two")}
    held = {n: await wait_for(c, n, lambda p: p["MainPID"] != 0, timeout=30) for n in starts}
    # Everything but the VM's CPUs is there: the tap, the file server, the run directory.
    assert [p["State"] for p in held.values()] == ["starting", "starting"]
    assert taps(netns) != ""
    assert "one" in file_servers(daemon.state_dir)
    assert (daemon.state_dir / "run" / "one").is_dir()

    t0 = time.monotonic()
    await c.instance_call("one", "Stop")
    took = time.monotonic() - t0
    # Stop replied once it was done: the start answered, and nothing is left.
    assert starts["one"].done()
    e = await error_of(starts["one"])
    assert short(e.name) == "Cancelled", e
    assert "stopped during its start" in e.message, e.message
    p = await props(c, "one")
    # Its CPUs never ran: no power button to wait for, SIGTERM ended the VMM at once.
    assert (p["State"], p["StateReason"], p["MainPID"]) == (
        "stopped",
        "stopped during its start: vmm terminated with SIGTERM",
        0,
    ), p
    assert took < 5
    assert not alive(held["one"]["MainPID"])
    assert "one" not in vmms(daemon.state_dir)
    assert "one" not in file_servers(daemon.state_dir)
    assert taps(netns) == ""
    assert not (daemon.state_dir / "run" / "one").exists()
    assert "running" not in rec.states(path)
    assert rec.states(path)[-2:] == ["stopping", "stopped"]
    # The other start is untouched by it.
    assert (await props(c, "two"))["State"] == "starting"

    # StopAll (a system shutdown) includes an instance that is starting.
    await c.manager("StopAll")
    e = await error_of(starts["two"])
    assert short(e.name) == "Cancelled", e
    p = await props(c, "two")
    assert (p["State"], p["MainPID"]) == ("stopped", 0), p
    assert p["StateReason"].startswith("stopped during its start"), p
    assert vmms(daemon.state_dir) == {} and file_servers(daemon.state_dir) == {}
    assert list((daemon.state_dir / "run").iterdir()) == []

    # The same instance then starts for real: its guest boots on the same network and files.
    opened.touch()
    await c.manager("StartInstance", "s", "one")
    p = await wait_for(c, "one", lambda p: p["GuestReady"], timeout=90)
    assert p["State"] == "running" and taps(netns) != ""
    await c.instance_call("one", "Kill")
    assert taps(netns) == "" and vmms(daemon.state_dir) == {}


async def test_stop_during_a_start_whose_guest_runs_presses_the_button(daemon: Daemon) -> None:
    # crosvm's guest runs from the spawn (no -S). The start is held after the
    # VMM answered, in the first of two USB attaches, by the crosvm stand-in.
    tree = UsbTree(daemon.workdir / "usb")
    tree.plug("1050", "0407", "A1", manufacturer="Yubico", name="YubiKey")
    tree.plug("1050", "0407", "B2", ports="2")
    hold = daemon.workdir / "hold-usb-attach"
    hold.touch()
    cfg = crosvm_config(daemon.workdir)
    cfg["defaults"]["stop_timeout"] = 10
    cfg["resources"] = {"key": {"type": "usb", "vendor": "1050", "product": "0407"}}
    cfg["instances"] = {"one": {"application": "app", "resources": ["key"]}}
    c = await daemon.start(
        cfg,
        env=standin_env() | {"STANDIN_HOLD_USB_ATTACH": str(hold)},
        extra_args=[
            *("--usb-sysfs-root", str(tree.sysfs), "--usb-dev-root", str(tree.dev)),
            *("--control-timeout", "30"),
        ],
    )
    sig = await Signals().attach(c)
    start = asyncio.ensure_future(c.manager("StartInstance", "s", "one"))
    reached = Path(f"{hold}.reached")
    try:
        await wait_for(c, "one", lambda p: reached.exists(), timeout=30)
        attach_pid = int(reached.read_text())
        p = await props(c, "one")
        vmm = p["MainPID"]
        assert p["State"] == "starting" and alive(vmm), p
        # A call that comes during the start waits for it, and never reaches the VMM.
        path = await c.instance_path("one")
        usb = asyncio.ensure_future(
            c.call(path, INSTANCE_IFACE, "AttachUsb", "s", ["1050:0407:B2"])
        )

        t0 = time.monotonic()
        await c.instance_call("one", "Stop")
        took = time.monotonic() - t0
    finally:
        hold.unlink()
    e = await error_of(start)
    assert short(e.name) == "Cancelled", e
    p = await props(c, "one")
    assert (p["State"], p["MainPID"]) == ("stopped", 0), p
    # The guest had run, so it was asked: the stand-in powers off at the button.
    assert (
        p["StateReason"] == "stopped during its start: the guest shut down after the power button"
    )
    assert took < 10  # the button, well before the stop timeout
    assert not alive(vmm) and not alive(attach_pid)
    assert not (daemon.state_dir / "run" / "one").exists()
    # No device was attached, and the claim of the one being attached is undone.
    assert await holders(c) == {"1050:0407:A1": "", "1050:0407:B2": ""}
    assert ("UsbDeviceAttached", "1050:0407:A1", "one") not in sig.seen
    e = await error_of(usb)
    assert short(e.name) == "InvalidState", e
    assert e.message == "cannot attach a USB device to one: it is stopped"


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
    rec = await SignalRecorder().attach(c)
    path = await c.instance_path("one")

    await c.manager("StartInstance", "s", "one")
    p = await wait_for(c, "one", lambda p: p["State"] != "running", timeout=90)
    vmm = p["MainPID"]
    assert (p["State"], p["StateReason"]) == ("stopping", "application exited with status 0")
    began = rec.entered(path, "stopping")
    await wait_log(Path(p["ConsoleLog"]), "staying up after the exit report", timeout=30)
    # stopping has a deadline, the stop timeout (3 s), then the escalation. Before
    # it, the guest does hold its instance in stopping, and its VMM runs.
    await asyncio.sleep(max(0.0, began + 2.4 - time.monotonic()))
    p = await props(c, "one")
    checked = time.monotonic()
    assert p["State"] == "stopping", p
    assert alive(vmm)
    assert checked < began + 3, "checked too late to see the state before the stop timeout"
    p = await wait_for(c, "one", lambda p: p["State"] != "stopping", timeout=20)
    assert p["State"] == "stopped"
    assert p["StateReason"] == "vmm terminated with SIGTERM after the 3 s stop timeout"
    assert not alive(vmm)
    # ... and not before the deadline (the signals' own delay is milliseconds).
    assert rec.entered(path, "stopped") - began >= 2.95

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
    # The call's deadline, no sooner (t0 is before the call reached the daemon) and
    # not much later.
    took = time.monotonic() - t0
    assert 3 <= took < 8, took
    # The call that timed out left no tap behind.
    assert taps(netns) == ""

    # And Stop is not blocked: the button cannot get through, so it escalates.
    t0 = time.monotonic()
    await c.instance_call("one", "Stop")
    p = await props(c, "one")
    assert p["State"] == "stopped"
    assert p["StateReason"].startswith("vmm killed with SIGKILL"), p
    assert time.monotonic() - t0 < 15
    assert not alive(vmm)
