"""The daemon's side of confining VMMs: the uid range, the kernel's sandbox, adoption."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spectrumd.errors import SpectrumError
from spectrumd.host import sandbox, uids
from spectrumd.host.uids import InstanceIds, UidAllocator, UidRange
from spectrumd.supervisor import process
from spectrumd.supervisor.vmrun import RunRecord

log = logging.getLogger("spectrumd")


class StartupError(Exception):
    """Printed as ``spectrumd: MESSAGE`` and the daemon exits with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def confinement(args: argparse.Namespace) -> tuple[UidAllocator | None, int]:
    """The uid allocator and Landlock ABI for confined VMMs; (None, 0) when unconfined.

    Raises StartupError naming what is wrong: a uid range that overlaps the
    system's users, groups or subordinate ids; a kernel that cannot confine.
    """
    if args.unsafe_unconfined_vmm:
        log.warning(
            "--unsafe-unconfined-vmm: VMMs run as root with no sandbox; a compromised VMM "
            "owns the host"
        )
        return None, 0
    try:
        r = UidRange.parse(args.uid_range)
        uids.check_system(r, 0)
        abi = sandbox.check()
    except (SpectrumError, ValueError) as e:
        raise StartupError(str(e)) from None
    return UidAllocator(r), abi


def adopt_ids(allocator: UidAllocator | None, records: dict[str, RunRecord]) -> None:
    """The ids the VMMs left running hold (read from the kernel), and any other process
    in the range (a leftover of a crashed daemon: its ids are never handed out)."""
    if allocator is None:
        return
    adopted: set[int] = set()
    for name, rec in records.items():
        try:
            status = Path(f"/proc/{rec.pid}/status").read_text()
        except OSError:
            continue
        found = [i for i in uids.ids_of_status(status) if i in allocator.range]
        if process.start_time(rec.pid) != rec.start_time or not found:
            continue
        vmm = min(found)
        try:
            allocator.adopt(name, InstanceIds(vmm=vmm, fileserver=vmm + 1))
        except SpectrumError as e:
            log.error("%s: the ids of its VMM cannot be taken back: %s", name, e)
            continue
        adopted.add(rec.pid)
    for pid, ids in uids.processes_in_range(allocator.range).items():
        if pid in adopted:
            continue
        for uid in ids:
            if allocator.holder(uid) is None:
                log.warning(
                    "pid %d runs as uid %d of the VMM range; it is not handed out", pid, uid
                )
                allocator.reserve(uid, f"leftover pid {pid}")
