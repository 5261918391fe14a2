"""Granted paths through the real daemon: a symlink in any component is refused, and a
permanent grant is resolved again at every start.

The attacker is whoever names the path (a bus caller, a guest through its portal):
a path that reaches another directory through a symlink must be refused with
InvalidArgument naming the component, and nothing exported.
"""

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Variant

from spectrumd.cli.client import Client
from tests.conftest import Daemon
from tests.integration.helpers import app_config, error_of, marked_dir, props, short, wait_log
from tests.integration.test_grants import GRANT_IFACE, LISTER, output_after, register_agent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def secret_dir() -> Iterator[Path]:
    """Stands for /etc: what the attacker wants to reach through a symlink."""
    with marked_dir("secret.", "the-secret-marker") as d:
        (d / "ssh").mkdir(mode=0o755)
        (d / "ssh" / "marker").write_text("the-secret-marker\n")
        yield d


@pytest.fixture
def home() -> Iterator[Path]:
    with marked_dir("home.", "marker-from-home") as d:
        yield d


async def grant_state(c: Client, path: str) -> str:
    (state,) = await c.call(
        path, "org.freedesktop.DBus.Properties", "Get", "ss", [GRANT_IFACE, "State"]
    )
    return str(state.value)


async def test_a_symlink_in_a_middle_component_is_refused_naming_it(
    daemon: Daemon, home: Path, secret_dir: Path
) -> None:
    (home / "link").symlink_to(secret_dir)
    sneaky = home / "link" / "ssh"  # /home/u/link/ssh with link -> /etc
    asker = f'spectrum-request dir {sneaky}; echo "request rc=$?"; {LISTER}'
    c = await daemon.start(app_config(asker))
    _agent_client, agent = await register_agent(daemon.address, True)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    component = f'component "{home / "link"}" is a symbolic link'

    # The guest, through its portal: answered "ended", the agent never asked.
    text = await wait_log(log, "request rc=", timeout=90)
    assert "request rc=2" in text
    assert "symbolic link" in text, text[-1000:]
    # A bus caller, by Grant and by RequestGrant.
    for method in ("Grant", "RequestGrant"):
        e = await error_of(c.manager(method, "ssa{sv}", "one", str(sneaky), {}))
        assert short(e.name) == "InvalidArgument", (method, e.name, e.message)
        assert component in e.message, (method, e.message)
    assert agent.asked == []
    (rows,) = await c.manager("ListGrants")
    assert rows == [], "nothing was granted"
    after = await output_after(log, settle=2.0, window=2.0)
    assert "ls: " in after and "ssh" not in after, after[-500:]
    assert "the-secret-marker" not in log.read_text()
    await c.instance_call("one", "Kill")


async def test_a_permanent_grant_whose_path_became_a_symlink_is_not_applied(
    daemon: Daemon, home: Path, secret_dir: Path
) -> None:
    docs = home / "docs"
    docs.mkdir(mode=0o755)
    (docs / "marker").write_text("marker-from-docs\n")
    c = await daemon.start(app_config(LISTER))
    (path,) = await c.manager(
        "Grant", "ssa{sv}", "one", str(docs), {"lifetime": Variant("s", "permanent")}
    )
    assert await grant_state(c, path) == "waiting"

    # While the instance is stopped, someone with write access to home swaps docs
    # for a symlink to the secret directory.
    docs.rename(home / "docs-moved")
    docs.symlink_to(secret_dir)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_log(log, "ls: ", timeout=90)
    deadline = time.monotonic() + 20
    warning = f"grant {path.rsplit('/', 1)[1]} is not applied"
    while warning not in daemon.stderr_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "no warning that the grant was not applied"
        await asyncio.sleep(0.2)
    assert f'component "{docs}" is a symbolic link' in daemon.stderr_path.read_text()
    assert await grant_state(c, path) == "waiting"
    after = await output_after(log, settle=2.0, window=2.0)
    assert "ls: " in after and "docs" not in after, after[-500:]
    assert "the-secret-marker" not in log.read_text()
    await c.instance_call("one", "Kill")
    await asyncio.sleep(0.3)

    # Put back, the grant applies again at the next start: it was kept, waiting.
    docs.unlink()
    (home / "docs-moved").rename(docs)
    await c.manager("StartInstance", "s", "one")
    await wait_log(log, "marker-from-docs", timeout=90)
    assert await grant_state(c, path) == "active"
    assert "the-secret-marker" not in log.read_text()
    await c.instance_call("one", "Kill")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_an_active_grant_whose_path_is_swapped_is_withdrawn_and_fds_are_not_leaked(
    daemon: Daemon, home: Path, secret_dir: Path
) -> None:
    docs = home / "docs"
    docs.mkdir(mode=0o755)
    (docs / "marker").write_text("marker-from-docs\n")
    c = await daemon.start(app_config(LISTER))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    # Refused and ended requests, and grants made and revoked, leave no descriptor.
    before = fd_count(pid)
    for _ in range(20):
        (p,) = await c.manager(
            "Grant", "ssa{sv}", "one", str(docs), {"lifetime": Variant("s", "permanent")}
        )
        await c.call(p, GRANT_IFACE, "Revoke")
        await error_of(c.manager("Grant", "ssa{sv}", "one", str(home / "nope"), {}))
        await c.manager("RequestGrant", "ssa{sv}", "one", str(docs), {})  # no agent: ends
    await asyncio.sleep(0.5)
    assert fd_count(pid) <= before + 2, (before, fd_count(pid))

    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_log(log, "ls: ", timeout=90)
    (path,) = await c.manager("Grant", "ssa{sv}", "one", str(docs), {})
    await wait_log(log, "marker-from-docs", timeout=20)
    assert await grant_state(c, path) == "active"
    # Swapped while the grant is active; the next change of the instance's exports
    # (here: another grant) finds that the path no longer names the granted inode.
    docs.rename(home / "docs-moved")
    docs.symlink_to(secret_dir)
    await c.manager("Grant", "ssa{sv}", "one", str(home), {})
    await wait_log(log, "marker-from-home", timeout=20)
    assert await grant_state(c, path) == "waiting"
    assert "no longer names the directory that was granted" in daemon.stderr_path.read_text()
    after = await output_after(log, settle=2.0, window=2.0)
    assert "ls: " in after and "docs" not in after, after[-500:]
    assert "the-secret-marker" not in log.read_text()
    await c.instance_call("one", "Kill")
