"""Evaluating the Nix library with Debian's nix-instantiate, as root, without a Nix daemon.

``--readonly-mode`` keeps evaluation away from the store database, a private
``NIX_STATE_DIR`` keeps it away from /nix/var, and an empty
``build-users-group`` silences the warning about the missing nixbld group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs

from tests.conftest import ROOT

NIX_DIR = ROOT / "nix"
EXAMPLES = NIX_DIR / "examples"


@attrs.frozen
class NixResult:
    value: Any = None
    error: str | None = None  # the first line of the message, without "error: "


class Nix:
    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("nix-instantiate")
        if exe is None:
            raise RuntimeError("nix-instantiate not found: apt-get install nix-bin")
        self.argv = [exe, "--readonly-mode", "--eval", "--strict", "--json"]
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "NIX_STATE_DIR": str(tmp / "state"),
            "NIX_CONFIG": "build-users-group =",
        }

    def _run(self, args: list[str]) -> NixResult:
        r = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, env=self.env, timeout=60
        )
        if r.returncode == 0:
            return NixResult(value=json.loads(r.stdout))
        first = r.stderr.strip().splitlines()[0] if r.stderr.strip() else ""
        assert first.startswith("error: "), r.stderr
        return NixResult(error=first.removeprefix("error: "))

    def file(self, path: Path) -> NixResult:
        return self._run([str(path)])

    def expr(self, expr: str) -> NixResult:
        return self._run(["--expr", expr])


def nix_string(s: str) -> str:
    """A Nix string literal for any str."""
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


def to_nix(value: Any) -> str:
    """A Nix literal for a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return nix_string(value)
    if isinstance(value, list):
        return "[ " + " ".join(f"({to_nix(v)})" for v in value) + " ]"
    assert isinstance(value, dict)
    return "{ " + " ".join(f"{nix_string(k)} = {to_nix(v)};" for k, v in value.items()) + " }"


def config_with_constructors(config: dict[str, Any]) -> str:
    """Nix source for a configuration written with the library's functions.

    Parts that are not objects, and resources of an unknown type, stay literal
    so that `config` sees exactly what the daemon sees.
    """

    def part(fn: str, value: Any) -> str:
        return f"spectrum.{fn} {to_nix(value)}" if isinstance(value, dict) else to_nix(value)

    def resource(value: Any) -> str:
        if isinstance(value, dict) and value.get("type") in (
            "network",
            "directory",
            "usb",
            "wayland",
        ):
            rest = {k: v for k, v in value.items() if k != "type"}
            return part(value["type"], rest)
        return to_nix(value)

    fields = []
    for key, value in config.items():
        if key == "applications" and isinstance(value, dict):
            body = " ".join(
                f"{nix_string(n)} = {part('application', v)};" for n, v in value.items()
            )
            fields.append(f"applications = {{ {body} }};")
        elif key == "resources" and isinstance(value, dict):
            body = " ".join(f"{nix_string(n)} = {resource(v)};" for n, v in value.items())
            fields.append(f"resources = {{ {body} }};")
        elif key == "instances" and isinstance(value, dict):
            body = " ".join(f"{nix_string(n)} = {part('instance', v)};" for n, v in value.items())
            fields.append(f"instances = {{ {body} }};")
        else:
            fields.append(f"{nix_string(key)} = {to_nix(value)};")
    return f"let spectrum = import {NIX_DIR}; in spectrum.config {{ {' '.join(fields)} }}"
