"""Named exports of one instance, changeable while its connections live.

An instance's mount root is a synthetic read-only directory whose entries
are its exports. The daemon replaces the whole set at once
(:meth:`ExportTable.replace`); an entry that disappears, or whose path or
writability changes, is *revoked*: every fid under it fails with EIO on its
next use, because each fid keeps a reference to the :class:`Export` it was
walked from and checks it on every operation. Entries that stay the same
keep their object, so their fids keep working.

Tables are read by session worker threads and replaced by the control
loop: a replacement swaps one dict reference (atomic under the GIL), and
each export's root fd is guarded by a lock so that a revoke cannot close it
while a walk is duplicating it (a closed fd number can be reused at once by
an unrelated open).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from spectrumd.virtiofs.resolve import check_name


class ExportError(Exception):
    """An export specification is unusable; the message names the export."""


class RevokedError(Exception):
    """The export a fid belongs to was removed or changed."""


@dataclass(frozen=True, slots=True)
class ExportSpec:
    path: str
    writable: bool


class Export:
    """One exported host directory, held open as an O_PATH fd."""

    def __init__(self, name: str, spec: ExportSpec, root_fd: int) -> None:
        self.name = name
        self.spec = spec
        self._root_fd = root_fd
        # The root inode never changes for this object: its stat is kept for
        # the synthetic root's directory listing.
        self.root_stat = os.fstat(root_fd)
        self._lock = threading.Lock()
        self.revoked = False

    @property
    def writable(self) -> bool:
        return self.spec.writable

    def check(self) -> None:
        """Raise RevokedError if this export is gone."""
        if self.revoked:
            raise RevokedError(self.name)

    def dup_root(self) -> int:
        """A new O_PATH fd for the export's root; raises RevokedError."""
        with self._lock:
            if self.revoked:
                raise RevokedError(self.name)
            return os.dup(self._root_fd)

    def revoke(self) -> None:
        with self._lock:
            if not self.revoked:
                self.revoked = True
                os.close(self._root_fd)


def validate_exports(untrusted_exports: object) -> dict[str, ExportSpec]:
    """Check the ``exports`` object of a set_exports command.

    Raises ExportError naming the first bad export.
    """
    if not isinstance(untrusted_exports, dict):
        raise ExportError("exports must be an object")
    specs: dict[str, ExportSpec] = {}
    for name, untrusted_spec in untrusted_exports.items():
        if not isinstance(name, str) or check_name(name.encode("utf-8", "surrogatepass")):
            raise ExportError(f"export {name!r}: not a valid single-component name")
        if not isinstance(untrusted_spec, dict):
            raise ExportError(f"export {name!r}: must be an object")
        path = untrusted_spec.get("path")
        writable = untrusted_spec.get("writable", False)
        if not isinstance(path, str) or "\0" in path or not os.path.isabs(path):
            raise ExportError(f"export {name!r}: path must be an absolute path")
        if os.path.normpath(path) != path:
            raise ExportError(f"export {name!r}: path {path!r} is not canonical")
        if not isinstance(writable, bool):
            raise ExportError(f"export {name!r}: writable must be true or false")
        extra = set(untrusted_spec) - {"path", "writable"}
        if extra:
            raise ExportError(f"export {name!r}: unknown keys {sorted(extra)}")
        specs[name] = ExportSpec(path, writable)
    return specs


def _open_export(name: str, spec: ExportSpec) -> Export:
    try:
        # The configured path is trusted (it comes from the daemon's
        # validated configuration), so symlinks along it may be followed;
        # only what lies below it is guest-controlled.
        fd = os.open(spec.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ExportError(f"export {name!r}: {spec.path}: {e.strerror}") from None
    return Export(name, spec, fd)


class ExportTable:
    """The exports of one instance, shared by all its connections."""

    def __init__(self) -> None:
        self._entries: dict[str, Export] = {}
        # Bumped on every change; it is the root directory's qid version so
        # a client can tell that the listing changed.
        self.generation = 0

    def lookup(self, name: bytes) -> Export | None:
        try:
            return self._entries.get(name.decode("utf-8"))
        except UnicodeDecodeError:
            return None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> dict[str, Export]:
        return self._entries

    def replace(self, specs: dict[str, ExportSpec]) -> None:
        """Install *specs*: all or nothing. Raises ExportError."""
        old = self._entries
        new: dict[str, Export] = {}
        try:
            for name, spec in specs.items():
                current = old.get(name)
                if current is not None and current.spec == spec:
                    new[name] = current
                else:
                    new[name] = _open_export(name, spec)
        except BaseException:
            for name, export in new.items():
                if old.get(name) is not export:
                    export.revoke()
            raise
        self._entries = new
        self.generation += 1
        for name, export in old.items():
            if new.get(name) is not export:
                export.revoke()

    def clear(self) -> None:
        self.replace({})
