"""A VMM run's record on disk, for the next daemon to find it again.

``STATE_DIR/run/NAME/state.json`` records a running VMM (pid and start time,
the spec's sockets, its network devices) so that a restarted daemon can find
it again. It is written atomically once the start has succeeded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import attrs

from spectrumd.model.types import Accel, Application, InstanceDef, Resource
from spectrumd.supervisor import process
from spectrumd.supervisor.statefile import write_atomically
from spectrumd.vmm.base import NetDev, VmSpec

RECORD = "state.json"
VMM_LOG = "vmm.log"
# The environment variable that carries a run's token into its VMM.
RUN_TOKEN = "SPECTRUM_RUN"
# "PID START_TIME" of the run's VMM and of its file server, written by each
# child itself before its exec (process.spawn): what the next daemon ends of a
# start that never completed.
PID_FILE = "vmm.pid"
FS_PID_FILE = "fs.pid"
PID_FILES = (PID_FILE, FS_PID_FILE)


def snapshot(definition: InstanceDef, application: Application, res: tuple[Resource, ...]) -> str:
    """A digest of what a run was started from (to tell a changed definition after adoption)."""
    return hashlib.sha256(repr((definition, application, res)).encode()).hexdigest()[:32]


_SPEC_FIELDS = ("instance", "memory_mib", "vcpus", "cmdline", "arch", "ports", "binary")


def write_record(
    proc: process.VmmProcess,
    spec: VmSpec,
    definition: InstanceDef,
    digest: str,
    nets: list[NetDev],
    started_at_us: int,
    token: str,
) -> None:
    """Record the running VMM atomically (raises OSError).

    The record lives in the run's root-only directory; even so, the next
    daemon trusts none of it: paths are recomputed from the instance's name,
    and the pid is adopted only if it is still that process (start time,
    executable, and ``token`` in its environment).
    """
    assert proc.started is not None
    body: dict[str, Any] = {
        "version": 2,
        "pid": proc.pid,
        "start_time": proc.started,
        "token": token,
        "exe": process.executable(proc.pid),
        "vmm": definition.vmm.value,
        "started_at_us": started_at_us,
        "snapshot": digest,
        "spec": {k: getattr(spec, k) for k in _SPEC_FIELDS}
        | {
            "accel": spec.accel.value,
            "kernel": str(spec.kernel),
            "initrd": str(spec.initrd) if spec.initrd else None,
            "ports": list(spec.ports),
        },
        "nets": [[n.id, n.tap_name, n.mac] for n in nets],
    }
    write_atomically(spec.run_dir / RECORD, json.dumps(body))


class BadRecord(Exception):
    pass


@attrs.frozen
class RunRecord:
    pid: int
    start_time: int
    token: str
    exe: str
    vmm: str
    started_at_us: int
    snapshot: str
    spec: VmSpec
    nets: tuple[tuple[str, str, str], ...]


def read_record(run_dir: Path) -> RunRecord | None:
    """The record in ``run_dir``; None if there is none. Raises BadRecord if unreadable.

    The run directory is ``run_dir`` itself (the daemon's, from the instance's
    name), whatever the record says.
    """
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
            run_dir=run_dir,
            arch=str(s["arch"]),
            ports=tuple(str(p) for p in s["ports"]),
            binary=s["binary"],
        )
        return RunRecord(
            pid=int(raw["pid"]),
            start_time=int(raw["start_time"]),
            token=str(raw["token"]),
            exe=str(raw["exe"]),
            vmm=str(raw["vmm"]),
            started_at_us=int(raw["started_at_us"]),
            snapshot=str(raw["snapshot"]),
            spec=spec,
            nets=tuple((str(a), str(b), str(c)) for a, b, c in raw["nets"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"{run_dir / RECORD}: {type(e).__name__}: {e}") from None
