"""One VMM run: what it holds, its connections, and its record on disk.

A run holds two exit stacks:

- ``stack``: what lives as long as the VMM (the process and its reap, the run
  directory, taps, file-server exports). Closed when the VMM has ended.
- ``conns``: the daemon's connections to it (the control channel, console,
  guest channel, helper tasks). Closed when the VMM ends, and also when the
  daemon exits and leaves the VMM running for the next daemon to adopt.

``STATE_DIR/run/NAME/state.json`` records a running VMM (pid and start time,
the spec's sockets, its network devices) so that a restarted daemon can find
it again. It is written atomically once the start has succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs

from spectrumd.model.types import Accel, Application, InstanceDef, Resource
from spectrumd.supervisor import process
from spectrumd.supervisor.guest import GuestChannel
from spectrumd.vmm.base import NetDev, VmmControl, VmSpec

RECORD = "state.json"
VMM_LOG = "vmm.log"


@attrs.define(eq=False)
class VmRun:
    definition: InstanceDef
    application: Application
    resources: tuple[Resource, ...]
    stack: contextlib.AsyncExitStack = attrs.Factory(contextlib.AsyncExitStack)
    conns: contextlib.AsyncExitStack = attrs.Factory(contextlib.AsyncExitStack)
    proc: process.VmmProcess | None = None
    spec: VmSpec | None = None
    control: VmmControl | None = None
    guest: GuestChannel | None = None
    # Set before a stop step or a kill: the reason the exit will be reported with.
    stop_reason: str | None = None
    guest_exit: int | None = None
    command_sent: bool = False
    # QMP SHUTDOWN's reason: "guest-shutdown" (powered off), "guest-reset", "guest-panic".
    shutdown_reason: str | None = None
    # Adopted from an earlier daemon whose configuration differed.
    stale_definition: bool = False
    watch: asyncio.Task[None] | None = None
    done: asyncio.Future[None] = attrs.Factory(lambda: asyncio.get_running_loop().create_future())

    async def end(self) -> None:
        """Tear everything down, in reverse order: connections first, then the VMM's things."""
        with contextlib.suppress(Exception):
            await self.conns.aclose()
        await self.stack.aclose()

    async def detach(self) -> None:
        """Drop the daemon's connections and leave the VMM running."""
        with contextlib.suppress(Exception):
            await self.conns.aclose()
        if self.proc is not None:
            self.proc.close()


def snapshot(definition: InstanceDef, application: Application, res: tuple[Resource, ...]) -> str:
    """A digest of what a run was started from (to tell a changed definition after adoption)."""
    return hashlib.sha256(repr((definition, application, res)).encode()).hexdigest()[:32]


_SPEC_FIELDS = ("instance", "memory_mib", "vcpus", "cmdline", "arch", "ports", "binary")


def write_record(run: VmRun, started_at_us: int, nets: list[NetDev]) -> None:
    """Record the running VMM atomically (raises OSError)."""
    assert run.proc is not None and run.spec is not None and run.proc.started is not None
    spec = run.spec
    body: dict[str, Any] = {
        "version": 1,
        "pid": run.proc.pid,
        "start_time": run.proc.started,
        "vmm": run.definition.vmm.value,
        "started_at_us": started_at_us,
        "snapshot": snapshot(run.definition, run.application, run.resources),
        "spec": {k: getattr(spec, k) for k in _SPEC_FIELDS}
        | {
            "accel": spec.accel.value,
            "kernel": str(spec.kernel),
            "initrd": str(spec.initrd) if spec.initrd else None,
            "run_dir": str(spec.run_dir),
            "ports": list(spec.ports),
        },
        "nets": [[n.id, n.tap_name, n.mac] for n in nets],
    }
    path = spec.run_dir / RECORD
    tmp = path.with_name(f".{RECORD}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(body))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BadRecord(Exception):
    pass


@attrs.frozen
class RunRecord:
    pid: int
    start_time: int
    vmm: str
    started_at_us: int
    snapshot: str
    spec: VmSpec
    nets: tuple[tuple[str, str, str], ...]


def read_record(run_dir: Path) -> RunRecord | None:
    """The record in ``run_dir``; None if there is none. Raises BadRecord if unreadable."""
    try:
        raw = json.loads((run_dir / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BadRecord(f"{run_dir / RECORD}: {e}") from None
    try:
        s = raw["spec"]
        spec = VmSpec(
            instance=str(s["instance"]),
            accel=Accel(s["accel"]),
            memory_mib=int(s["memory_mib"]),
            vcpus=int(s["vcpus"]),
            kernel=Path(s["kernel"]),
            initrd=Path(s["initrd"]) if s["initrd"] else None,
            cmdline=str(s["cmdline"]),
            run_dir=Path(s["run_dir"]),
            arch=str(s["arch"]),
            ports=tuple(str(p) for p in s["ports"]),
            binary=s["binary"],
        )
        return RunRecord(
            pid=int(raw["pid"]),
            start_time=int(raw["start_time"]),
            vmm=str(raw["vmm"]),
            started_at_us=int(raw["started_at_us"]),
            snapshot=str(raw["snapshot"]),
            spec=spec,
            nets=tuple((str(a), str(b), str(c)) for a, b, c in raw["nets"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"{run_dir / RECORD}: {type(e).__name__}: {e}") from None
