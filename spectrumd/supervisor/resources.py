"""The seam between an instance's start and the parts that provide its resources.

A :class:`ResourceDriver` (file server, networks, USB, ...) contributes to a
VM in two steps of every start, and undoes its work through the run's exit
stack, so a start that fails half way, a stop and a crash all tear down the
same way, in reverse order:

1. ``prepare(ctx)`` before the VMM is spawned: ask for guest-contract ports,
   open descriptors the VMM inherits, name devices for the command line.
2. ``started(ctx, spec)`` once the VMM's control channel answers and before
   the guest's CPUs run: connect to the VMM's sockets, hot-attach devices.

After a daemon restart, ``adopt(ctx, spec)`` takes the place of both for a
VMM that kept running.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import attrs

from spectrumd.host.uids import InstanceIds
from spectrumd.model.types import Application, InstanceDef, Resource
from spectrumd.vmm.base import NetDev, VmmControl, VmSpec


@attrs.define(eq=False)
class RunContext:
    """One start of one instance, as the drivers see it."""

    name: str
    definition: InstanceDef
    application: Application
    resources: tuple[Resource, ...]
    run_dir: Path
    stack: contextlib.AsyncExitStack
    # The daemon's connections to the run (closed also when the daemon exits
    # and leaves the VM running): control sockets, watcher tasks.
    conns: contextlib.AsyncExitStack
    log: logging.Logger
    # End the VM now, as crashed with this reason: a part it cannot run
    # without has failed (no-op once a stop is under way or the VMM ended).
    fail: Callable[[str], None]
    # What the drivers ask of the VM (read when the VmSpec is built).
    ports: list[str] = attrs.Factory(list)
    nets: list[NetDev] = attrs.Factory(list)
    # The VMM's end of the virtio-fs connection (VmSpec.fs_fd); -1: it connects.
    fs_fd: int | None = None
    # The VMM's control channel, set once it answers (for hot-plugging in ``started``).
    control: VmmControl | None = None
    # The run's own uids (VMM, file server); None: the VMM is not confined.
    ids: InstanceIds | None = None


class ResourceDriver(Protocol):
    async def prepare(self, ctx: RunContext) -> None:
        """Before the spawn. Push every undo on ``ctx.stack``. Raises SpectrumError."""

    async def started(self, ctx: RunContext, spec: VmSpec) -> None:
        """After the VMM answers, before the guest runs. Raises SpectrumError."""

    async def adopt(self, ctx: RunContext, spec: VmSpec) -> None:
        """A VMM left running by an earlier daemon was taken back: reconnect to it.
        Push undos on ``ctx.stack`` as ``started`` does. Raises SpectrumError."""
