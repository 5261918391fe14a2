"""Shared fixtures: a private dbus-daemon, the embedded guest, a running spectrumd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401 (imported now, not by its plugin at the session's end; see below)
import pytest

from spectrumd.cli.client import Client, connect
from spectrumd.supervisor import process

# CPython 3.11.7 can fail to compile a module imported late in a session
# ("AST constructor recursion depth mismatch"); hypothesis's plugin imports the
# package in its terminal summary, so it is imported here, at collection.

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("SPECTRUMD_GUEST_DIR", "/var/cache/spectrumd/guest"))


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="spt.", dir="/tmp"))
    # Searchable, as /var/lib is: a crosvm (its own uid) reaches its run directory.
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def dbus_address(short_tmp: Path) -> Iterator[str]:
    """A private session-type dbus-daemon, ended by pid at the end."""
    yield from dbus_daemon(["--session", f"--address=unix:path={short_tmp / 'bus'}"])


def dbus_daemon(args: list[str]) -> Iterator[str]:
    """Run ``dbus-daemon ARGS`` in the foreground; yield its address, end it by pid."""
    proc = subprocess.Popen(
        ["dbus-daemon", *args, "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:"), address
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """The embedded default guest, built once (the build script is idempotent)."""
    if not (GUEST_DIR / "vmlinuz").exists() or not (GUEST_DIR / "initramfs.img").exists():
        subprocess.run(["sh", str(ROOT / "guest" / "build.sh"), str(GUEST_DIR)], check=True)
    return GUEST_DIR


class Daemon:
    """A spectrumd child process on the test bus, and a client of it."""

    def __init__(self, address: str, workdir: Path, guest: Path) -> None:
        self.address = address
        self.workdir = workdir
        self.guest = guest
        self.config_path = workdir / "config.json"
        self.state_dir = workdir / "state"
        self.proc: asyncio.subprocess.Process | None = None
        self.client: Client | None = None
        self.stderr_path = workdir / "spectrumd.log"

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(json.dumps(config))

    async def start(
        self,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> Client:
        """Start spectrumd; ``env`` replaces its environment (default: ours).

        ``extra_args`` are added to its command line (e.g. ``--netns NAME``).
        """
        if config is not None:
            self.write_config(config)
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spectrumd",
            "--bus",
            self.address,
            "--config",
            str(self.config_path),
            "--state-dir",
            str(self.state_dir),
            "--guest-dir",
            str(self.guest),
            "--log-level",
            "debug",
            *(extra_args or []),
            stderr=self._stderr,
            env=env,
        )
        bus = await connect(self.address)
        self.client = Client(bus)
        for _ in range(200):
            try:
                await self.client.manager("ListInstances")
                return self.client
            except Exception:
                if self.proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        raise RuntimeError(f"spectrumd did not come up:\n{self.stderr_path.read_text()}")

    async def stop(self) -> int | None:
        if self.client is not None:
            self.client.bus.disconnect()
            self.client = None
        rc = None
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                rc = await self.proc.wait()
        elif self.proc is not None:
            rc = self.proc.returncode
        self.proc = None
        return rc


def kill_leftover_vmms(state_dir: Path) -> None:
    """Last resort for a failed test: end VMMs the daemon under test started.

    Only pids recorded by our own daemon's runs (their run dirs) are touched.
    """
    run = state_dir / "run"
    if not run.exists():
        return
    for pidfile in run.glob("*/*.pid"):
        # Each child recorded itself (pid and start time): only that very process.
        process.end_recorded(pidfile, f"leftover {pidfile.name} of {pidfile.parent.name}")


@pytest.fixture
async def daemon(dbus_address: str, guest_dir: Path, short_tmp: Path) -> AsyncIterator[Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="d.", dir=short_tmp))
    workdir.chmod(0o711)
    d = Daemon(dbus_address, workdir, guest_dir)
    try:
        yield d
    finally:
        await d.stop()
        kill_leftover_vmms(d.state_dir)
        shutil.rmtree(workdir, ignore_errors=True)


def unexpected_failure(reason: str) -> None:
    """``RunContext.fail`` for driver tests, where no part may fail the run."""
    raise AssertionError(f"the run was failed: {reason}")


def proc_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("" when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def readable_tmpdir(prefix: str) -> Iterator[Path]:
    """A new directory under /tmp that every uid may read and search (0755): what a
    confined VMM or file server, of a uid of its own, is given. Removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
