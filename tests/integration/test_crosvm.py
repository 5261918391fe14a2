"""The crosvm backend against a stand-in (tests/crosvm/crosvm), through the real daemon.

crosvm cannot be installed or run on these machines: the stand-in checks
its argv against upstream's grammar, connects to its serial sockets as crosvm
does, and answers crosvm's control subcommands. What these tests show is
spectrumd's side of the contract, not crosvm's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from spectrumd.model.types import Accel
from spectrumd.supervisor import process
from spectrumd.vmm.base import PORT_CONTROL, PORT_PORTAL, NetDev, VmSpec
from spectrumd.vmm.crosvm import CrosvmBackend
from tests.conftest import Daemon
from tests.crosvm.grammar import parse_run
from tests.integration.helpers import props, wait_for, wait_log

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STANDIN_DIR = Path(__file__).resolve().parent.parent / "crosvm"


def standin_env(with_crosvm: bool = True) -> dict[str, str]:
    path = os.environ.get("PATH", "/usr/bin:/bin")
    if with_crosvm:
        path = f"{STANDIN_DIR}:{path}"
    return {**os.environ, "PATH": path}


def crosvm_config(workdir: Path, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    kernel = workdir / "vmlinux"
    kernel.write_bytes(b"not a kernel: the stand-in does not boot it\n")
    return {
        "defaults": defaults
        if defaults is not None
        else {"vmm": "crosvm", "accel": "kvm", "stop_timeout": 1},
        "applications": {
            "app": {"command": "echo hello", "memory_mib": 128, "kernel": str(kernel)}
        },
        "resources": {"wl": {"type": "wayland", "path": "/run/user/1000/wayland-0"}},
        "instances": {"one": {"application": "app", "resources": ["wl"]}},
    }


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting for its new parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ticks(path: Path) -> int:
    return path.read_text(errors="replace").count("tick ")


async def start_one(daemon: Daemon) -> tuple[Any, dict[str, Any], Path]:
    """Start the stand-in; the directory it owns (its control socket, argv record, flags)."""
    c = await daemon.start(crosvm_config(daemon.workdir), env=standin_env())
    await c.manager("StartInstance", "s", "one")
    p = await props(c, "one")
    return c, p, daemon.state_dir / "run" / "one" / "vmm"


async def test_start_pause_resume_stop(daemon: Daemon) -> None:
    c, p, run_dir = await start_one(daemon)
    assert p["State"] == "running" and p["Vmm"] == "crosvm" and p["MainPID"] > 0
    # The stand-in's control port goes through the relay both ways: it says
    # "ready", the daemon answers with the command to run.
    await wait_for(c, "one", lambda p: p["GuestReady"], timeout=10)
    log = Path(p["ConsoleLog"])
    await wait_log(log, "guest runs: echo hello", timeout=10)
    await wait_log(log, "tick 2", timeout=10)

    record = json.loads((run_dir / "crosvm-argv.json").read_text())
    assert record["session_leader"], "crosvm must run in its own process group"
    assert record["argv"][1] == "run"
    opts = parse_run(record["argv"][2:])
    assert opts["--wayland-sock"] == [{"path": "/run/user/1000/wayland-0"}]
    names = {s["name"] for s in opts["--serial"] if "name" in s}  # type: ignore[index, operator]
    assert {PORT_CONTROL, PORT_PORTAL} <= names, names
    # crosvm (as its own uid) reached the instance's file server at the
    # --vhost-user socket and got its features: VIRTIO_F_VERSION_1 and
    # VHOST_USER_F_PROTOCOL_FEATURES.
    (fs,) = opts["--vhost-user"]
    assert fs == {"path": "fs", "socket": str(run_dir / "fs-vhost.sock")}, fs
    features = record["vhost_fs_features"]
    assert features & (1 << 32) and features & (1 << 30), hex(features)

    await c.instance_call("one", "Pause")
    assert (await props(c, "one"))["State"] == "paused"
    await asyncio.sleep(0.5)
    before = ticks(log)
    await asyncio.sleep(1.0)
    assert ticks(log) == before, "a suspended stand-in kept printing"
    await c.instance_call("one", "Resume")
    await wait_log(log, f"tick {before + 2}", timeout=10)

    # Every control subcommand ran as the VMM's own uid, never as root.
    vmm_uid = int(Path(f"/proc/{p['MainPID']}/status").read_text().split("Uid:")[1].split()[0])
    peers = (run_dir / "control-peers.txt").read_text().split()
    assert peers[0::2] == ["suspend", "resume"] and set(peers[1::2]) == {str(vmm_uid)}, peers
    assert vmm_uid != 0

    await c.manager("StopInstance", "s", "one")
    p = await props(c, "one")
    assert p["State"] == "stopped", p
    assert "power button" in p["StateReason"], p["StateReason"]


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["ignore-powerbtn"], "the vmm exited when asked"),
        (["ignore-powerbtn", "ignore-stop"], "SIGTERM"),
        (["ignore-powerbtn", "ignore-stop", "ignore-sigterm"], "SIGKILL"),
    ],
)
async def test_stop_escalates(daemon: Daemon, flags: list[str], reason: str) -> None:
    c, p, run_dir = await start_one(daemon)
    for f in flags:
        (run_dir / f).touch()
    t0 = time.monotonic()
    await c.manager("StopInstance", "s", "one")
    p = await props(c, "one")
    assert p["State"] == "stopped", p
    assert reason in p["StateReason"], p["StateReason"]
    assert time.monotonic() - t0 < 20


async def test_crash_is_failed_with_reason(daemon: Daemon) -> None:
    c, p, _ = await start_one(daemon)
    os.kill(p["MainPID"], signal.SIGKILL)
    p = await wait_for(c, "one", lambda p: p["State"] == "failed", timeout=10)
    assert "signal 9" in p["StateReason"], p["StateReason"]
    assert p["MainPID"] == 0


async def test_without_systemd_a_restart_ends_crosvm_and_says_why(daemon: Daemon) -> None:
    """crosvm's serial connections die with a daemon that has no fd store to keep
    them in (no systemd; test_systemd.py shows the re-adoption with one): the next
    daemon ends that crosvm, whole, and the instance says why."""
    c, p, run_dir = await start_one(daemon)
    pid = p["MainPID"]
    await daemon.stop()  # SIGTERM: the daemon leaves its VMMs running
    os.kill(pid, 0)  # still there
    c = await daemon.start(env=standin_env())
    p = await props(c, "one")
    assert p["State"] == "failed" and p["MainPID"] == 0, p
    assert "nothing kept those connections" in p["StateReason"], p["StateReason"]
    assert not running(pid), "the old crosvm was left running"
    assert not run_dir.parent.exists()
    await c.manager("StartInstance", "s", "one")  # and it starts again
    assert (await props(c, "one"))["State"] == "running"


async def test_explicit_crosvm_without_binary_is_a_config_error(daemon: Daemon) -> None:
    daemon.write_config(crosvm_config(daemon.workdir))
    with pytest.raises(RuntimeError):
        await daemon.start(env=standin_env(with_crosvm=False))
    log = daemon.stderr_path.read_text()
    assert "instances.one.vmm (from defaults.vmm)" in log, log
    assert "no crosvm binary is on PATH" in log, log


@pytest.mark.parametrize(("with_crosvm", "vmm"), [(True, "crosvm"), (False, "qemu")])
async def test_automatic_choice(daemon: Daemon, with_crosvm: bool, vmm: str) -> None:
    config = crosvm_config(daemon.workdir, defaults={"accel": "kvm"})
    config["instances"]["one"]["resources"] = []
    c = await daemon.start(config, env=standin_env(with_crosvm))
    assert (await props(c, "one"))["Vmm"] == vmm
    assert f"automatic VMM choice: {vmm}" in daemon.stderr_path.read_text()


@pytest.fixture
async def standin(short_tmp: Path) -> Any:
    """A stand-in crosvm run by the backend directly (prepare, spawn, attach)."""
    run_dir = short_tmp / f"cv{os.getpid()}{time.monotonic_ns() % 10000}"
    (run_dir / "vmm").mkdir(parents=True)  # the directory crosvm owns, as the run makes it
    kernel = run_dir / "k"
    kernel.write_bytes(b"")
    spec = VmSpec(
        instance="t",
        accel=Accel.kvm,
        memory_mib=64,
        vcpus=1,
        kernel=kernel,
        initrd=None,
        cmdline="console=ttyS0",
        run_dir=run_dir,
        binary=str(STANDIN_DIR / "crosvm"),
    )
    backend = CrosvmBackend()
    with contextlib.ExitStack() as stack:
        backend.prepare(spec, stack)
        proc = await process.spawn(backend.argv(spec), (), run_dir / "vmm.log", None, {})
        try:
            control = await backend.attach(spec, lambda n, d: None, 10)
            try:
                yield control, proc, spec
            finally:
                await control.close()
        finally:
            await proc.reap()


async def test_control_subcommands(standin: Any) -> None:
    control, proc, spec = standin
    with open("/dev/null", "rb") as dev:
        port = await control.usb_attach(dev.fileno(), "1050:0407:x")
    assert port == "1"
    devices = await control.usb_list()
    assert [(d.port, d.vendor, d.product) for d in devices] == [(1, "1050", "0407")]
    await control.usb_detach(port)
    assert await control.usb_list() == []
    await control.balloon(64 * 1024 * 1024)
    assert "BalloonStats" in await control.balloon_stats()
    net = NetDev(id="net0", tap_fd=0, tap_name="tap0", mac="02:00:00:00:00:01")
    await control.add_net(net)
    await control.remove_net("net0")
    with pytest.raises(Exception, match="not hot-added"):
        await control.remove_net("net0")
    # The console relay carries what the stand-in prints.
    r, w = await asyncio.open_unix_connection(spec.console_socket)
    assert b"booting" in await asyncio.wait_for(r.readuntil(b"\n"), 5)
    w.close()
    assert await control.request_exit() is True
    assert await asyncio.wait_for(proc.wait(), 5) == 0


async def test_control_error_carries_stderr(standin: Any) -> None:
    control, proc, _ = standin
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    with pytest.raises(Exception, match="failed to connect to socket"):
        await control.pause()
