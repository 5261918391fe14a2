"""Daemon-wide settings an instance and its runs need."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import attrs

from spectrumd.host.uids import UidAllocator
from spectrumd.supervisor.resources import ResourceDriver


class MachineRegistry(Protocol):
    """Where VMMs are registered as machines (systemd-machined); never raises."""

    async def register(self, name: str, pid: int) -> None: ...


@attrs.frozen
class Environment:
    state_dir: Path
    guest_dir: Path
    console_max_bytes: int = 1024 * 1024
    console_keep: int = 3
    # Parts that provide resources (file server, networks, ...), in setup order.
    drivers: tuple[ResourceDriver, ...] = ()
    # Each run's own ids (VMM, file server); None: VMMs run as root, unconfined
    # (--unsafe-unconfined-vmm, with a warning at every start).
    uids: UidAllocator | None = None
    # The kernel's Landlock ABI (sandbox.check()), when VMMs are confined.
    landlock_abi: int = 0
    # Registers each VMM with systemd-machined where systemd runs.
    machines: MachineRegistry | None = None
    attach_timeout: float = 30.0
    term_timeout: float = 5.0
    control_timeout: float = 10.0

    def run_dir(self, name: str) -> Path:
        return self.state_dir / "run" / name

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / name / "console.log"
