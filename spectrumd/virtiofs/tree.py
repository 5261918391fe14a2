"""The tree a guest sees: a synthetic root over live exports, and bounded tables.

The root (nodeid 1) is a read-only directory whose entries are the
instance's exports, each a directory fd the daemon opened and passed to us.
Below an export every node is an fd we hold (O_PATH), reached from its
parent's fd one checked name at a time (see resolve.py), so the tree is a
DAG: there is no ``..`` and no way up or out.

Revocation: :meth:`Tree.remove_export` marks the :class:`Export` revoked
and closes every fd held under it at once. Each inode and handle keeps a
reference to its export and :meth:`Tree.inode` / :meth:`Tree.handle` check
it on every use, so a node looked up before the removal answers EIO from
then on, and the root no longer lists the name.

Sealed exports: once the server is confined (``sealed``), an export's fd
must be the root of a detached mount (jail.detach), read-only at the mount
for a read-only export. An attacker who takes the process over holds every
export fd; with a plain directory fd, ``openat(fd, "../..")`` would lead
out of the export into the rest of its file system, whatever our own code
checks. The check refuses an fd that does not keep to that.

Bounds: at most ``max_inodes`` nodes (ENFILE beyond) and ``max_handles``
open handles (EMFILE beyond), so a guest cannot exhaust our fds.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from .resolve import check_name, no_way_up, reopen

DEFAULT_MAX_INODES = 1 << 16
DEFAULT_MAX_HANDLES = 1 << 12


def fail(err: int) -> OSError:
    return OSError(err, os.strerror(err))


def _close_fds(h: Handle) -> None:
    for fd in (h.fd, h.warm_fd):
        if fd >= 0:
            os.close(fd)
    h.fd = h.warm_fd = -1


class ExportError(Exception):
    """An export cannot be added; the message says why."""


@dataclass(eq=False, slots=True)
class Export:
    name: bytes
    fd: int  # O_PATH directory fd, owned here
    writable: bool
    serial: int
    root_ino: int = 0  # st_ino of the export's root directory
    revoked: bool = False

    def check(self) -> None:
        if self.revoked:
            raise fail(errno.EIO)

    def check_writable(self) -> None:
        self.check()
        if not self.writable:
            raise fail(errno.EROFS)


@dataclass(eq=False, slots=True)
class Inode:
    nodeid: int
    fd: int  # O_PATH, or -1 for the root and once revoked
    export: Export | None  # None for the root
    key: tuple[int, int, int]
    mode: int  # S_IFMT bits at lookup; the inode behind an fd never changes type
    nlookup: int = 0


@dataclass(eq=False, slots=True)
class Handle:
    fd: int
    inode: Inode
    export: Export | None
    # Directory handles: the listing snapshot taken at offset 0.
    entries: list[tuple[bytes, int, int]] | None = None
    readable: bool = True  # opened for reading (not O_WRONLY)
    # A write-only handle's read-only twin, for warming (warm.py): -1 not
    # opened yet, -2 cannot be. Closed with the handle.
    warm_fd: int = -1


@dataclass
class Tree:
    max_inodes: int = DEFAULT_MAX_INODES
    max_handles: int = DEFAULT_MAX_HANDLES
    exports: dict[bytes, Export] = field(default_factory=dict)
    inodes: dict[int, Inode] = field(default_factory=dict)
    by_key: dict[tuple[int, int, int], Inode] = field(default_factory=dict)
    handles: dict[int, Handle] = field(default_factory=dict)
    # Set when confined: every export must be sealed (see above).
    sealed: bool = False
    _next_node: int = 2
    _next_fh: int = 1
    _serial: int = 0

    def __post_init__(self) -> None:
        root = Inode(1, -1, None, (0, 0, 0), stat.S_IFDIR, 1)
        self.inodes[1] = root

    # -- exports (control side) --

    def add_export(self, name: str, fd: int, writable: bool) -> None:
        """Take ownership of the directory *fd* as export *name*; raises ExportError.

        The fd is closed if the export is refused.
        """
        try:
            bname = name.encode("utf-8")
            if check_name(bname) is not None:
                raise ExportError(f"export {name!r}: not a single path component")
            if bname in self.exports:
                raise ExportError(f"export {name!r} exists")
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise ExportError(f"export {name!r}: bad fd: {e.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise ExportError(f"export {name!r}: fd is not a directory")
            if self.sealed:
                _check_sealed(name, fd, writable)
            # Our own O_PATH copy: its flags and offset are ours alone.
            path_fd = reopen(fd, os.O_PATH | os.O_DIRECTORY)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        self._serial += 1
        self.exports[bname] = Export(bname, path_fd, writable, self._serial, st.st_ino)

    def remove_export(self, name: str) -> bool:
        """Revoke export *name* now; returns whether it existed."""
        export = self.exports.pop(name.encode("utf-8"), None)
        if export is None:
            return False
        export.revoked = True
        for h in self.handles.values():
            if h.export is export:
                _close_fds(h)
        for ino in self.inodes.values():
            if ino.export is export and ino.fd >= 0:
                os.close(ino.fd)
                ino.fd = -1
        os.close(export.fd)
        return True

    def export_names(self) -> list[str]:
        return sorted(n.decode() for n in self.exports)

    # -- inodes --

    def inode(self, nodeid: int) -> Inode:
        ino = self.inodes.get(nodeid)
        if ino is None:
            raise fail(errno.ESTALE)
        if ino.export is not None:
            ino.export.check()
        return ino

    def remember(self, export: Export, fd: int, st: os.stat_result) -> Inode:
        """The inode for the O_PATH *fd* (ownership passes here), one lookup counted."""
        key = (export.serial, st.st_dev, st.st_ino)
        ino = self.by_key.get(key)
        if ino is not None:
            os.close(fd)
            ino.nlookup += 1
            return ino
        if len(self.inodes) >= self.max_inodes:
            os.close(fd)
            raise fail(errno.ENFILE)
        ino = Inode(self._next_node, fd, export, key, stat.S_IFMT(st.st_mode), 1)
        self._next_node += 1
        self.inodes[ino.nodeid] = ino
        self.by_key[key] = ino
        return ino

    def forget(self, nodeid: int, n: int) -> None:
        ino = self.inodes.get(nodeid)
        if ino is None or nodeid == 1:
            return
        ino.nlookup -= n
        if ino.nlookup <= 0:
            del self.inodes[nodeid]
            if self.by_key.get(ino.key) is ino:
                del self.by_key[ino.key]
            if ino.fd >= 0:
                os.close(ino.fd)
                ino.fd = -1

    # -- handles --

    def open_handle(self, fd: int, inode: Inode, readable: bool = True) -> int:
        if len(self.handles) >= self.max_handles:
            if fd >= 0:
                os.close(fd)
            raise fail(errno.EMFILE)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(fd, inode, inode.export, readable=readable)
        return fh

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise fail(errno.EBADF)
        if h.export is not None:
            h.export.check()
        return h

    def read_fd(self, h: Handle) -> int:
        """A descriptor to read *h*'s file with, for the server's own use
        (warming); -1: none. A write-only handle gets a read-only twin
        (the inode behind its fd never changes: no name is resolved)."""
        if h.readable or h.fd < 0:
            return h.fd
        if h.warm_fd == -1:
            try:
                h.warm_fd = reopen(h.fd, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                h.warm_fd = -2  # not readable by us: no warming for it
        return h.warm_fd if h.warm_fd >= 0 else -1

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None:
            _close_fds(h)

    def reset(self) -> None:
        """Forget every node and handle (FUSE DESTROY, or a new INIT)."""
        for fh in list(self.handles):
            self.release(fh)
        for nodeid in list(self.inodes):
            if nodeid != 1:
                self.forget(nodeid, 1 << 62)

    def close(self) -> None:
        self.reset()
        for name in list(self.exports):
            self.remove_export(name.decode())


def _check_sealed(name: str, fd: int, writable: bool) -> None:
    """Refuse an export fd that leads out of itself, or a writable mount for a read-only one."""
    try:
        closed = no_way_up(fd)
        mount_rdonly = bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
    except OSError as e:
        raise ExportError(f"export {name!r}: cannot check its fd: {e.strerror}") from None
    if not closed:
        raise ExportError(
            f"export {name!r}: '..' leads out of the directory; "
            "a confined server takes only the root of a detached mount (jail.detach)"
        )
    if not writable and not mount_rdonly:
        raise ExportError(f"export {name!r}: read-only, but its mount is writable (jail.detach)")
