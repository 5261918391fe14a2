"""Runtime grants through the real daemon: management grants, requests and the agent."""

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from spectrumd.bus.names import MANAGER_PATH
from spectrumd.cli.client import Client, connect
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
from tests.integration.test_restart import kill_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

AGENT_IFACE = "org.spectrum_os.Spectrum1.Agent"
GRANT_IFACE = "org.spectrum_os.Spectrum1.Grant"
REQUEST_IFACE = "org.spectrum_os.Spectrum1.Request"
# The guest prints what its file mount holds, and any granted marker file, twice a second.
LISTER = (
    "while true; do echo \"ls: $(ls /mnt/spectrum | tr '\\n' ' ')\"; "
    "cat /mnt/spectrum/*/marker 2>/dev/null; sleep 0.5; done"
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with marked_dir("grant.", "marker-from-the-host") as d:
        yield d


class ScriptedAgent(ServiceInterface):
    def __init__(self, answer: bool | None) -> None:
        super().__init__(AGENT_IFACE)
        self.answer = answer  # None: never answer
        self.asked: list[list[Any]] = []
        self.cancelled: list[str] = []

    @dbus_method()
    async def Confirm(
        self,
        request_id: DBusStr,
        instance: DBusStr,
        application: DBusStr,
        resource: DBusStr,
        access: DBusStr,
        lifetime: DBusStr,
        details: Annotated[dict[str, Variant], DBusSignature("a{sv}")],
    ) -> Annotated[list[Any], DBusSignature("bs")]:
        self.asked.append([request_id, instance, application, resource, access, lifetime])
        if self.answer is None:
            await asyncio.sleep(3600)
        return [self.answer, lifetime]

    @dbus_method()
    def Cancel(self, request_id: DBusStr) -> None:
        self.cancelled.append(request_id)


async def register_agent(address: str, answer: bool | None) -> tuple[Client, ScriptedAgent]:
    c = Client(await connect(address))
    agent = ScriptedAgent(answer)
    c.bus.export("/test/agent", agent)
    await c.manager("RegisterAgent", "o", "/test/agent")
    return c, agent


async def response_of(c: Client, req_path: str, timeout: float = 20) -> tuple[int, dict[str, Any]]:
    """Wait for the request's answer (the Code property covers a signal already gone by)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (code,) = await c.call(
            req_path, "org.freedesktop.DBus.Properties", "Get", "ss", [REQUEST_IFACE, "Code"]
        )
        if code.value >= 0:
            (reason,) = await c.call(
                req_path, "org.freedesktop.DBus.Properties", "Get", "ss", [REQUEST_IFACE, "Reason"]
            )
            return code.value, {"reason": reason.value}
        await asyncio.sleep(0.05)
    raise AssertionError("no response")


async def output_after(log: Path, settle: float, window: float) -> str:
    """What the guest printed during ``window`` seconds, after ``settle`` seconds for
    output already on its way (the console is slow under TCG) to land."""
    await asyncio.sleep(settle)
    mark = log.stat().st_size
    await asyncio.sleep(window)
    return log.read_bytes()[mark:].decode(errors="replace")


async def test_management_grant_appears_is_revoked_and_expires(
    daemon: Daemon, shared_dir: Path
) -> None:
    c = await daemon.start(app_config(LISTER))
    rec = await SignalRecorder().attach(c)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_for(c, "one", lambda p: p["GuestReady"])
    await wait_log(log, "ls: ")

    (path,) = await c.manager("Grant", "ssa{sv}", "one", str(shared_dir), {})
    (rows,) = await c.manager("ListGrants")
    gid = path.rsplit("/", 1)[1]
    assert [list(r) for r in rows] == [[gid, "one", str(shared_dir), "ro", "running", path]]
    await wait_log(log, "marker-from-the-host")
    entry = shared_dir.name
    # (The grant may have come between a round's ls and its cat: the next ls.)
    await wait_log(log, f"ls: {entry}", timeout=5)

    await c.call(path, GRANT_IFACE, "Revoke")
    (rows,) = await c.manager("ListGrants")
    assert rows == []
    after = await output_after(log, settle=2.0, window=2.5)
    assert "ls: " in after and entry not in after, after[-500:]
    assert "marker-from-the-host" not in after
    events = rec.object_events()
    assert ("InterfacesAdded", MANAGER_PATH, path) in events
    assert ("InterfacesRemoved", MANAGER_PATH, path) in events

    # A short "until" grant ends by itself.
    (path,) = await c.manager(
        "Grant", "ssa{sv}", "one", str(shared_dir), {"duration": Variant("t", 2)}
    )
    await wait_log(log, "marker-from-the-host", timeout=10)
    await asyncio.sleep(2.5)
    (rows,) = await c.manager("ListGrants")
    assert rows == []
    after = await output_after(log, settle=2.0, window=2.5)
    assert "ls: " in after and "marker-from-the-host" not in after, after[-500:]
    await c.instance_call("one", "Kill")


async def test_requests_and_the_agent(daemon: Daemon, shared_dir: Path) -> None:
    c = await daemon.start(app_config("exec sleep 600"))
    await c.manager("StartInstance", "s", "one")

    # No agent: the request ends at once with code 2 and a reason.
    (req,) = await c.manager("RequestGrant", "ssa{sv}", "one", str(shared_dir), {})
    code, res = await response_of(c, req)
    assert code == 2 and "no agent" in res["reason"]

    # An approving agent: a grant exists, made by request.
    agent_client, agent = await register_agent(daemon.address, True)
    (req,) = await c.manager("RequestGrant", "ssa{sv}", "one", str(shared_dir), {})
    code, _ = await response_of(c, req)
    assert code == 0
    assert agent.asked[-1][1:] == ["one", "app", str(shared_dir), "ro", "running"]
    (rows,) = await c.manager("ListGrants")
    assert len(rows) == 1
    (origin,) = await c.call(
        rows[0][5], "org.freedesktop.DBus.Properties", "Get", "ss", [GRANT_IFACE, "Origin"]
    )
    assert origin.value == "request"

    # A second agent is refused while the first is there.
    e = await error_of(c.manager("RegisterAgent", "o", "/x"))
    assert short(e.name) == "Busy"

    # A denial is code 1.
    agent.answer = False
    (req,) = await c.manager("RequestGrant", "ssa{sv}", "one", str(shared_dir), {})
    code, res = await response_of(c, req)
    assert (code, res["reason"]) == (1, "denied by the user")

    # One pending request per instance; the agent disconnecting ends it with code 2.
    agent.answer = None
    (req,) = await c.manager("RequestGrant", "ssa{sv}", "one", str(shared_dir), {})
    await asyncio.sleep(0.3)
    e = await error_of(c.manager("RequestGrant", "ssa{sv}", "one", str(shared_dir), {}))
    assert short(e.name) == "Busy"
    agent_client.bus.disconnect()
    with contextlib.suppress(Exception):
        await agent_client.bus.wait_for_disconnect()
    code, res = await response_of(c, req)
    assert code == 2 and "disconnected" in res["reason"]
    await c.instance_call("one", "Kill")


async def test_permanent_grant_survives_restart_and_is_reapplied(
    daemon: Daemon, shared_dir: Path
) -> None:
    c = await daemon.start(app_config(LISTER))
    (path,) = await c.manager(
        "Grant",
        "ssa{sv}",
        "one",
        str(shared_dir),
        {"lifetime": Variant("s", "permanent"), "access": Variant("s", "ro")},
    )
    (state,) = await c.call(
        path, "org.freedesktop.DBus.Properties", "Get", "ss", [GRANT_IFACE, "State"]
    )
    assert state.value == "waiting"
    await daemon.stop()
    c = await daemon.start()
    (rows,) = await c.manager("ListGrants")
    assert [r[5] for r in rows] == [path]
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_log(log, "marker-from-the-host")
    await c.instance_call("one", "Kill")
    await asyncio.sleep(0.2)
    (rows,) = await c.manager("ListGrants")
    assert len(rows) == 1, "a permanent grant outlives a stop"


async def grant_state(c: Client, path: str) -> str:
    (state,) = await c.call(
        path, "org.freedesktop.DBus.Properties", "Get", "ss", [GRANT_IFACE, "State"]
    )
    return str(state.value)


async def test_a_grant_is_active_on_an_instance_re_adopted_paused(
    daemon: Daemon, shared_dir: Path
) -> None:
    c = await daemon.start(app_config(LISTER))
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_for(c, "one", lambda p: p["GuestReady"], timeout=90)
    (path,) = await c.manager("Grant", "ssa{sv}", "one", str(shared_dir), {})
    await wait_log(log, "marker-from-the-host")
    await c.instance_call("one", "Pause")
    await kill_daemon(daemon)

    c = await daemon.start()
    assert (await props(c, "one"))["State"] == "paused"
    # The VM taken back paused is up: its grant is applied, not left waiting for a Resume.
    deadline = time.monotonic() + 10
    while (state := await grant_state(c, path)) != "active":
        assert time.monotonic() < deadline, f"the grant is {state}"
        await asyncio.sleep(0.1)
    await c.instance_call("one", "Resume")
    assert "marker-from-the-host" in await output_after(log, 1.0, 2.0)
    await c.instance_call("one", "Kill")


async def test_bad_grants_are_named(daemon: Daemon, shared_dir: Path) -> None:
    c = await daemon.start(app_config("exec sleep 600"))
    cases = [
        (("nope", str(shared_dir), {}), "NoSuchInstance", 'no instance "nope"'),
        (("one", "docs-x", {}), "NoSuchResource", 'no resource "docs-x"'),
        (("one", "relative/path", {}), "NoSuchResource", "no resource"),
        (
            ("one", "/nonexistent/dir", {"lifetime": Variant("s", "permanent")}),
            "InvalidArgument",
            "No such file",
        ),
        (
            ("one", str(shared_dir / "marker"), {"lifetime": Variant("s", "permanent")}),
            "InvalidArgument",
            "not a directory",
        ),
        (
            ("one", str(shared_dir), {"expires_at": Variant("t", 1)}),
            "InvalidArgument",
            "in the past",
        ),
        (
            ("one", str(shared_dir), {"access": Variant("s", "rwx")}),
            "InvalidArgument",
            "not ro or rw",
        ),
        (("one", str(shared_dir) + "/../x", {}), "InvalidArgument", "not a canonical path"),
        (("one", str(shared_dir), {}), "InvalidState", "only a permanent grant can wait"),
    ]
    for args, name, text in cases:
        e = await error_of(c.manager("Grant", "ssa{sv}", *args))
        assert short(e.name) == name, (args, e.name, e.message)
        assert text in e.message, (args, e.message)
    assert os.listdir(daemon.state_dir).count("grants.json") == 0, "nothing was persisted"


async def test_guest_asks_through_its_portal(daemon: Daemon, shared_dir: Path) -> None:
    asker = (
        f'p=$(spectrum-request dir {shared_dir} --lifetime running); echo "first rc=$? $p"; '
        'cat "$p/marker"; '
        # Ask again once the host says so (after its agent changed its mind).
        'until [ -e "$p/ask-again" ]; do sleep 0.2; done; '
        f'spectrum-request dir {shared_dir}; echo "second rc=$?"; '
        # A second request while one is pending (the port opens once).
        'until [ -e "$p/ask-twice" ]; do sleep 0.2; done; '
        f"spectrum-request dir {shared_dir} & sleep 2; "
        f'spectrum-request dir {shared_dir}; echo "third rc=$?"; exec sleep 600'
    )
    c = await daemon.start(app_config(asker))
    _agent_client, agent = await register_agent(daemon.address, True)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    # The first request is approved: the guest gets the path and reads the file.
    text = await wait_log(log, "first rc=", timeout=90)
    assert f"first rc=0 /mnt/spectrum/{shared_dir.name}" in text
    await wait_log(log, "marker-from-the-host")
    assert agent.asked[0][1:] == ["one", "app", str(shared_dir), "ro", "running"]
    # The grant names the request as its origin and the instance by its path.
    (rows,) = await c.manager("ListGrants")
    assert [r[1] for r in rows] == ["one"]
    agent.answer = False
    (shared_dir / "ask-again").touch()
    text = await wait_log(log, "second rc=", timeout=60)
    assert "second rc=1" in text, "a denial is exit status 1 in the guest"
    assert "spectrum-request: denied by the user" in text
    agent.answer = None  # the next question stays open
    (shared_dir / "ask-twice").touch()
    text = await wait_log(log, "third rc=", timeout=60)
    assert "third rc=2" in text, "a request that cannot be sent is not a denial"
    assert "spectrum-request: cannot open /dev/vport" in text
    await c.instance_call("one", "Kill")
    await asyncio.sleep(0.3)
    (rows,) = await c.manager("ListGrants")
    assert rows == [], "running grants end with the instance"


async def test_spectrumctl_agent_asks_at_its_terminal(daemon: Daemon, shared_dir: Path) -> None:
    c = await daemon.start(app_config("exec sleep 600"))
    await c.manager("StartInstance", "s", "one")
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spectrumd.cli",
        "--bus",
        daemon.address,
        "agent",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None and agent.stdin is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 20)
        assert b"confirming requests here" in line
        (req,) = await c.manager("RequestGrant", "ssa{sv}", "one", str(shared_dir), {})
        question = await asyncio.wait_for(agent.stdout.readuntil(b"Allow? [y/N] "), 20)
        assert f"one (app) asks for '{shared_dir}', read-only, running.".encode() in question
        agent.stdin.write(b"y\n")
        await agent.stdin.drain()
        code, _ = await response_of(c, req)
        assert code == 0
        (req,) = await c.manager("RequestGrant", "ssa{sv}", "one", "/tmp", {})
        await asyncio.wait_for(agent.stdout.readuntil(b"Allow? [y/N] "), 20)
        agent.stdin.write(b"n\n")
        await agent.stdin.drain()
        code, res = await response_of(c, req)
        assert (code, res["reason"]) == (1, "denied by the user")
    finally:
        agent.kill()
        await agent.wait()
    await c.instance_call("one", "Kill")
