"""Per-instance user ids for the VMM and the file server, from a range the daemon owns.

Every running instance gets two ids, one for its VMM and one for its file
server; each is used as both uid and gid (as systemd's ``DynamicUser=`` does),
so no two instances, and no instance and the host, share a user or a group.

The range (default ``DEFAULT_RANGE``: 2046820352-2046885887, 0x7A000000 +
64 Ki) lies in the span systemd's UIDS-GIDS.md lists as unused
(1879048192-2147352575): above every ``/etc/subuid`` range shadow's defaults
hand out (100000-600100000) and above systemd-nspawn's container ranges
(524288-1879048191), below systemd's foreign range (0x7FFE0000) and below 2^31
(tools that treat a uid as signed). It is far from systemd's DynamicUser range
(61184-65519) and the special ids 0, 65534, 65535 and 2^32-1, which a
configured range may not contain either.

At daemon start, :func:`check_range` refuses a range that overlaps a user or a
group of the system's databases (or a subordinate-id range), or that is too
small for the configured instances, naming what overlaps or the sizes. After
a restart, the ids of re-adopted VMMs are told to the allocator with
:meth:`UidAllocator.reserve` (read from the kernel, never from a record);
:func:`processes_in_range` finds any other process still running under an id
of the range (a leftover of a daemon that crashed).

The allocator is pure; :func:`system_users`, :func:`read_subids` and
:func:`processes_in_range` are the thin readers of the system.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
from collections.abc import Iterable
from pathlib import Path

import attrs

from spectrumd.errors import Busy, Failed, InvalidArgument

IDS_PER_INSTANCE = 2
# Ids a range must never contain: root, nobody, 16-bit -1, 32-bit -1.
SPECIAL_IDS = (0, 65534, 65535, 2**32 - 1)
DYNAMIC_USER = (61184, 65519)  # systemd's DynamicUser= range


@attrs.frozen
class UidRange:
    first: int
    count: int

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    @classmethod
    def parse(cls, untrusted_text: str) -> UidRange:
        """``FIRST-LAST`` (inclusive), as on a command line. Raises InvalidArgument."""
        first, sep, last = untrusted_text.partition("-")
        if not sep or not first.isdigit() or not last.isdigit() or int(last) < int(first):
            raise InvalidArgument(f'uid range "{untrusted_text[:64]}" is not FIRST-LAST')
        return cls(int(first), int(last) - int(first) + 1)


DEFAULT_RANGE = UidRange(0x7A000000, 65536)


@attrs.frozen
class InstanceIds:
    """The ids of one running instance; each is both its uid and its gid."""

    vmm: int
    fileserver: int


@attrs.frozen
class SubIds:
    """One line of /etc/subuid or /etc/subgid."""

    owner: str
    first: int
    count: int
    source: str


# -- the checks at daemon start (pure) ----------------------------------------------


def check_range(
    r: UidRange,
    instances: int,
    users: Iterable[tuple[str, int]],
    groups: Iterable[tuple[str, int]],
    subids: Iterable[SubIds] = (),
) -> None:
    """Refuse a range that is unusable for ``instances`` instances. Raises Failed
    naming the overlapping user, group or subordinate range, or the sizes."""
    if r.count < 1 or r.first < 1 or r.last >= 2**32 - 1:
        raise Failed(f"uid range {r}: ids must be 1 to {2**32 - 2}")
    for special in SPECIAL_IDS:
        if special in r:
            raise Failed(f"uid range {r} contains the special id {special}")
    if r.first <= DYNAMIC_USER[1] and DYNAMIC_USER[0] <= r.last:
        raise Failed(f"uid range {r} overlaps systemd's DynamicUser range 61184-65519")
    need = IDS_PER_INSTANCE * instances
    if r.count < need:
        raise Failed(
            f"uid range {r} holds {r.count} ids; {instances} instances need {need} "
            f"({IDS_PER_INSTANCE} per instance)"
        )
    for name, uid in users:
        if uid in r:
            raise Failed(f'uid range {r} overlaps user "{name}" (uid {uid})')
    for name, gid in groups:
        if gid in r:
            raise Failed(f'uid range {r} overlaps group "{name}" (gid {gid})')
    for s in subids:
        if s.first <= r.last and r.first <= s.first + s.count - 1:
            raise Failed(
                f'uid range {r} overlaps the subordinate ids of "{s.owner}" in {s.source} '
                f"({s.first}-{s.first + s.count - 1})"
            )


# -- the allocator (pure) --------------------------------------------------------------


class UidAllocator:
    """Hands out id pairs per running instance; never 0, never one id to two holders.

    An instance's pair is chosen from a hash of its name (stable ids in logs
    across runs), probing onward past pairs that are taken.
    """

    def __init__(self, r: UidRange) -> None:
        if r.first < 1 or r.count < IDS_PER_INSTANCE:
            raise Failed(f"uid range {r} is unusable")
        self.range = r
        self._holder: dict[int, str] = {}  # id → instance (or "leftover pid N")
        self._of: dict[str, InstanceIds] = {}

    @property
    def slots(self) -> int:
        return self.range.count // IDS_PER_INSTANCE

    def ids_of(self, instance: str) -> InstanceIds | None:
        return self._of.get(instance)

    def holder(self, uid: int) -> str | None:
        return self._holder.get(uid)

    def _slot_ids(self, slot: int) -> InstanceIds:
        base = self.range.first + IDS_PER_INSTANCE * slot
        return InstanceIds(vmm=base, fileserver=base + 1)

    def allocate(self, instance: str) -> InstanceIds:
        """Two free ids for ``instance``. Raises Failed if it holds some already (a
        run that was not released), Busy if the range is full."""
        if instance in self._of or instance in self._holder.values():
            raise Failed(f"{instance} holds ids already: release them first")
        digest = hashlib.sha256(instance.encode()).digest()
        start = int.from_bytes(digest[:8], "big") % self.slots
        for i in range(self.slots):
            ids = self._slot_ids((start + i) % self.slots)
            if ids.vmm not in self._holder and ids.fileserver not in self._holder:
                self._holder[ids.vmm] = self._holder[ids.fileserver] = instance
                self._of[instance] = ids
                return ids
        raise Busy(f"no free ids left in uid range {self.range} ({self.slots} pairs)")

    def reserve(self, uid: int, holder: str) -> None:
        """Mark ``uid`` as held by ``holder``: a re-adopted instance (its ids read
        from the kernel) or a leftover process. Raises Failed if it is outside the
        range or held by another."""
        self._check_free_for(uid, holder)
        self._holder[uid] = holder

    def adopt(self, instance: str, ids: InstanceIds) -> None:
        """A re-adopted instance's pair, as read from the kernel: held by it again.
        Raises Failed (as :meth:`reserve`) if an id is outside the range or held by
        another; then nothing is taken."""
        for uid in (ids.vmm, ids.fileserver):
            self._check_free_for(uid, instance)
        for uid in (ids.vmm, ids.fileserver):
            self._holder[uid] = instance
        self._of[instance] = ids

    def _check_free_for(self, uid: int, holder: str) -> None:
        if uid not in self.range:
            raise Failed(f"uid {uid} is outside the uid range {self.range}")
        other = self._holder.get(uid)
        if other is not None and other != holder:
            raise Failed(f"uid {uid} is held by {other}, not {holder}")

    def release(self, instance: str) -> None:
        """The run ended: its ids are free again (idempotent)."""
        self._of.pop(instance, None)
        for uid in [u for u, h in self._holder.items() if h == instance]:
            del self._holder[uid]


# -- readers of the system ---------------------------------------------------------------


def system_users() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(users, groups) as (name, id) from the system's databases (NSS included)."""
    users = [(p.pw_name, p.pw_uid) for p in pwd.getpwall()]
    groups = [(g.gr_name, g.gr_gid) for g in grp.getgrall()]
    return users, groups


def read_subids(*paths: Path) -> list[SubIds]:
    """The ``owner:first:count`` lines of /etc/subuid-style files; a missing file is
    empty, a malformed line is skipped (it allocates nothing)."""
    out: list[SubIds] = []
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            owner, _, rest = line.partition(":")
            first, _, count = rest.partition(":")
            if first.isdigit() and count.isdigit():
                out.append(SubIds(owner, int(first), int(count), str(path)))
    return out


SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def check_system(r: UidRange, instances: int) -> None:
    """:func:`check_range` against this system's users, groups and subordinate ids."""
    users, groups = system_users()
    check_range(r, instances, users, groups, read_subids(*SUBID_FILES))


def ids_of_status(status: str) -> set[int]:
    """Every uid and gid (real, effective, saved, filesystem) in a /proc/PID/status text."""
    ids: set[int] = set()
    for line in status.splitlines():
        if line.startswith(("Uid:", "Gid:")):
            ids.update(int(v) for v in line.split()[1:] if v.isdigit())
    return ids


def processes_in_range(r: UidRange, proc: Path = Path("/proc")) -> dict[int, set[int]]:
    """pid → the ids of ``r`` it runs under, for every process with any uid or gid
    in ``r``. Processes that end during the scan are skipped."""
    found: dict[int, set[int]] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            status = (proc / entry.name / "status").read_text()
        except OSError:  # gone meanwhile
            continue
        inside = {i for i in ids_of_status(status) if i in r}
        if inside:
            found[int(entry.name)] = inside
    return found
