"""Small helpers for tests that talk to a real spectrumd over a real bus."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dbus_fast import Message

from spectrumd.bus.names import ERROR_PREFIX, INSTANCE_IFACE, MANAGER_PATH
from spectrumd.cli.client import CallError, Client
from tests.conftest import readable_tmpdir


@contextlib.contextmanager
def marked_dir(prefix: str, marker: str) -> Iterator[Path]:
    """A host directory the file server's user can read, holding ``marker`` in ``marker``."""
    with readable_tmpdir(prefix) as d:
        (d / "marker").write_text(marker + "\n")
        (d / "marker").chmod(0o644)
        yield d


def app_config(command: str, **instances: dict[str, Any]) -> dict[str, Any]:
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": 20},
        "applications": {"app": {"command": command, "memory_mib": 128}},
        "resources": {
            "lan": {"type": "network"},
            "docs": {"type": "directory", "path": "/srv/docs"},
        },
        "instances": instances or {"one": {"application": "app"}},
    }


def vmms(state_dir: Path) -> dict[str, int]:
    """The live VMMs that the daemon of ``state_dir`` started: instance name → pid."""
    return dict(vmm_list(state_dir))


def file_servers(state_dir: Path) -> dict[str, int]:
    """The live file servers that the daemon of ``state_dir`` started: instance → pid."""
    return dict(vmm_list(state_dir, b"SPECTRUM_FILESERVER="))


def vmm_list(state_dir: Path, var: bytes = b"SPECTRUM_INSTANCE=") -> list[tuple[str, int]]:
    """(instance name, pid) of every live VMM the daemon of ``state_dir`` started.

    Found by the environment spectrumd gives every VMM (``SPECTRUM_STATE_DIR``,
    ``SPECTRUM_INSTANCE``; a file server has ``SPECTRUM_FILESERVER``); zombies
    (exited, not reaped by PID 1 here) are gone, and so are the children
    that inherited it (a file server's polling companion): only what spectrumd
    started.
    """
    mark = f"SPECTRUM_STATE_DIR={state_dir.absolute()}".encode()
    found: list[tuple[str, int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if mark not in environ or fields[0] in ("Z", "X"):
            continue
        for item in environ:
            if item.startswith(var):
                found.append((item.split(b"=", 1)[1].decode(), int(entry), int(fields[1])))
    pids = {pid for _name, pid, _parent in found}
    return [(name, pid) for name, pid, parent in found if parent not in pids]


async def props(c: Client, name: str) -> dict[str, Any]:
    return await c.properties(await c.instance_path(name))


async def wait_for(
    c: Client, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = await props(c, name)
        if pred(p):
            return p
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on {name}: {p}")
        await asyncio.sleep(0.1)


async def wait_log(path: Path, text: str, timeout: float = 60) -> str:
    return await wait_log_any(path, (text,), timeout)


async def wait_log_any(path: Path, texts: tuple[str, ...], timeout: float = 60) -> str:
    """The log's complete lines once they hold one of ``texts``. A console line
    reaches the log in pieces (as the serial port gives them), so a line is
    looked at only once its newline has come: a test that waits for
    ``"rc="`` then reads the whole line."""
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        content = content[: content.rfind("\n") + 1]
        if any(t in content for t in texts):
            return content
        if time.monotonic() > deadline:
            raise AssertionError(
                f"none of {texts!r} in {path} after {timeout}s:\n{content[-2000:]}"
            )
        await asyncio.sleep(0.2)


async def error_of(coro: Any) -> CallError:
    try:
        await coro
    except CallError as e:
        return e
    raise AssertionError("the call succeeded but should have failed")


def short(name: str) -> str:
    return name.removeprefix(ERROR_PREFIX)


class SignalRecorder:
    """Records PropertiesChanged and ObjectManager signals of spectrumd."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived: list[float] = []  # time.monotonic() of each, as it came

    async def attach(self, c: Client) -> SignalRecorder:
        c.bus.add_message_handler(self._on)
        await c.add_match(
            "type='signal',interface='org.freedesktop.DBus.Properties',"
            f"path_namespace='{MANAGER_PATH}'"
        )
        await c.add_match(
            f"type='signal',interface='org.freedesktop.DBus.ObjectManager',path='{MANAGER_PATH}'"
        )
        return self

    def _on(self, msg: Message) -> bool:
        if msg.member in ("PropertiesChanged", "InterfacesAdded", "InterfacesRemoved"):
            self.messages.append(msg)
            self.arrived.append(time.monotonic())
        return False

    def state_changes(self, path: str) -> list[tuple[str, float]]:
        """(State, monotonic arrival time) of each State change of the instance at ``path``."""
        return [
            (m.body[1]["State"].value, t)
            for m, t in zip(self.messages, self.arrived, strict=True)
            if m.member == "PropertiesChanged"
            and m.path == path
            and m.body[0] == INSTANCE_IFACE
            and "State" in m.body[1]
        ]

    def states(self, path: str) -> list[str]:
        return [state for state, _t in self.state_changes(path)]

    def entered(self, path: str, state: str) -> float:
        """When the last change to ``state`` arrived (AssertionError if none did)."""
        times = [t for s, t in self.state_changes(path) if s == state]
        assert times, f"{path} never became {state}: {self.states(path)}"
        return times[-1]

    def object_events(self) -> list[tuple[str, str, str]]:
        return [
            (m.member, m.path or "", m.body[0]) for m in self.messages if "Interfaces" in m.member
        ]
