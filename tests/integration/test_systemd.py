"""spectrumd under a real systemd: the shipped units, machined, daemon restarts.

The host has no systemd as PID 1, so the test boots one: ``systemd-nspawn --boot``
of the host's own /usr on a volatile root (``--volatile=yes``: a tmpfs root and
an empty /etc that systemd populates on first boot), with a network namespace of
its own (``--private-network``: nothing in it reaches the host's links). Bound
into it, read-only: the repository (with its venv), the embedded guest, the bus
policy, the activation file, the sysusers and tmpfiles entries, a
configuration, and the two shipped units with only their ``/usr/bin/spectrum*``
paths pointed at this checkout. Then, as an operator would: bus activation,
``systemctl start``, ``spectrumctl``, ``machinectl list``, ``systemctl restart
spectrumd`` and ``systemctl stop spectrum-instances``. The crosvm stand-in
(tests/crosvm) is on the unit's PATH through a drop-in.

Commands run inside through ``nsenter`` into the container's mount and PID
namespaces. The container is powered off (SIGTERM to nspawn) whatever happens,
which ends every process in it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrumd.host.uids import DEFAULT_RANGE
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NSPAWN = shutil.which("systemd-nspawn")
MACHINED = Path("/lib/systemd/systemd-machined")
STANDIN_DIR = ROOT / "tests" / "crosvm"
SYSTEM_SERVICES = Path("/usr/share/dbus-1/system-services")


def config(work: Path) -> dict[str, Any]:
    kernel = work / "vmlinux"
    kernel.write_bytes(b"not a kernel: the crosvm stand-in does not boot it\n")
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": 20},
        "applications": {
            "app": {"command": "sleep 3600", "memory_mib": 128},
            "cv": {"command": "echo hello", "memory_mib": 128, "kernel": str(kernel)},
        },
        "instances": {
            **{n: {"application": "app"} for n in ("a", "b", "c")},
            "x": {"application": "cv", "vmm": "crosvm", "accel": "kvm", "stop_timeout": 5},
        },
    }


class Container:
    def __init__(self, nspawn: subprocess.Popen[bytes]) -> None:
        self.nspawn = nspawn
        self.leader = 0

    def find_leader(self) -> int:
        """The container's PID 1 (nspawn's child), once it runs systemd."""
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        for pid in children.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        return 0

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-p", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}\n" + self.journal()
            )
        return r.stdout

    def ctl(self, *args: str, check: bool = True) -> str:
        return self.run(
            sys.executable, "-m", "spectrumd.cli", "--bus", "system", *args, check=check
        )

    def status(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.ctl("--json", "status", name)))

    def machines(self) -> dict[str, dict[str, str]]:
        """machinectl list, and each machine's Leader and Unit."""
        out: dict[str, dict[str, str]] = {}
        for line in self.run("machinectl", "list", "--no-legend").splitlines():
            fields = line.split()
            if not fields:
                continue
            shown = self.run(
                "machinectl", "show", fields[0],
                "-p", "Leader", "-p", "Unit", "-p", "Class", "-p", "Service",
            )  # fmt: skip
            out[fields[0]] = dict(kv.split("=", 1) for kv in shown.split())
        return out

    def journal(self) -> str:
        """spectrumd's last journal lines, for a failure's message."""
        with contextlib.suppress(Exception):
            return "--- journal ---\n" + self.run(
                "journalctl", "-u", "spectrumd", "-u", "spectrum-instances", "--no-pager",
                "-n", "80", check=False, timeout=20,
            )  # fmt: skip
        return ""

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n" + self.journal())
            time.sleep(0.2)


def active(c: Container, unit: str) -> bool:
    return c.run("systemctl", "is-active", unit, check=False).strip() == "active"


def guest_ready(c: Container, name: str) -> bool:
    return c.status(name)["GuestReady"] is True


def unit_for_checkout(work: Path, name: str) -> Path:
    """The shipped unit with its binaries pointed at this checkout's venv."""
    text = (ROOT / "systemd" / name).read_text()
    text = text.replace("/usr/bin/spectrumctl", f"{sys.executable} -m spectrumd.cli")
    text = text.replace("/usr/bin/spectrumd", f"{sys.executable} -m spectrumd")
    path = work / name
    path.write_text(text)
    return path


@pytest.fixture
def container(guest_dir: Path) -> Iterator[Container]:
    if NSPAWN is None or not MACHINED.exists():
        pytest.skip("needs systemd-nspawn and systemd-machined (apt package systemd-container)")
    work = Path(tempfile.mkdtemp(prefix="spectrum-nspawn-", dir="/tmp"))
    work.chmod(0o755)
    (work / "config.json").write_text(json.dumps(config(work)))
    dropin = work / "path.conf"
    dropin.write_text(f"[Service]\nEnvironment=PATH={STANDIN_DIR}:/usr/sbin:/usr/bin:/sbin:/bin\n")
    binds = {
        str(ROOT): str(ROOT),
        str(work): str(work),
        str(dropin): "/etc/systemd/system/spectrumd.service.d/path.conf",
        str(guest_dir): "/var/cache/spectrumd/guest",
        str(work / "config.json"): "/etc/spectrumd/config.json",
        str(
            ROOT / "dbus/org.spectrum_os.Spectrum1.conf"
        ): "/etc/dbus-1/system.d/org.spectrum_os.Spectrum1.conf",
        str(ROOT / "systemd/spectrumd.sysusers.conf"): "/etc/sysusers.d/spectrumd.conf",
        str(ROOT / "systemd/spectrumd.tmpfiles.conf"): "/etc/tmpfiles.d/spectrumd.conf",
    }
    if not sys.base_prefix.startswith("/usr/"):  # the venv's Python (pyenv, say)
        binds[sys.base_prefix] = sys.base_prefix
    # Bus activation: the host's activation files and ours, over /usr's directory.
    services = work / "system-services"
    shutil.copytree(SYSTEM_SERVICES, services, dirs_exist_ok=True)
    shutil.copy(ROOT / "dbus/org.spectrum_os.Spectrum1.service", services)
    binds[str(services)] = str(SYSTEM_SERVICES)
    for unit in ("spectrumd.service", "spectrum-instances.service"):
        binds[str(unit_for_checkout(work, unit))] = f"/etc/systemd/system/{unit}"
    argv = [
        NSPAWN, "-q", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
        "--console=passive",
        "--private-network",
        # nspawn's own seccomp filter does not let Landlock through by default:
        # spectrumd confines its VMMs with it.
        "--system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self",
        *(f"--bind-ro={src}:{dst}" for src, dst in binds.items()),
        "--boot", "--", "--unit=basic.target", "systemd.firstboot=off",
    ]  # fmt: skip
    log = (work / "nspawn.log").open("wb")
    nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    c = Container(nspawn)
    try:
        deadline = time.monotonic() + 60
        while not c.leader:
            if nspawn.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "systemd-nspawn did not boot:\n" + (work / "nspawn.log").read_text()[-3000:]
                )
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                c.leader = c.find_leader()
        c.wait(
            "the container's boot",
            lambda: (
                c.run("systemctl", "is-system-running", check=False).strip()
                in ("running", "degraded")
            ),
            timeout=60,
        )
        yield c
    finally:
        if nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)  # nspawn powers the container off
            try:
                nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def test_units_machined_restart_and_shutdown(container: Container) -> None:
    c = container
    # The first call on the bus starts spectrumd (the activation file's SystemdService=).
    assert c.run("systemctl", "is-active", "spectrumd.service", check=False).strip() == "inactive"
    listed = c.run(
        "busctl", "call", "org.spectrum_os.Spectrum1", "/org/spectrum_os/Spectrum1",
        "org.spectrum_os.Spectrum1.Manager", "ListInstances",
    )  # fmt: skip
    assert listed.startswith("a(ssso) 4 "), listed
    # It answers once it owns its name, a moment before it tells systemd READY=1.
    c.wait("spectrumd.service active", lambda: active(c, "spectrumd.service"), timeout=10)
    c.run("systemctl", "start", "spectrum-instances.service")

    # A machine already named "c" (a stand-in process): c's registration is
    # refused, and c runs anyway.
    c.run("sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! >/run/squatter.pid")
    squatter = c.run("cat", "/run/squatter.pid").strip()
    c.run(
        "busctl", "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
        "org.freedesktop.machine1.Manager", "CreateMachine", "sayssusa(sv)",
        "c", "0", "other", "container", squatter, "", "0",
    )  # fmt: skip

    for name in ("a", "b", "c"):
        c.ctl("start", name)
    pids = {n: int(c.status(n)["MainPID"]) for n in ("a", "b", "c")}
    machines = c.machines()
    for name in ("a", "b"):
        assert machines[name] == {
            "Leader": str(pids[name]),
            "Unit": f"machine-{name}.scope",
            "Class": "vm",
            "Service": "spectrumd",
        }, machines
    assert machines["c"]["Leader"] == squatter  # the squatter's, not ours
    assert c.status("c")["State"] == "running"
    journal = c.run("journalctl", "-u", "spectrumd", "--no-pager")
    assert (
        "c: not registered with systemd-machined: org.freedesktop.machine1.MachineExists" in journal
    )
    c.ctl("kill", "c")
    c.run("kill", squatter)

    # The VMMs run as uids of their own from the range, with no user entry.
    owners = {c.run("stat", "-c", "%u", f"/proc/{pids[name]}").strip() for name in ("a", "b")}
    assert len(owners) == 2 and all(int(u) in DEFAULT_RANGE for u in owners), owners
    # The VMMs left spectrumd.service's cgroup for their scopes.
    cgroup = c.run("cat", f"/proc/{pids['a']}/cgroup")
    assert "/machine.slice/machine-a.scope" in cgroup, cgroup

    for name in ("a", "b"):
        c.wait(f"{name}'s guest", functools.partial(guest_ready, c, name))

    # A restart of the daemon: the VMMs keep running, re-adopted, still machines.
    old_daemon = c.run("systemctl", "show", "-p", "MainPID", "--value", "spectrumd.service").strip()
    c.run("systemctl", "restart", "spectrumd.service")
    new_daemon = c.run("systemctl", "show", "-p", "MainPID", "--value", "spectrumd.service").strip()
    assert new_daemon != old_daemon
    for name in ("a", "b"):
        st = c.status(name)
        assert st["State"] == "running" and st["MainPID"] == pids[name], st
    assert {n: m["Leader"] for n, m in c.machines().items()} == {
        "a": str(pids["a"]),
        "b": str(pids["b"]),
    }

    # Shutdown's path: stopping spectrum-instances.service stops them all gracefully.
    c.run("systemctl", "stop", "spectrum-instances.service", timeout=120)
    for name in ("a", "b"):
        st = c.status(name)
        assert st["State"] == "stopped", st
        assert st["StateReason"] in (
            "the guest powered off",
            "the guest shut down after the power button",
        ), st
    c.wait("the machines to go", lambda: c.machines() == {}, timeout=10)
    assert active(c, "spectrumd.service")


def test_crosvm_is_readopted_through_the_fd_store(container: Container) -> None:
    """crosvm connects to its serial sockets once: the daemon keeps those connections
    in systemd's file descriptor store, and a restarted daemon (clean, or after a
    SIGKILL and Restart=on-failure) takes the VMM back, paused as it was."""
    c = container
    c.run("systemctl", "start", "spectrumd.service")
    c.ctl("start", "x")
    c.wait("x's guest", functools.partial(guest_ready, c, "x"))
    pid = c.status("x")["MainPID"]
    kept = c.run("systemctl", "show", "-p", "NFileDescriptorStore", "--value", "spectrumd.service")
    assert int(kept) >= 2, kept  # the console and the control port at least
    log = "/var/lib/spectrumd/logs/x/console.log"

    def ticks() -> int:
        return c.run("cat", log).count("tick ")

    def daemon_pid() -> str:
        return c.run("systemctl", "show", "-p", "MainPID", "--value", "spectrumd.service").strip()

    c.ctl("pause", "x")
    c.run("systemctl", "restart", "spectrumd.service")
    st = c.status("x")
    assert (st["State"], st["MainPID"]) == ("paused", pid), f"{st}\n{c.journal()}"
    assert st["StateReason"] == "re-adopted after a daemon restart", st
    c.ctl("resume", "x")
    before = ticks()
    c.wait("x's console after the restart", lambda: ticks() >= before + 2, timeout=20)

    # A crash: systemd restarts the daemon (Restart=on-failure) and keeps the store.
    crashed = daemon_pid()
    c.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "spectrumd.service")
    c.wait(
        "a new spectrumd",
        lambda: daemon_pid() not in (crashed, "0") and active(c, "spectrumd.service"),
        timeout=30,
    )
    st = c.status("x")
    assert (st["State"], st["MainPID"], st["GuestReady"]) == ("running", pid, True), st
    before = ticks()
    c.wait("x's console after the crash", lambda: ticks() >= before + 2, timeout=20)

    c.ctl("stop", "x")
    st = c.status("x")
    assert st["State"] == "stopped" and "power button" in st["StateReason"], st
    c.wait(
        "the store to empty",
        lambda: (
            c.run(
                "systemctl", "show", "-p", "NFileDescriptorStore", "--value", "spectrumd.service"
            ).strip()
            == "0"
        ),
        timeout=10,
    )
