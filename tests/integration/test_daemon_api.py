"""The D-Bus contract and spectrumctl against a real daemon on a private bus (no boots)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant

from spectrumd.bus.grants import GRANT_IFACE
from spectrumd.bus.names import (
    BUS_NAME,
    INSTANCE_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    instance_path,
)
from spectrumd.bus.names import OBJECT_MANAGER_IFACE as OBJECT_MANAGER
from tests.conftest import ROOT, Daemon
from tests.integration.helpers import SignalRecorder, app_config, error_of, props, short

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TWO = app_config(
    "echo hi",
    **{
        "work-shell": {"application": "app", "resources": ["lan", "docs"]},
        "home-shell": {"application": "app", "resources": []},
    },
)


def spectrumctl(
    d: Daemon, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectrumd.cli", "--bus", d.address, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


async def test_bad_config_at_start_exits_with_the_message(daemon: Daemon) -> None:
    cfg = app_config("x", **{"work-shell": {"application": "shel"}})
    daemon.write_config(cfg)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectrumd",
            "--bus",
            daemon.address,
            "--config",
            str(daemon.config_path),
            "--state-dir",
            str(daemon.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert 'instances.work-shell.application: no application "shel"' in r.stderr


async def test_lists_and_errors(daemon: Daemon) -> None:
    c = await daemon.start(TWO)
    (rows,) = await c.manager("ListInstances")
    assert sorted(map(list, rows)) == [
        ["home-shell", "app", "stopped", instance_path("home-shell")],
        ["work-shell", "app", "stopped", instance_path("work-shell")],
    ]
    (apps,) = await c.manager("ListApplications")
    assert list(map(list, apps)) == [["app", "echo hi"]]
    (res,) = await c.manager("ListResources")
    assert ["docs", "directory", "/srv/docs (read-only)"] in map(list, res)
    p = await props(c, "work-shell")
    assert p["Resources"] == ["lan", "docs"] and p["Vmm"] == "qemu" and p["State"] == "stopped"

    cases = [
        (c.manager("GetInstance", "s", "nope"), "NoSuchInstance", 'no instance "nope"'),
        (c.manager("StartInstance", "s", "Bad Name"), "InvalidArgument", "invalid name"),
        (c.manager("StopInstance", "s", "work-shell"), "InvalidState", "it is stopped"),
        (c.call(instance_path("work-shell"), INSTANCE_IFACE, "Pause"), "InvalidState", "stopped"),
        (c.call(instance_path("work-shell"), INSTANCE_IFACE, "Kill"), "InvalidState", "stopped"),
        (
            c.manager("CreateInstance", "ssasa{sv}", "work-shell", "app", [], {}),
            "Exists",
            "already exists",
        ),
        (
            c.manager("CreateInstance", "ssasa{sv}", "n1", "nope", [], {}),
            "NoSuchApplication",
            'no application "nope"',
        ),
        (
            c.manager("CreateInstance", "ssasa{sv}", "n1", "app", ["nope"], {}),
            "NoSuchResource",
            'no resource "nope"',
        ),
        (c.manager("DeleteInstance", "s", "work-shell"), "InvalidArgument", "configuration file"),
    ]
    for coro, name, text in cases:
        e = await error_of(coro)
        assert short(e.name) == name, (e.name, e.message)
        assert text in e.message, e.message


async def test_missing_kernel_and_missing_vmm_are_named(daemon: Daemon, short_tmp: Path) -> None:
    cfg = app_config("echo hi")
    cfg["applications"]["custom"] = {"command": "x", "kernel": "/nonexistent/vmlinuz"}
    cfg["instances"]["custom-one"] = {"application": "custom"}
    c = await daemon.start(cfg)
    e = await error_of(c.manager("StartInstance", "s", "custom-one"))
    assert short(e.name) == "Failed"
    assert "kernel /nonexistent/vmlinuz not found" in e.message
    p = await props(c, "custom-one")
    assert p["State"] == "failed" and "not found" in p["StateReason"]
    assert not (daemon.state_dir / "run" / "custom-one").exists(), "a half-made run was left"
    await daemon.stop()

    # The same daemon, with no QEMU on its PATH.
    empty = short_tmp / "emptybin"
    empty.mkdir(exist_ok=True)
    os.environ["PATH"], saved = str(empty), os.environ["PATH"]
    try:
        c = await daemon.start()
    finally:
        os.environ["PATH"] = saved
    e = await error_of(c.manager("StartInstance", "s", "one"))
    assert short(e.name) == "Failed"
    assert "VMM binary qemu-system-x86_64 not found" in e.message


async def test_reload_keeps_state_on_bad_file_and_applies_a_good_one(daemon: Daemon) -> None:
    c = await daemon.start(TWO)
    rec = await SignalRecorder().attach(c)
    bad = json.loads(json.dumps(TWO))
    bad["instances"]["work-shell"]["application"] = "shel"
    daemon.write_config(bad)
    e = await error_of(c.manager("Reload"))
    assert short(e.name) == "InvalidArgument"
    assert e.message == 'instances.work-shell.application: no application "shel"'
    (rows,) = await c.manager("ListInstances")
    assert len(rows) == 2

    good = json.loads(json.dumps(TWO))
    del good["instances"]["home-shell"]
    good["instances"]["new-one"] = {"application": "app"}
    good["instances"]["work-shell"]["resources"] = ["lan"]
    daemon.write_config(good)
    await c.manager("Reload")
    (rows,) = await c.manager("ListInstances")
    assert sorted(r[0] for r in rows) == ["new-one", "work-shell"]
    assert (await props(c, "work-shell"))["Resources"] == ["lan"]
    await asyncio.sleep(0.2)
    events = rec.object_events()
    assert ("InterfacesRemoved", MANAGER_PATH, instance_path("home-shell")) in events
    assert ("InterfacesAdded", MANAGER_PATH, instance_path("new-one")) in events


async def test_runtime_instances_persist_across_restart(daemon: Daemon) -> None:
    c = await daemon.start(TWO)
    (path,) = await c.manager("CreateInstance", "ssasa{sv}", "scratch", "app", ["docs"], {})
    assert path == instance_path("scratch")
    data = json.loads((daemon.state_dir / "instances.json").read_text())
    assert data == {
        "version": 1,
        "instances": {"scratch": {"application": "app", "resources": ["docs"]}},
    }
    await daemon.stop()
    c = await daemon.start()
    assert (await props(c, "scratch"))["Resources"] == ["docs"]
    await c.manager("DeleteInstance", "s", "scratch")
    e = await error_of(c.manager("GetInstance", "s", "scratch"))
    assert short(e.name) == "NoSuchInstance"
    assert json.loads((daemon.state_dir / "instances.json").read_text())["instances"] == {}


async def test_busctl_works(daemon: Daemon) -> None:
    await daemon.start(TWO)
    base = ["busctl", f"--address={daemon.address}"]
    r = subprocess.run(
        [*base, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListInstances"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert r.stdout.startswith("a(ssso) 2 ")
    assert '"work-shell" "app" "stopped"' in r.stdout
    r = subprocess.run(
        [*base, "get-property", BUS_NAME, instance_path("work-shell"), INSTANCE_IFACE, "State"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert r.stdout.strip() == 's "stopped"'
    r = subprocess.run(
        [*base, "tree", BUS_NAME], capture_output=True, text=True, timeout=10, check=True
    )
    assert "/org/spectrum_os/Spectrum1/instance/work_2dshell" in r.stdout
    r = subprocess.run(
        [*base, "introspect", BUS_NAME, instance_path("work-shell")],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert ".Start" in r.stdout and ".StateReason" in r.stdout
    r = subprocess.run(
        [*base, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetInstance", "s", "nope"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode != 0 and 'no instance "nope"' in r.stderr


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


async def test_every_object_has_the_standard_shape(daemon: Daemon, short_tmp: Path) -> None:
    """busctl and gdbus, the real tools, read every object; ObjectManager is the manager's alone."""
    c = await daemon.start(TWO)
    (grant,) = await c.manager(
        "Grant", "ssa{sv}", "work-shell", str(short_tmp), {"lifetime": Variant("s", "permanent")}
    )
    busctl = ["busctl", f"--address={daemon.address}"]
    objects = [MANAGER_PATH, instance_path("work-shell"), instance_path("home-shell"), grant]
    for path in objects:
        r = run_tool(*busctl, "introspect", BUS_NAME, path)
        assert r.returncode == 0, (path, r.stderr)
        om = [line for line in r.stdout.splitlines() if line.startswith(OBJECT_MANAGER + " ")]
        assert len(om) == (1 if path == MANAGER_PATH else 0), (path, r.stdout)
        r = run_tool("gdbus", "introspect", "--address", daemon.address, "--dest", BUS_NAME,
                     "--object-path", path)  # fmt: skip
        assert r.returncode == 0, (path, r.stderr)
        assert r.stdout.count(f"interface {OBJECT_MANAGER} ") == (1 if path == MANAGER_PATH else 0)
    r = run_tool(*busctl, "tree", BUS_NAME)
    assert r.returncode == 0, r.stderr
    for path in objects:
        assert path in r.stdout
    r = run_tool("gdbus", "introspect", "--address", daemon.address, "--dest", BUS_NAME,
                 "--object-path", "/", "--recurse", "--only-properties")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "readonly s State" in r.stdout
    # The objects are managed by the manager, and by nothing else.
    await c.manager("CreateInstance", "ssasa{sv}", "extra", "app", [], {})
    await error_of(c.manager("StopInstance", "s", "extra"))  # the values change nothing
    (managed,) = await c.call(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")
    assert set(managed) == {*objects[1:], instance_path("extra")}
    # Every object's values are what its own GetAll says.
    for path, interfaces in managed.items():
        for iface, values in interfaces.items():
            (direct,) = await c.call(
                path, "org.freedesktop.DBus.Properties", "GetAll", "s", [iface]
            )
            assert {k: v.value for k, v in values.items()} == {
                k: v.value for k, v in direct.items()
            }, path
    e = await error_of(c.call(instance_path("work-shell"), OBJECT_MANAGER, "GetManagedObjects"))
    assert e.name == "org.freedesktop.DBus.Error.UnknownInterface"


def _interface_xml(xml: str, name: str) -> str:
    root = ET.fromstring(xml)
    for iface in root.iter("interface"):
        if iface.get("name") == name:
            for el in iface.iter():
                el.tail = None
                el.text = None
            return ET.tostring(iface, encoding="unicode")
    raise AssertionError(f"{name} not served")


async def test_served_introspection_matches_dbus_xml(daemon: Daemon, short_tmp: Path) -> None:
    c = await daemon.start(TWO)
    (grant,) = await c.manager(
        "Grant", "ssa{sv}", "work-shell", str(short_tmp), {"lifetime": Variant("s", "permanent")}
    )
    files = {
        MANAGER_IFACE: (MANAGER_PATH, ROOT / "dbus" / f"{MANAGER_IFACE}.xml"),
        INSTANCE_IFACE: (instance_path("work-shell"), ROOT / "dbus" / f"{INSTANCE_IFACE}.xml"),
        GRANT_IFACE: (grant, ROOT / "dbus" / f"{GRANT_IFACE}.xml"),
    }
    for iface, (path, xml_file) in files.items():
        (served,) = await c.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
        if os.environ.get("SPECTRUM_UPDATE_XML"):
            root = ET.fromstring(served)
            node = ET.Element("node")
            node.extend(i for i in root.iter("interface") if i.get("name") == iface)
            ET.indent(node)
            xml_file.write_text(
                '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
                ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
                + ET.tostring(node, encoding="unicode")
                + "\n"
            )
        assert _interface_xml(served, iface) == _interface_xml(xml_file.read_text(), iface)


async def test_spectrumctl(daemon: Daemon) -> None:
    await daemon.start(TWO)
    r = spectrumctl(daemon, "list")
    assert r.returncode == 0, r.stderr
    assert "work-shell" in r.stdout and "stopped" in r.stdout
    r = spectrumctl(daemon, "--json", "status", "work-shell")
    assert json.loads(r.stdout)["Resources"] == ["lan", "docs"]
    r = spectrumctl(daemon, "status", "nope")
    assert r.returncode == 1 and 'no instance "nope"' in r.stderr
    r = spectrumctl(daemon, "stop", "work-shell")
    assert r.returncode == 1 and "it is stopped" in r.stderr
    r = spectrumctl(daemon, "create", "extra", "app", "lan")
    assert r.returncode == 0, r.stderr
    r = spectrumctl(daemon, "--json", "list")
    assert {i["name"] for i in json.loads(r.stdout)} == {"work-shell", "home-shell", "extra"}
    r = spectrumctl(daemon, "delete", "extra")
    assert r.returncode == 0, r.stderr


async def test_list_instances_is_current_and_keeps_dbus_rules(daemon: Daemon) -> None:
    """ListInstances is answered from a cached, marshalled table: it must follow every
    change at once, and still behave like any D-Bus method (no interface given,
    wrong arguments, a caller that wants no reply)."""
    c = await daemon.start(TWO)

    async def raw(**kw: Any) -> Message:
        msg = Message(destination=BUS_NAME, path=MANAGER_PATH, member="ListInstances", **kw)
        reply = await c.bus.call(msg)
        assert reply is not None
        return reply

    reply = await raw()  # no interface: D-Bus allows it
    assert reply.signature == "a(ssso)" and len(reply.body[0]) == 2
    reply = await raw(interface=MANAGER_IFACE, signature="s", body=["extra"])
    assert reply.message_type == MessageType.ERROR
    # dbus-fast dispatches on member and signature: another signature is another method
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
    quiet = Message(
        destination=BUS_NAME,
        path=MANAGER_PATH,
        interface=MANAGER_IFACE,
        member="ListInstances",
        flags=MessageFlag.NO_REPLY_EXPECTED,
    )
    await c.bus.send(quiet)  # no reply comes; the daemon answers the next calls as before

    await c.manager("CreateInstance", "ssasa{sv}", "scratch", "app", [], {})
    (rows,) = await c.manager("ListInstances")
    assert ["scratch", "app", "stopped", instance_path("scratch")] in map(list, rows)
    await c.manager("DeleteInstance", "s", "scratch")
    (rows,) = await c.manager("ListInstances")
    assert sorted(r[0] for r in rows) == ["home-shell", "work-shell"]
