"""Networks on real guests and real netlink, inside a namespace each test makes.

Every test runs spectrumd (or its NetworkService) with ``--netns`` set to a
namespace created here and deleted in ``finally``: nothing touches the host's
own interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrumd.bus.names import INSTANCE_IFACE
from spectrumd.errors import Busy, InvalidArgument, InvalidState
from spectrumd.host import names
from spectrumd.host.network import HostNetworks
from spectrumd.model.types import (
    Accel,
    Application,
    InstanceDef,
    NetworkResource,
    Resource,
    VmmKind,
)
from spectrumd.supervisor.networks import NetworkService
from spectrumd.supervisor.resources import RunContext
from tests.conftest import Daemon, kill_leftover_vmms, unexpected_failure
from tests.integration.helpers import error_of, props, short, wait_for, wait_log_any

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"spt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def links(ns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "-d", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def ours(ns: str) -> set[str]:
    """Links of spectrumd's name pattern (owned or not)."""
    return {name for name in links(ns) if names.OWNED_NAME.fullmatch(name)}


def addresses(ns: str, dev: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "addr", "show", "dev", dev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if a.get("scope") == "global"
    ]


def foreign_link(ns: str, name: str) -> None:
    """An interface of our name pattern that spectrumd does not own (no alias).

    For a tap name, a persistent tap: without IFF_TUN_EXCL, TUNSETIFF would
    quietly attach to it.
    """
    if name.startswith(names.TAP_PREFIX):
        cmd = ["ip", "-n", ns, "tuntap", "add", "dev", name, "mode", "tap"]
    else:
        cmd = ["ip", "-n", ns, "link", "add", name, "type", "bridge"]
    subprocess.run(cmd, check=True)


def tap(instance: str, network: str) -> str:
    return names.tap_name(instance, network)


def bridge(network: str) -> str:
    return names.bridge_name(network)


# -- the driver alone (no VM) -------------------------------------------------


def run_context(
    name: str, resources: list[Resource], stack: contextlib.AsyncExitStack
) -> RunContext:
    return RunContext(
        name=name,
        definition=InstanceDef(
            name=name,
            application="app",
            resources=tuple(r.name for r in resources),
            vmm=VmmKind.qemu,
            accel=Accel.tcg,
            stop_timeout=1,
        ),
        application=Application(name="app", command="true"),
        resources=tuple(resources),
        run_dir=Path("/nonexistent"),
        stack=stack,
        conns=contextlib.AsyncExitStack(),
        fail=unexpected_failure,
        log=logging.getLogger(name),
    )


@pytest.fixture
async def driver(netns: str) -> AsyncIterator[NetworkService]:
    d = NetworkService(HostNetworks(netns=netns))
    await d.host.start()
    try:
        yield d
    finally:
        await d.host.close()


A = NetworkResource("neta")
B = NetworkResource("netb", host_address="10.9.1.1/24")


async def test_driver_taps_bridges_host_address_and_teardown(
    driver: NetworkService, netns: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        ctx = run_context("one", [A, B], stack)
        await driver.prepare(ctx)
        assert [n.tap_name for n in ctx.nets] == [tap("one", "neta"), tap("one", "netb")]
        assert [n.mac for n in ctx.nets] == [
            names.mac_address("one", "neta"),
            names.mac_address("one", "netb"),
        ]
        found = links(netns)
        assert ours(netns) == {
            tap("one", "neta"),
            tap("one", "netb"),
            bridge("neta"),
            bridge("netb"),
        }
        assert found[tap("one", "neta")]["master"] == bridge("neta")
        assert found[tap("one", "netb")]["master"] == bridge("netb")
        assert found[tap("one", "neta")]["ifalias"] == "spectrumd tap one neta"
        assert addresses(netns, bridge("netb")) == ["10.9.1.1/24"]
        assert addresses(netns, bridge("neta")) == []
        assert driver.interfaces("one") == [
            ("neta", tap("one", "neta"), names.mac_address("one", "neta")),
            ("netb", tap("one", "netb"), names.mac_address("one", "netb")),
        ]
    assert ours(netns) == set()
    assert driver.interfaces("one") == []


async def test_driver_hot_add_remove_and_bad_calls(driver: NetworkService, netns: str) -> None:
    with pytest.raises(InvalidState, match="not running"):
        await driver.host.attach("one", A)
    async with contextlib.AsyncExitStack() as stack:
        await driver.prepare(run_context("one", [A], stack))
        t = await driver.host.attach("one", B)
        assert t.name == tap("one", "netb")
        assert t.mac == names.mac_address("one", "netb") and t.fd >= 0
        assert links(netns)[t.name]["master"] == bridge("netb")
        with pytest.raises(InvalidArgument, match="already on network netb"):
            await driver.host.attach("one", B)
        with pytest.raises(InvalidArgument, match="host_address"):
            await driver.host.attach("one", NetworkResource("netc", host_address="10.9.2.1"))
        await driver.host.detach("one", "netb")
        assert ours(netns) == {tap("one", "neta"), bridge("neta")}
        with pytest.raises(InvalidArgument, match="not on network netb"):
            await driver.host.detach("one", "netb")
        # A hot-added tap that is never detached goes with the run.
        await driver.host.attach("one", B)
    assert ours(netns) == set()


async def test_driver_refuses_foreign_names_and_leaves_nothing(
    driver: NetworkService, netns: str
) -> None:
    # The second of two networks fails: its tap name is someone else's.
    foreign_link(netns, tap("one", "netb"))
    async with contextlib.AsyncExitStack() as stack:
        ctx = run_context("one", [A, B], stack)
        with pytest.raises(Busy, match=tap("one", "netb")) as e:
            await driver.prepare(ctx)
        assert "does not own it" in str(e.value)
    assert ours(netns) == {tap("one", "netb")}  # only the foreign one
    # A bridge name taken by someone else.
    foreign_link(netns, bridge("netc"))
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(Busy, match=bridge("netc")):
            await driver.prepare(run_context("two", [A, NetworkResource("netc")], stack))
    assert ours(netns) == {tap("one", "netb"), bridge("netc")}
    # The names are free again for a start that works.
    async with contextlib.AsyncExitStack() as stack:
        await driver.prepare(run_context("two", [A], stack))
        assert ours(netns) == {
            tap("one", "netb"),
            bridge("netc"),
            tap("two", "neta"),
            bridge("neta"),
        }


async def test_driver_cancelled_start_leaves_nothing(driver: NetworkService, netns: str) -> None:
    """A Kill during a start cancels prepare() wherever it is."""
    for delay in [i * 0.0015 for i in range(20)]:
        async with contextlib.AsyncExitStack() as stack:
            ctx = run_context("one", [A, B, NetworkResource("netc")], stack)
            task = asyncio.ensure_future(driver.prepare(ctx))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert ours(netns) == set(), (delay, links(netns))
        assert driver.interfaces("one") == []


async def test_driver_start_removes_stale_links_only(netns: str) -> None:
    crashed = NetworkService(HostNetworks(netns=netns))
    await crashed.host.start()
    stack = contextlib.AsyncExitStack()
    await crashed.prepare(run_context("one", [A, B], stack))
    foreign_link(netns, names.tap_name("x", "y"))
    before = ours(netns)
    assert len(before) == 5
    # A new daemon, while the links of the old one (which did not stop) remain.
    fresh = HostNetworks(netns=netns)
    await fresh.start()
    try:
        assert ours(netns) == {names.tap_name("x", "y")}
    finally:
        await fresh.close()
        await stack.aclose()  # the old one's teardown finds its links gone
        await crashed.host.close()
    assert ours(netns) == {names.tap_name("x", "y")}


# -- the daemon ---------------------------------------------------------------


def up(addr: str, dev: str = "eth0") -> str:
    return f"ip link set {dev} up; ip addr add {addr}/24 dev {dev}; "


def until_ping(addr: str, marker: str) -> str:
    return (
        f"i=0; until ping -c 1 -W 1 {addr} >/dev/null 2>&1; do i=$((i+1)); "
        f"[ $i -ge 60 ] && break; done; [ $i -lt 60 ] && echo {marker}-YES || echo {marker}-NO; "
    )


def net_config(commands: dict[str, str], instances: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": 10},
        "applications": {
            name: {"command": command, "memory_mib": 128} for name, command in commands.items()
        },
        "resources": {
            "neta": {"type": "network"},
            "netb": {"type": "network", "host_address": "10.9.0.1/24"},
            "netc": {"type": "network", "host_address": "10.9.2.1/24"},
        },
        "instances": {
            name: {"application": name, "resources": res} for name, res in instances.items()
        },
    }


async def test_guests_ping_on_one_network_not_across_and_links_go_away(
    daemon: Daemon, netns: str
) -> None:
    commands = {
        "a1": up("10.9.0.2")
        + "echo MAC=$(cat /sys/class/net/eth0/address); "
        + until_ping("10.9.0.3", "PEER")
        + "exec sleep 3600",
        "a2": up("10.9.0.3") + "exec sleep 3600",
        # The host at 10.9.0.1 is on netb (host_address): b1's network works,
        # but the instances of neta, in the same subnet, are out of reach.
        "b1": up("10.9.0.4")
        + until_ping("10.9.0.1", "HOST")
        + "if ping -c 2 -W 1 10.9.0.2 >/dev/null || ping -c 2 -W 1 10.9.0.3 >/dev/null; "
        + "then echo NETA-REACHED; else echo NETA-ISOLATED; fi; exec sleep 3600",
    }
    config = net_config(commands, {"a1": ["neta"], "a2": ["neta"], "b1": ["netb"]})
    args = ["--netns", netns]
    c = await daemon.start(config, extra_args=args)
    await asyncio.gather(*(c.manager("StartInstance", "s", n) for n in ("a1", "a2", "b1")))
    assert ours(netns) == {
        tap("a1", "neta"),
        tap("a2", "neta"),
        tap("b1", "netb"),
        bridge("neta"),
        bridge("netb"),
    }
    assert addresses(netns, bridge("netb")) == ["10.9.0.1/24"]
    logs = {n: Path((await props(c, n))["ConsoleLog"]) for n in ("a1", "b1")}
    a1_log = await wait_log_any(logs["a1"], ("PEER-YES", "PEER-NO"), timeout=120)
    assert "PEER-YES" in a1_log, a1_log[-2000:]
    assert f"MAC={names.mac_address('a1', 'neta')}" in a1_log, a1_log[-2000:]
    b1_log = await wait_log_any(logs["b1"], ("NETA-REACHED", "NETA-ISOLATED"), timeout=120)
    assert "HOST-YES" in b1_log and "NETA-ISOLATED" in b1_log, b1_log[-2000:]

    await c.manager("StopInstance", "s", "a2")
    assert tap("a2", "neta") not in links(netns)
    assert {tap("a1", "neta"), bridge("neta")} <= ours(netns)

    # The daemon dies; its VMMs (and so their taps) live on. One VMM dies too
    # before the next start: its tap and now unused bridge are stale and go,
    # the other instance is re-adopted with its tap and bridge.
    assert daemon.proc is not None
    b1_pid = (await props(c, "b1"))["MainPID"]
    a1_pid = (await props(c, "a1"))["MainPID"]
    daemon.proc.kill()
    await daemon.proc.wait()
    assert tap("a1", "neta") in links(netns)
    os.kill(a1_pid, signal.SIGKILL)
    try:
        c = await daemon.start(extra_args=args)
        assert ours(netns) == {tap("b1", "netb"), bridge("netb")}, links(netns)
        assert (await props(c, "a1"))["State"] == "failed"
        p = await props(c, "b1")
        assert (p["State"], p["MainPID"]) == ("running", b1_pid)
        assert [n[0] for n in p["NetworkInterfaces"]] == ["netb"]
        await c.instance_call("b1", "Kill")
        assert ours(netns) == set(), links(netns)
    finally:
        kill_leftover_vmms(daemon.state_dir)


async def test_daemon_refuses_a_foreign_name_and_leaves_nothing(daemon: Daemon, netns: str) -> None:
    # Made before the daemon starts: its start-up cleanup leaves it alone.
    foreign_link(netns, tap("c1", "netb"))
    config = net_config({"c1": "true"}, {"c1": ["neta", "netb"]})
    c = await daemon.start(config, extra_args=["--netns", netns])
    e = await error_of(c.manager("StartInstance", "s", "c1"))
    assert short(e.name) == "Busy", e
    assert tap("c1", "netb") in e.message and "does not own it" in e.message, e.message
    p = await wait_for(c, "c1", lambda p: p["State"] == "failed")
    assert tap("c1", "netb") in p["StateReason"]
    assert ours(netns) == {tap("c1", "netb")}
    assert "spectrumd" not in str(links(netns)[tap("c1", "netb")].get("ifalias"))


async def test_missing_namespace_is_a_clear_error(daemon: Daemon) -> None:
    daemon.write_config(net_config({"c1": "true"}, {"c1": ["neta"]}))
    name = f"spt-missing-{secrets.token_hex(4)}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spectrumd",
        "--bus",
        daemon.address,
        "--config",
        str(daemon.config_path),
        "--state-dir",
        str(daemon.state_dir),
        "--netns",
        name,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"network namespace {name!r} does not exist" in err.decode(), err.decode()


async def test_network_hot_added_to_a_running_guest(daemon: Daemon, netns: str) -> None:
    # The guest waits for a second interface and uses it when it appears.
    command = (
        up("10.9.3.2")
        + "until [ -e /sys/class/net/eth1 ]; do sleep 0.5; done; echo ETH1-APPEARED; "
        + up("10.9.2.2", "eth1")
        + until_ping("10.9.2.1", "HOTADD")
        + "exec sleep 3600"
    )
    config = net_config({"h1": command}, {"h1": ["neta"]})
    c = await daemon.start(config, extra_args=["--netns", netns])
    path = await c.instance_path("h1")
    await c.manager("StartInstance", "s", "h1")
    await c.call(path, INSTANCE_IFACE, "AttachNetwork", "s", ["netc"])
    nics = (await props(c, "h1"))["NetworkInterfaces"]
    assert [n[0] for n in nics] == ["neta", "netc"]
    assert nics[1][1] == tap("h1", "netc")
    log = Path((await props(c, "h1"))["ConsoleLog"])
    text = await wait_log_any(log, ("HOTADD-YES", "HOTADD-NO"), timeout=120)
    assert "HOTADD-YES" in text, text[-2000:]
    assert tap("h1", "netc") in links(netns)
    await c.call(path, INSTANCE_IFACE, "DetachNetwork", "s", ["netc"])
    assert [n[0] for n in (await props(c, "h1"))["NetworkInterfaces"]] == ["neta"]
    assert tap("h1", "netc") not in links(netns)
    assert bridge("netc") not in links(netns)
