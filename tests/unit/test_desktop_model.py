"""The desktop's pure core (no display, no bus), what the package may import, and
its desktop entries (valid, and installed by ``make install-desktop``)."""

from __future__ import annotations

import colorsys
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from spectrumd.desktop.model import (
    Answer,
    ClickGuard,
    PendingRequest,
    RequestQueue,
    access_text,
    default_minutes,
    describe_resource,
    error_text,
    instance_colour,
    lifetime_text,
    plan_answer,
    printable,
    split_gerror,
)

ROOT = Path(__file__).resolve().parents[2]
MIN = 60_000_000


def req(
    rid: str, instance: str = "one", lifetime: str = "running", expires: int = 0
) -> PendingRequest:
    return PendingRequest(rid, instance, "app", "/srv/x", "ro", lifetime, expires, "portal")


def test_colour_is_fixed_per_name_and_readable_under_white_text() -> None:
    assert instance_colour("work-shell") == instance_colour("work-shell")
    colours = {instance_colour(f"instance-{i}") for i in range(50)}
    assert len(colours) > 40, "names spread over the hues"
    for c in colours:
        assert len(c) == 7 and c.startswith("#")
        r, g, b = (int(c[i : i + 2], 16) / 255 for i in (1, 3, 5))
        _h, lightness, _s = colorsys.rgb_to_hls(r, g, b)
        assert lightness < 0.45, f"{c} is too light for white text"


def test_printable_escapes_what_could_fool_the_reader() -> None:
    assert printable("/home/u/Docs") == "/home/u/Docs"
    # A right-to-left override could make "txt.exe" read as "exe.txt".
    assert printable("a\u202eb") == "a\\u202eb"
    assert printable("two\nlines\x00") == "two\\u000alines\\u0000"
    assert printable("x" * 500, limit=10) == "x" * 9 + "…"


def test_queue_shows_one_request_per_instance_in_order() -> None:
    q = RequestQueue()
    assert q.add(req("a1", "one"))
    assert not q.add(req("a2", "one")), "second of the same instance waits"
    assert q.add(req("b1", "two")), "another instance is shown at once"
    assert not q.add(req("a1", "one")), "a duplicate id is ignored"
    assert [r.id for r in q.shown()] == ["a1", "b1"]
    assert q.remove("a2") is None, "a queued one leaves without showing anything"
    assert q.add(req("a3", "one")) is False
    nxt = q.remove("a1")
    assert nxt is not None and nxt.id == "a3"
    assert q.remove("a3") is None and q.remove("nope") is None
    assert [r.id for r in q.clear()] == ["b1"]
    assert len(q) == 0


def test_click_guard_needs_a_second_of_focus_and_restarts_on_loss() -> None:
    g = ClickGuard(1.0)
    assert not g.armed(0.0) and g.remaining(0.0) is None
    g.focus(0.0, True)
    assert not g.armed(5.0), "focus before being shown counts for nothing"
    g.shown(10.0, False)
    assert g.remaining(10.5) is None, "shown but not focused"
    g.focus(11.0, True)
    assert not g.armed(11.9)
    g.focus(11.95, False)
    g.focus(12.0, True)
    assert not g.armed(12.9), "losing focus started the second again"
    assert g.remaining(12.5) == pytest.approx(0.5)
    assert g.armed(13.0)
    g.focus(13.1, True)
    assert g.armed(13.2), "staying focused keeps it armed"


def test_answer_for_each_lifetime() -> None:
    now = 1_000 * MIN
    assert plan_answer(req("a"), "running", 5, now) == Answer(True, "running")
    assert plan_answer(req("a"), "permanent", 5, now) == Answer(True, "permanent")
    # "For N minutes" is an expiry for the daemon to keep, also on a request that had none.
    assert plan_answer(req("a"), "until", 5, now) == Answer(True, "until", now + 5 * MIN)
    asked = req("a", lifetime="until", expires=now + 30 * MIN)
    assert plan_answer(asked, "until", 5, now) == Answer(True, "until", now + 5 * MIN)
    # Shorter than asked, never longer.
    assert plan_answer(asked, "until", 60, now) == Answer(True, "until", now + 30 * MIN)
    assert plan_answer(asked, "running", 5, now) == Answer(True, "running")
    assert default_minutes(asked, now) == 30
    assert default_minutes(req("a"), now) == 10
    with pytest.raises(ValueError, match="not one of"):
        plan_answer(req("a"), "forever", 5, now)


def test_resources_are_shown_as_what_they_reach() -> None:
    resources = {
        "docs": ("directory", "/srv/docs (read-only)"),
        "lan": ("network", "isolated network"),
    }
    v = describe_resource("/home/u/Documents", resources)
    assert (v.kind, v.title) == ("directory", "/home/u/Documents")
    v = describe_resource("docs", resources)
    assert (v.kind, v.title) == ("directory", "/srv/docs")
    assert ("Resource", "docs") in v.lines
    devices = [("1050:0407:ab%20c", "1050", "0407", "ab c", "Yubico YubiKey", "bank")]
    v = describe_resource("usb:1050:0407:ab%20c", resources, devices)
    assert v.kind == "usb" and v.title == "USB 1050:0407 serial ab c"
    assert ("Serial", "ab c") in v.lines
    assert ("Device", "Yubico YubiKey (held by bank)") in v.lines
    assert ("Serial", "any") in describe_resource("usb:1050:0407", resources).lines
    assert describe_resource("lan", resources).title == "isolated network"
    assert describe_resource("gone", resources).title == "gone"
    assert access_text("rw", "directory") == "read and write"
    assert access_text("rw", "usb") == "the whole device"


def test_lifetimes_and_errors_read_as_sentences() -> None:
    now = 1_000 * MIN
    assert lifetime_text("until", now + 90 * 1_000_000, now) == "1 min 30 s left"
    assert lifetime_text("running", 0, now) == "while it runs"
    bus_denied = error_text(
        "Start one",
        "org.freedesktop.DBus.Error.AccessDenied",
        'Rejected send message, 2 matched rules; type="method_call"',
    )
    assert (
        bus_denied
        == "Start one: Not allowed: the bus lets only root and the group spectrum do this"
    )
    assert (
        error_text("Register", "org.spectrum_os.Spectrum1.Error.Busy", "an agent is registered")
        == "Register: Busy: an agent is registered"
    )
    assert "not running" in error_text("x", "org.freedesktop.DBus.Error.ServiceUnknown", "")
    assert split_gerror("GDBus.Error:a.b.C: text: more") == ("a.b.C", "text: more")
    assert split_gerror("plain") == ("", "plain")


def test_agent_xml_is_the_contract() -> None:
    from spectrumd.desktop.client import AGENT_XML

    def shape(root: ET.Element) -> list[tuple[str, ...]]:
        iface = root.find("interface")
        assert iface is not None
        return [
            (m.get("name", ""), *(f"{a.get('direction')}:{a.get('type')}" for a in m))
            for m in iface
        ]

    shipped = ET.parse(ROOT / "dbus" / "org.spectrum_os.Spectrum1.Agent.xml").getroot()
    assert shape(ET.fromstring(AGENT_XML)) == shape(shipped)


def test_the_desktop_imports_nothing_of_the_daemon() -> None:
    code = (
        "import sys, spectrumd.desktop.main, spectrumd.desktop.manager\n"
        "bad = ('dbus_fast', 'attrs', 'spectrumd.supervisor', 'spectrumd.host',"
        " 'spectrumd.vmm', 'spectrumd.daemon', 'spectrumd.cli')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_desktop_files_are_valid_and_start_the_installed_programs() -> None:
    import shutil
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    files = sorted((ROOT / "data").glob("*.desktop"))
    assert [f.name for f in files] == [
        "spectrum-agent-autostart.desktop",
        "spectrum-agent.desktop",
        "spectrum-manager.desktop",
    ]
    assert shutil.which("desktop-file-validate"), "desktop-file-utils is not installed"
    for f in files:
        r = subprocess.run(["desktop-file-validate", str(f)], capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip(), (f.name, r.stdout)
        exec_line = next(x for x in f.read_text().splitlines() if x.startswith("Exec="))
        program = exec_line.removeprefix("Exec=").split()[0]
        assert scripts[program].startswith("spectrumd.desktop.main:"), program


@pytest.mark.parametrize("program", ["agent", "manager"])
def test_without_a_display_the_programs_say_so(program: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    r = subprocess.run(
        [sys.executable, "-m", "spectrumd.desktop", program, "--bus", "unix:path=/nonexistent"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 1
    assert f"spectrum-{program}: cannot open a display" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("prefix", [None, "/usr"])
def test_make_install_desktop_puts_the_entries_where_desktops_look(
    tmp_path: Path, prefix: str | None
) -> None:
    argv = ["make", "-s", "-C", str(ROOT), "install-desktop", f"DESTDIR={tmp_path}"]
    if prefix is not None:
        argv.append(f"PREFIX={prefix}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    apps = (prefix or "/usr/local").lstrip("/") + "/share/applications"
    installed = {
        str(p.relative_to(tmp_path)): p for p in tmp_path.rglob("*.desktop") if p.is_file()
    }
    assert sorted(installed) == [
        "etc/xdg/autostart/spectrum-agent.desktop",
        f"{apps}/spectrum-agent.desktop",
        f"{apps}/spectrum-manager.desktop",
    ]
    shipped = {
        "etc/xdg/autostart/spectrum-agent.desktop": "spectrum-agent-autostart.desktop",
        f"{apps}/spectrum-agent.desktop": "spectrum-agent.desktop",
        f"{apps}/spectrum-manager.desktop": "spectrum-manager.desktop",
    }
    for rel, path in installed.items():
        assert path.read_bytes() == (ROOT / "data" / shipped[rel]).read_bytes(), rel
        assert path.stat().st_mode & 0o777 == 0o644, rel
        v = subprocess.run(["desktop-file-validate", str(path)], capture_output=True, text=True)
        assert v.returncode == 0 and not v.stdout.strip(), (rel, v.stdout)
