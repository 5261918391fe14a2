"""Access control (the bus policy in dbus/ and the daemon's own check), and sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.bus.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from tests.conftest import ROOT, Daemon, dbus_daemon
from tests.integration.helpers import app_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOBODY = 65534

# The policy of Debian's system bus, plus our file: what a real system bus enforces.
SYSTEM_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

# A bus that lets anyone call anything: only the daemon's own check stands.
OPEN_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"""


def _bus(tmp: Path, template: str) -> Iterator[str]:
    sock = tmp / "bus"
    conf = tmp / "bus.conf"
    conf.write_text(
        template.format(socket=sock, policy=ROOT / "dbus" / "org.spectrum_os.Spectrum1.conf")
    )
    yield from dbus_daemon([f"--config-file={conf}"])


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="spp.", dir="/tmp"))
    d.chmod(0o755)  # nobody must reach the bus socket inside
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def system_bus(tmp_short: Path) -> Iterator[str]:
    yield from _bus(tmp_short, SYSTEM_CONF)


@pytest.fixture
def open_bus(tmp_short: Path) -> Iterator[str]:
    yield from _bus(tmp_short, OPEN_CONF)


def busctl_as_nobody(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["busctl", f"--address={address}", *args],
        capture_output=True,
        text=True,
        timeout=10,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )


def call(address: str, member: str, *args: str) -> subprocess.CompletedProcess[str]:
    return busctl_as_nobody(address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, *args)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_system_bus_policy_lets_others_read_not_change(
    system_bus: str, tmp_short: Path, guest_dir: Path
) -> None:
    d = Daemon(system_bus, tmp_short, guest_dir)
    try:
        await d.start(app_config("echo hi"))
        r = call(system_bus, "ListInstances")
        assert r.returncode == 0, r.stderr
        assert '"one" "app" "stopped"' in r.stdout
        r = call(system_bus, "StartInstance", "s", "one")
        assert r.returncode != 0
        assert "Access denied" in r.stderr or "AccessDenied" in r.stderr, r.stderr
        for member, *args in (
            ("Reload",),
            ("RegisterAgent", "o", "/agent"),
            ("Grant", "ssa{sv}", "one", "/tmp", "0"),
            ("RequestGrant", "ssa{sv}", "one", "/tmp", "0"),
        ):
            r = call(system_bus, member, *args)
            assert r.returncode != 0 and "Access denied" in r.stderr, (member, r.stderr)
    finally:
        await d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_daemon_checks_the_caller_itself(
    open_bus: str, tmp_short: Path, guest_dir: Path
) -> None:
    d = Daemon(open_bus, tmp_short, guest_dir)
    try:
        await d.start(app_config("echo hi"))
        r = call(open_bus, "StartInstance", "s", "one")
        assert r.returncode != 0
        assert "only root and the group spectrum may do this" in r.stderr, r.stderr
        r = call(open_bus, "CreateInstance", "ssasa{sv}", "x", "app", "0", "0")
        assert "only root and the group spectrum" in r.stderr, r.stderr
        for member, *args in (
            ("RegisterAgent", "o", "/agent"),
            ("Grant", "ssa{sv}", "one", "/tmp", "0"),
            ("RequestGrant", "ssa{sv}", "one", "/tmp", "0"),
        ):
            r = call(open_bus, member, *args)
            assert "only root and the group spectrum" in r.stderr, (member, r.stderr)
        r = call(open_bus, "GetInstance", "s", "one")
        assert r.returncode == 0, r.stderr
    finally:
        await d.stop()


async def test_sd_notify_ready_and_stopping(daemon: Daemon, short_tmp: Path) -> None:
    path = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            await daemon.start(app_config("echo hi"))
        finally:
            del os.environ["NOTIFY_SOCKET"]
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert "STATUS=serving 1 instances" in ready.splitlines()
        assert await daemon.stop() == 0
        assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
    path.unlink()


async def test_watchdog_pings_from_the_event_loop(daemon: Daemon, short_tmp: Path) -> None:
    path = short_tmp / "watchdog"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        await daemon.start(app_config("echo hi"), env=env)
        pings = 0
        while pings < 3:
            if "WATCHDOG=1" in sock.recv(4096).decode().splitlines():
                pings += 1
        # A hung loop stops the pings: freeze the daemon and hear nothing.
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        sock.settimeout(0.1)
        while True:  # drain what was sent before the freeze
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        os.kill(daemon.proc.pid, signal.SIGCONT)
    path.unlink()
