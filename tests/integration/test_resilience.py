"""Faults the daemon must survive: callers that vanish mid-call, a full disk, bad state files.

- A client that disconnects while its StartInstance or StopInstance is in flight:
  the daemon finishes the transition, stays healthy, and its state is consistent.
- A full disk (a 64 KiB tmpfs as the state directory): CreateInstance, DeleteInstance,
  a permanent Grant and its Revoke fail with ``Failed`` naming the file, and both the
  data files and what the daemon reports keep the previous state.
- Truncated or garbage ``grants.json`` / ``instances.json`` at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from spectrumd.bus.grants import GRANT_IFACE
from spectrumd.bus.names import instance_path
from spectrumd.cli.client import Client, connect
from tests.conftest import Daemon
from tests.integration.helpers import app_config, error_of, props, short, vmms, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STOP_LADDER = (
    "the guest shut down after the power button",
    "the vmm exited when asked, after the 3 s stop timeout",
    "vmm terminated with SIGTERM after the 3 s stop timeout",
)


def config() -> dict[str, Any]:
    cfg = app_config("exec sleep 600")
    cfg["defaults"]["stop_timeout"] = 3
    cfg["applications"]["app"]["memory_mib"] = 64
    cfg["resources"]["docs"]["path"] = "/usr/share/doc"
    return cfg


def spectrumctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectrumd.cli", "--bus", d.address, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def qemus_of(run_dir: Path) -> list[int]:
    """The live VMMs of the instance whose run directory is ``run_dir``."""
    pid = vmms(run_dir.parent.parent).get(run_dir.name)
    return [] if pid is None else [pid]


def internal_errors(d: Daemon) -> list[str]:
    return [
        line
        for line in d.stderr_path.read_text(errors="replace").splitlines()
        if line.startswith(("ERROR spectrumd.bus.errors", "ERROR asyncio", "CRITICAL"))
        or "exception was never retrieved" in line
    ]


# -- a client that disconnects mid-call ------------------------------------------------


async def test_client_disconnects_during_stop_and_start(daemon: Daemon) -> None:
    c = await daemon.start(config())
    run_dir = daemon.state_dir.absolute() / "run" / "one"

    # A stop that takes seconds (the guest is not up to hear the power button), asked
    # on a connection that goes away before the reply.
    await c.manager("StartInstance", "s", "one")
    pid = (await props(c, "one"))["MainPID"]
    other = Client(await connect(daemon.address))
    stop = asyncio.ensure_future(other.manager("StopInstance", "s", "one"))
    await wait_for(c, "one", lambda p: p["State"] == "stopping", timeout=5)
    other.bus.disconnect()
    with contextlib.suppress(Exception):
        await stop
    assert not stop.done() or stop.exception() is not None, "the stop replied before it ended"

    p = await wait_for(c, "one", lambda p: p["State"] != "stopping", timeout=30)
    assert (p["State"], p["MainPID"]) == ("stopped", 0), p
    assert p["StateReason"] in STOP_LADDER, p["StateReason"]
    assert not Path(f"/proc/{pid}").exists(), "the VMM outlived the stop"
    assert not run_dir.exists()

    # A start whose caller is gone before the VMM answers: it completes all the same.
    other = Client(await connect(daemon.address))
    start = asyncio.ensure_future(other.manager("StartInstance", "s", "one"))
    await wait_for(c, "one", lambda p: p["State"] == "starting", timeout=5)
    other.bus.disconnect()
    with contextlib.suppress(Exception):
        await start
    p = await wait_for(c, "one", lambda p: p["State"] != "starting", timeout=30)
    assert p["State"] == "running", p
    assert qemus_of(run_dir) == [p["MainPID"]]

    # Healthy: it answers, and the next calls work.
    (rows,) = await c.manager("ListInstances")
    assert [r[2] for r in rows if r[0] == "one"] == ["running"]
    await c.instance_call("one", "Kill")
    p = await props(c, "one")
    assert (p["State"], p["StateReason"], p["MainPID"]) == ("stopped", "killed", 0)
    assert qemus_of(run_dir) == []
    await c.manager("StartInstance", "s", "one")
    await c.instance_call("one", "Kill")
    assert internal_errors(daemon) == []


# -- a full disk ------------------------------------------------------------------------


@pytest.fixture
def small_state_dir(daemon: Daemon) -> Iterator[Path]:
    """The daemon's state directory on a 64 KiB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = daemon.state_dir
    d.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0750", "tmpfs", str(d)], check=True
    )
    try:
        yield d
    finally:
        # The daemon must be gone first, or the mount is busy.
        if daemon.proc is not None and daemon.proc.returncode is None:
            daemon.proc.kill()
        r = subprocess.run(["umount", str(d)], check=False)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(d)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0, "the file system is not full"
    return filler


async def test_full_disk_keeps_the_previous_state(daemon: Daemon, small_state_dir: Path) -> None:
    c = await daemon.start(config())
    data = small_state_dir / "instances.json"
    grants_file = small_state_dir / "grants.json"

    (path,) = await c.manager("CreateInstance", "ssasa{sv}", "first", "app", ["docs"], {})
    assert path == instance_path("first")
    before = data.read_text()
    assert set(json.loads(before)["instances"]) == {"first"}
    permanent = {"lifetime": Variant("s", "permanent")}
    (g1,) = await c.manager("Grant", "ssa{sv}", "first", "docs", permanent)
    grants_before = grants_file.read_text()
    assert len(json.loads(grants_before)["grants"]) == 1

    filler = fill(small_state_dir)
    try:
        # CreateInstance: refused with Failed naming the data file; nothing changed.
        e = await error_of(c.manager("CreateInstance", "ssasa{sv}", "second", "app", [], {}))
        assert short(e.name) == "Failed", (e.name, e.message)
        assert str(data) in e.message and "No space left on device" in e.message, e.message
        assert data.read_text() == before
        (rows,) = await c.manager("ListInstances")
        assert sorted(r[0] for r in rows) == ["first", "one"]

        # DeleteInstance: the same, and the instance stays.
        e = await error_of(c.manager("DeleteInstance", "s", "first"))
        assert short(e.name) == "Failed" and str(data) in e.message, (e.name, e.message)
        assert data.read_text() == before
        (rows,) = await c.manager("ListInstances")
        assert sorted(r[0] for r in rows) == ["first", "one"]

        # A permanent grant: Failed naming grants.json; the file and the list unchanged.
        e = await error_of(c.manager("Grant", "ssa{sv}", "one", "docs", permanent))
        assert short(e.name) == "Failed", (e.name, e.message)
        assert str(grants_file) in e.message, e.message
        assert grants_file.read_text() == grants_before
        (grants,) = await c.manager("ListGrants")
        assert [g[5] for g in grants] == [g1]

        # Revoking the permanent grant cannot be persisted either: it must fail and the
        # grant must stay, in the file and in what the daemon reports.
        e = await error_of(c.call(g1, GRANT_IFACE, "Revoke"))
        assert short(e.name) == "Failed" and str(grants_file) in e.message, (e.name, e.message)
        assert grants_file.read_text() == grants_before
        (grants,) = await c.manager("ListGrants")
        assert [g[5] for g in grants] == [g1], "the daemon forgot a grant its file still holds"

        # Reads still work, from spectrumctl too.
        r = spectrumctl(daemon, "list")
        assert r.returncode == 0, r.stderr
        assert "first" in r.stdout and "one" in r.stdout

        # The failed writes left no half-written temporary files behind.
        leftovers = sorted(p.name for p in small_state_dir.iterdir() if p.name.endswith(".tmp"))
        assert leftovers == [], f"temporary files left on the full disk: {leftovers}"
    finally:
        filler.unlink()

    # With room again, the same calls succeed.
    await c.manager("CreateInstance", "ssasa{sv}", "second", "app", [], {})
    assert set(json.loads(data.read_text())["instances"]) == {"first", "second"}
    assert internal_errors(daemon) == []
    assert await daemon.stop() == 0


# -- bad state files at start -------------------------------------------------------------

GOOD_GRANT = {
    "id": "0a0b0c0d",
    "instance": "one",
    "resource": "docs",
    "access": "ro",
    "lifetime": "permanent",
    "expires_at_us": 0,
    "origin": "user",
}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"version": 1, "grants": [{"id": "0a0b', id="truncated"),
        pytest.param(b"\x00\xff\xfe garbage \x80", id="binary"),
        pytest.param(b'{"version": 1, "grants": {"not": "a list"}}', id="wrong-shape"),
    ],
)
async def test_unreadable_grants_file_is_logged_and_the_daemon_starts(
    daemon: Daemon, content: bytes
) -> None:
    daemon.state_dir.mkdir(parents=True)
    (daemon.state_dir / "grants.json").write_bytes(content)
    c = await daemon.start(config())
    assert await c.manager("ListGrants") == [[]]
    (rows,) = await c.manager("ListInstances")
    assert [r[0] for r in rows] == ["one"]
    log = daemon.stderr_path.read_text(errors="replace")
    assert f"cannot read {daemon.state_dir.absolute() / 'grants.json'}" in log, log[-2000:]
    # It still works: a new permanent grant is written as a good file.
    permanent = {"lifetime": Variant("s", "permanent")}
    await c.manager("Grant", "ssa{sv}", "one", "docs", permanent)
    saved = json.loads((daemon.state_dir / "grants.json").read_text())
    assert [g["resource"] for g in saved["grants"]] == ["docs"]


async def test_bad_entries_in_grants_file_are_skipped_and_the_rest_recovered(
    daemon: Daemon,
) -> None:
    daemon.state_dir.mkdir(parents=True)
    body = {"version": 1, "grants": [{"id": "deadbeef"}, "not an object", GOOD_GRANT, 17]}
    (daemon.state_dir / "grants.json").write_text(json.dumps(body))
    c = await daemon.start(config())
    (grants,) = await c.manager("ListGrants")
    assert [list(g[:5]) for g in grants] == [["0a0b0c0d", "one", "docs", "ro", "permanent"]]
    log = daemon.stderr_path.read_text(errors="replace")
    assert log.count("skipping a bad entry in") == 3, log[-2000:]


def run_daemon_once(d: Daemon) -> subprocess.CompletedProcess[str]:
    """spectrumd in the foreground; it is expected to refuse to start."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "spectrumd",
            "--bus",
            d.address,
            "--config",
            str(d.config_path),
            "--state-dir",
            str(d.state_dir),
            "--guest-dir",
            str(d.guest),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            '{"version": 1, "instances": {"scratch": {"applic',
            "instances.json:1:42: invalid JSON: Unterminated string",
            id="truncated",
        ),
        pytest.param("\x00garbage", "instances.json:1:1: invalid JSON", id="garbage"),
        pytest.param(
            '{"version": 1, "instances": {"scratch": {"application": "gone"}}}',
            'data.instances.scratch.application: no application "gone"',
            id="stale-reference",
        ),
    ],
)
async def test_unreadable_instances_file_at_start(
    daemon: Daemon, content: str, message: str
) -> None:
    """A bad data file does not keep the daemon from starting: it logs what it could not
    read, keeps the file aside for a person, and serves the configured instances."""
    daemon.write_config(config())
    daemon.state_dir.mkdir(parents=True)
    (daemon.state_dir / "instances.json").write_text(content)
    c = await daemon.start()
    (rows,) = await c.manager("ListInstances")
    assert sorted(r[0] for r in rows) == sorted(config()["instances"])
    log = daemon.stderr_path.read_text()
    assert "cannot use the run-time instances" in log and message in log, log[-2000:]
    kept = list(daemon.state_dir.glob("instances.json.bad-*"))
    assert len(kept) == 1 and kept[0].read_text() == content
    assert not (daemon.state_dir / "instances.json").exists()
