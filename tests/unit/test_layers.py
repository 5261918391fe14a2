"""Imports flow one way: bus → supervisor → (lifecycle, vmm, host, virtiofs) → model/errors/aio.

An AST walk over every module of the package: each import of a spectrumd
module must go to a part its own part may use (docs/architecture.md draws
the layers). A new arrow upwards, or across the layer below the supervisor,
fails here with the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spectrumd"

BASE = {"model", "errors", "aio"}
LOW = {"lifecycle", "vmm", "host", "virtiofs"}
# Which parts each part may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "aio": set(),
    "model": {"errors"},
    "lifecycle": set(),
    "vmm": BASE,
    "host": BASE,
    # The file-server process; "host" for its seccomp filter.
    "virtiofs": BASE | {"host"},
    "supervisor": LOW | BASE,
    "bus": {"supervisor", "lifecycle"} | BASE,
    # Clients of the D-Bus API: its names and the bus-daemon helper, nothing of the daemon.
    "cli": {"bus"} | BASE,
    "desktop": {"bus"} | BASE,
    # The composition root wires everything.
    "daemon": {"bus", "supervisor"} | LOW | BASE,
    "__main__": {"daemon"},
    "__init__": set(),
}
# Modules of bus/ that a client may import (no daemon-side objects).
CLIENT_BUS_MODULES = {"spectrumd.bus.names", "spectrumd.bus.connection"}
# Where dbus-fast may be imported: the bus layer, its clients and the composition root.
DBUS_FAST_PARTS = {"bus", "cli", "daemon"}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    rel = path.relative_to(package.parent).with_suffix("")
    here = ".".join(rel.parts)
    if path.name == "__init__.py":
        here = here.rsplit(".", 1)[0] + ".__init__"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        me = part_of(".".join(rel.with_suffix("").parts))
        assert me in ALLOWED, f"{rel}: part {me!r} has no place in the layer table"
        for line, name in imports(path, package):
            if name.split(".")[0] == "dbus_fast" and me not in DBUS_FAST_PARTS:
                bad.append(f"{rel}:{line}: {me} imports dbus-fast")
            if not name.startswith("spectrumd.") and name != "spectrumd":
                continue
            target = part_of(name)
            if target == me:
                continue
            if target not in ALLOWED[me]:
                bad.append(f"{rel}:{line}: {me} imports {name}")
            elif me in ("cli", "desktop") and target == "bus" and name not in CLIENT_BUS_MODULES:
                bad.append(f"{rel}:{line}: the client {me} imports the daemon's {name}")
    return bad


def test_imports_flow_one_way() -> None:
    assert violations() == []


def test_the_rule_sees_a_wrong_import(tmp_path: Path) -> None:
    # The walk itself, on a package of two modules: relative and absolute
    # imports resolve to their part.
    host = tmp_path / "spectrumd" / "host"
    host.mkdir(parents=True)
    (host / "probe.py").write_text(
        "from spectrumd.supervisor import instance\nfrom ..vmm import base\nfrom . import names\n"
        "import dbus_fast\n"
    )
    assert violations(tmp_path / "spectrumd") == [
        "spectrumd/host/probe.py:1: host imports spectrumd.supervisor",
        "spectrumd/host/probe.py:2: host imports spectrumd.vmm",
        "spectrumd/host/probe.py:4: host imports dbus-fast",
    ]
