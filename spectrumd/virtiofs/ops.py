"""FUSE operations on a :class:`~.tree.Tree`, shared by both transports.

Caching, chosen so that a revocation is complete when the daemon's call
returns:

* every file is opened with FOPEN_DIRECT_IO: the guest keeps no page cache
  of file data, so every read, write, open and readdir reaches us and is
  checked against its export's revoked flag (EIO once removed);
* the root's entries (the exports) have an entry timeout of 0: a removed
  export's name is gone from the next path walk (ENOENT) and a new one is
  found at once;
* names below an export keep their dentry for ``entry_timeout`` (1 s by
  default, ``--entry-timeout``; 0 is QEMU virtiofsd's ``cache=none``). A
  cached dentry holds no data: using it still needs a GETATTR, OPEN or
  LOOKUP below it, which the revoked flag refuses. What the timeout delays
  is seeing a rename made on the host. It saves a LOOKUP per path
  component on every walk;
* attributes are kept for ``attr_timeout`` (0.2 s by default,
  ``--attr-timeout``). The guest's driver always mounts with
  ``default_permissions``, so without it every directory of every path walk
  costs a GETATTR (half of all requests in ``ls -lR``). Held attributes are
  the one thing of a removed export a guest can still show (``stat`` in a
  directory it sits in), so ``remove_export`` answers with that timeout as
  ``settle``, and the daemon reports a revocation done only once it has
  passed. The root directory's own attributes are ours, not an export's
  (cached 1 s).

Rules enforced here for every request, whatever the guest claims:

* names are single components (no ``/``, NUL, ``.`` or ``..``; at most 255
  bytes), resolved with openat2 beneath the parent's fd, no symlinks
  followed (a symlink can be looked up and read with READLINK, never
  traversed or opened);
* only regular files and directories are ever opened, and only after
  fstat of the O_PATH fd said so (a FIFO or device node is shown, never
  opened); CREATE always creates with O_EXCL;
* the request's uid/gid are ignored: files belong to the server's uid;
  chown to another owner and any setuid/setgid bit are refused (EPERM);
* a read-only export refuses every change (EROFS); the root refuses
  changes too;
* no xattrs (ENOSYS), no hard links, symlink creation or mknod (ENOSYS);
* no SYNCFS (ENOSYS, and the guest stops asking): a guest's sync(2) would
  flush the whole host file system, on the one thread that also serves its
  requests and the daemon's revocations. FSYNC flushes the file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import protocol as P
from .listing import Entry, RootStat, encode_readdir, encode_readdirplus, snapshot
from .resolve import check_name, chmod_fd, open_beneath, reopen, truncate_fd, utime_fd
from .tree import Inode, Tree, fail

ROOT_ENTRY_VALID = 0
DEFAULT_ATTR_TIMEOUT = 0.2
# The synthetic root's own attributes (a read-only directory of ours) may be
# cached: they say nothing about any export. Saves a GETATTR per path walk.
ROOT_ATTR_VALID = (1, 0)
DEFAULT_ENTRY_TIMEOUT = 1.0
MAX_PAGES = 256  # 1 MiB requests, the kernel's limit (FUSE_MAX_MAX_PAGES)
MAX_WRITE = MAX_PAGES * 4096
# READDIRPLUS (the kernel chooses it when a listing is followed by lookups,
# READDIRPLUS_AUTO): names below an export keep their dentry for
# entry_timeout, so `ls -l` or `find` needs no LOOKUP per name after it. Its
# lookups are ordinary ones (counted, bounded, checked against the revoked
# flag); the attributes it returns expire at once like every other.
# No ASYNC_DIO either: it makes the guest split an O_DIRECT transfer into
# concurrent max_pages requests, which a single-threaded server answers one
# after another anyway (measured: 64-page requests read at half the speed
# of 256-page ones).
_WANT = (
    P.ASYNC_READ | P.BIG_WRITES | P.MAX_PAGES | P.PARALLEL_DIROPS
    | P.DO_READDIRPLUS | P.READDIRPLUS_AUTO
)  # fmt: skip
_OPEN_KEEP = os.O_ACCMODE | os.O_APPEND
# No FLUSH on close: it would do nothing here (no locks, no write-back), and
# it is one round trip per close. Kernels before 7.35 ignore the flag.
_FILE_OPEN = P.FOPEN_DIRECT_IO | P.FOPEN_NOFLUSH
_SUID = stat.S_ISUID | stat.S_ISGID

_libc = ctypes.CDLL(None, use_errno=True)


def _readable(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_WRONLY


def _renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(olddir, old, newdir, new, ctypes.c_uint(flags)) != 0:
        raise fail(ctypes.get_errno())


class FileSystem:
    """Answers parsed requests; READ and WRITE move data through given buffers."""

    def __init__(
        self,
        tree: Tree | None = None,
        entry_timeout: float = DEFAULT_ENTRY_TIMEOUT,
        max_pages: int = MAX_PAGES,
        root_entry_timeout: float = ROOT_ENTRY_VALID,
        attr_timeout: float = DEFAULT_ATTR_TIMEOUT,
    ) -> None:
        self._root_entry_valid = P.valid(root_entry_timeout)
        self._entry_valid = P.valid(entry_timeout)
        self._attr_valid = P.valid(attr_timeout)
        # How long after a removal the guest may still show attributes it holds.
        self.attr_timeout = max(0.0, attr_timeout)
        self.tree = tree if tree is not None else Tree()
        self.max_pages = max(1, min(max_pages, MAX_PAGES))
        self.initialized = False
        self._ops: dict[int, Callable[[P.Request], bytes | None]] = {
            P.INIT: self._init, P.DESTROY: self._destroy,
            P.LOOKUP: self._lookup, P.FORGET: self._forget, P.BATCH_FORGET: self._batch_forget,
            P.GETATTR: self._getattr, P.SETATTR: self._setattr, P.READLINK: self._readlink,
            P.OPEN: self._open, P.OPENDIR: self._opendir, P.CREATE: self._create,
            P.READDIR: self._readdir, P.READDIRPLUS: self._readdirplus,
            P.RELEASE: self._release, P.RELEASEDIR: self._release,
            P.FLUSH: self._nothing, P.FSYNC: self._fsync, P.FSYNCDIR: self._fsync,
            P.MKDIR: self._mkdir, P.UNLINK: self._unlink, P.RMDIR: self._rmdir,
            P.RENAME: self._rename, P.RENAME2: self._rename, P.STATFS: self._statfs,
            P.ACCESS: self._access,
        }  # fmt: skip

    def dispatch(self, req: P.Request) -> bytes | None:
        """The reply body for *req* (None: no reply); raises OSError.

        READ and WRITE go through :meth:`read` and :meth:`write` instead.
        """
        op = self._ops.get(req.opcode)
        if op is None or (req.args is None and req.opcode in (P.READ, P.WRITE)):
            raise fail(errno.ENOSYS)
        if not self.initialized and req.opcode != P.INIT:
            raise fail(errno.EIO)
        return op(req)

    # -- data --

    def read(self, fh: int, offset: int, bufs: Sequence[Any]) -> int:
        """preadv handle *fh*'s file into *bufs* (already trimmed to the request's size)."""
        h = self.tree.handle(fh)
        if h.entries is not None:
            raise fail(errno.EISDIR)
        return os.preadv(h.fd, bufs, offset)

    def write(self, fh: int, offset: int, bufs: Sequence[Any]) -> int:
        """pwritev *bufs* (trimmed to the request's size) at *offset* of handle *fh*'s file."""
        h = self.tree.handle(fh)
        if h.export is None or h.entries is not None:
            raise fail(errno.EBADF)
        h.export.check_writable()
        return os.pwritev(h.fd, bufs, offset)

    # -- helpers --

    def _entry(self, ino: Inode, st: Any = None) -> bytes:
        """The entry reply for *ino*; *st* is a stat of it made just now, if any."""
        if ino.export is not None and ino.key[2] != ino.export.root_ino:
            entry = self._entry_valid
        else:
            entry = self._root_entry_valid
        if st is None:
            st = self._stat(ino)
        return P.encode_entry(ino.nodeid, st, entry, self._attr_valid)

    def _stat(self, ino: Inode) -> Any:
        if ino.export is None:
            return RootStat(len(self.tree.exports))
        return os.fstat(ino.fd)

    def _child(self, parent: Inode, name: bytes) -> tuple[Inode, Any]:
        """Look *name* up below *parent*, counting one lookup; returns it and its stat."""
        tree = self.tree
        bad = check_name(name)
        if bad is not None:
            raise fail(bad)
        if parent.export is None:
            export = tree.exports.get(name)
            if export is None:
                raise fail(errno.ENOENT)
            st = os.fstat(export.fd)
            known = tree.by_key.get((export.serial, st.st_dev, st.st_ino))
            if known is not None:  # looked up again on every path walk (timeout 0)
                known.nlookup += 1
                return known, st
            fd = os.dup(export.fd)
            return tree.remember(export, fd, st), st
        if not stat.S_ISDIR(parent.mode):
            raise fail(errno.ENOTDIR)
        # Fast path for a node we already hold: fstatat of one checked
        # component, not following a symlink, finds its (dev, ino). The
        # inode number cannot have been reused: our fd keeps it alive.
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        known = tree.by_key.get((parent.export.serial, st.st_dev, st.st_ino))
        if known is not None:
            known.nlookup += 1
            return known, st
        fd = open_beneath(parent.fd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return tree.remember(parent.export, fd, st), st

    def _dir_for_change(self, nodeid: int) -> Inode:
        parent = self.tree.inode(nodeid)
        if parent.export is None:
            raise fail(errno.EROFS)
        parent.export.check_writable()
        if not stat.S_ISDIR(parent.mode):
            raise fail(errno.ENOTDIR)
        return parent

    # -- operations --

    def _init(self, req: P.Request) -> bytes:
        a: P.InitIn = req.args
        if a.major < P.KERNEL_VERSION or (a.major == P.KERNEL_VERSION and a.minor < 31):
            raise fail(errno.EPROTO)
        self.tree.reset()
        self.initialized = True
        # Never EXPORT_SUPPORT: it would make the kernel ask for "." and "..".
        pages = self.max_pages
        return P.encode_init(
            min(a.max_readahead, pages * 4096), a.flags & _WANT, pages * 4096, pages
        )

    def _destroy(self, req: P.Request) -> bytes:
        self.tree.reset()
        self.initialized = False
        return b""

    def _nothing(self, req: P.Request) -> bytes:
        self.tree.handle(req.args)
        return b""

    def _lookup(self, req: P.Request) -> bytes:
        return self._entry(*self._child(self.tree.inode(req.nodeid), req.args))

    def _forget(self, req: P.Request) -> None:
        self.tree.forget(req.nodeid, req.args)

    def _batch_forget(self, req: P.Request) -> None:
        for nodeid, n in req.args:
            self.tree.forget(nodeid, n)

    def _getattr(self, req: P.Request) -> bytes:
        ino = self.tree.inode(req.nodeid)
        return P.encode_attr_out(
            self._stat(ino), ROOT_ATTR_VALID if ino.nodeid == 1 else self._attr_valid
        )

    def _setattr(self, req: P.Request) -> bytes:
        a: P.SetattrIn = req.args
        ino = self.tree.inode(req.nodeid)
        if ino.export is None:
            raise fail(errno.EROFS)
        ino.export.check_writable()
        st = os.fstat(ino.fd)
        if stat.S_ISLNK(ino.mode) or not (stat.S_ISREG(ino.mode) or stat.S_ISDIR(ino.mode)):
            raise fail(errno.EPERM)
        v = a.valid
        if (v & P.FATTR_UID and a.uid != st.st_uid) or (v & P.FATTR_GID and a.gid != st.st_gid):
            raise fail(errno.EPERM)
        if v & P.FATTR_MODE:
            if a.mode & _SUID:
                raise fail(errno.EPERM)
            chmod_fd(ino.fd, stat.S_IMODE(a.mode))
        if v & P.FATTR_SIZE:
            if not stat.S_ISREG(ino.mode):
                raise fail(errno.EISDIR)
            h = self.tree.handles.get(a.fh) if v & P.FATTR_FH else None
            if h is not None and h.inode is ino and h.fd >= 0:
                os.ftruncate(h.fd, a.size)
            else:
                truncate_fd(ino.fd, a.size)
        if v & (P.FATTR_ATIME | P.FATTR_MTIME | P.FATTR_ATIME_NOW | P.FATTR_MTIME_NOW):
            now = time.time_ns()
            at = st.st_atime_ns
            mt = st.st_mtime_ns
            if v & P.FATTR_ATIME:
                at = now if v & P.FATTR_ATIME_NOW else a.atime * 10**9 + a.atimensec
            if v & P.FATTR_MTIME:
                mt = now if v & P.FATTR_MTIME_NOW else a.mtime * 10**9 + a.mtimensec
            utime_fd(ino.fd, (at, mt))
        return P.encode_attr_out(os.fstat(ino.fd), self._attr_valid)

    def _readlink(self, req: P.Request) -> bytes:
        ino = self.tree.inode(req.nodeid)
        if not stat.S_ISLNK(ino.mode):
            raise fail(errno.EINVAL)
        return os.readlink(b"", dir_fd=ino.fd)

    def _reopen(self, ino: Inode, flags: int, want: int) -> int:
        """A real open of *ino*, which fstat says is of type *want*."""
        st = os.fstat(ino.fd)
        if stat.S_IFMT(st.st_mode) != want:
            raise fail(
                errno.EISDIR if stat.S_ISDIR(st.st_mode) else
                errno.ELOOP if stat.S_ISLNK(st.st_mode) else
                errno.ENOTDIR if want == stat.S_IFDIR else errno.EACCES
            )  # fmt: skip
        return reopen(ino.fd, flags | os.O_NONBLOCK)

    def _open(self, req: P.Request) -> bytes:
        ino = self.tree.inode(req.nodeid)
        if ino.export is None:
            raise fail(errno.EISDIR)
        flags = req.args & _OPEN_KEEP
        if flags & os.O_ACCMODE != os.O_RDONLY or req.args & os.O_TRUNC:
            ino.export.check_writable()
        fd = self._reopen(ino, flags | (req.args & os.O_TRUNC), stat.S_IFREG)
        fh = self.tree.open_handle(fd, ino, readable=_readable(flags))
        return P.encode_open(fh, _FILE_OPEN)

    def _opendir(self, req: P.Request) -> bytes:
        ino = self.tree.inode(req.nodeid)
        if ino.export is None:
            fd = -1  # the listing comes from the export table
        else:
            fd = self._reopen(ino, os.O_RDONLY | os.O_DIRECTORY, stat.S_IFDIR)
        return P.encode_open(self.tree.open_handle(fd, ino), 0)

    def _create(self, req: P.Request) -> bytes:
        a: P.CreateIn = req.args
        parent = self._dir_for_change(req.nodeid)
        if a.mode & _SUID:
            raise fail(errno.EPERM)
        flags = a.flags & (_OPEN_KEEP | os.O_TRUNC)
        st = None  # the new file's stat, for the reply (an existing one may be truncated)
        try:
            fd = open_beneath(parent.fd, a.name, flags | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK,
                              stat.S_IMODE(a.mode))  # fmt: skip
        except FileExistsError:
            if a.flags & os.O_EXCL:
                raise
            ino = self._child(parent, a.name)[0]
            try:
                fd = self._reopen(ino, flags, stat.S_IFREG)
            except BaseException:
                self.tree.forget(ino.nodeid, 1)
                raise
        else:
            try:
                path_fd = reopen(fd, os.O_PATH)
                st = os.fstat(fd)
                ino = self.tree.remember(parent.export, path_fd, st)  # type: ignore[arg-type]
            except BaseException:
                os.close(fd)
                raise
        try:
            fh = self.tree.open_handle(fd, ino, readable=_readable(flags))
        except BaseException:
            self.tree.forget(ino.nodeid, 1)
            raise
        return self._entry(ino, st) + P.encode_open(fh, _FILE_OPEN)

    def _mkdir(self, req: P.Request) -> bytes:
        a: P.CreateIn = req.args
        parent = self._dir_for_change(req.nodeid)
        if a.mode & _SUID:
            raise fail(errno.EPERM)
        _check(a.name)
        os.mkdir(a.name, stat.S_IMODE(a.mode), dir_fd=parent.fd)
        return self._entry(*self._child(parent, a.name))

    def _unlink(self, req: P.Request) -> bytes:
        parent = self._dir_for_change(req.nodeid)
        _check(req.args)
        os.unlink(req.args, dir_fd=parent.fd)
        return b""

    def _rmdir(self, req: P.Request) -> bytes:
        parent = self._dir_for_change(req.nodeid)
        _check(req.args)
        os.rmdir(req.args, dir_fd=parent.fd)
        return b""

    def _rename(self, req: P.Request) -> bytes:
        a: P.RenameIn = req.args
        src = self._dir_for_change(req.nodeid)
        dst = self._dir_for_change(a.newdir)
        _check(a.old)
        _check(a.new)
        if src.export is not dst.export:
            raise fail(errno.EXDEV)
        if a.flags & ~3:  # RENAME_NOREPLACE | RENAME_EXCHANGE only, no WHITEOUT
            raise fail(errno.EINVAL)
        _renameat2(src.fd, a.old, dst.fd, a.new, a.flags)
        return b""

    def _statfs(self, req: P.Request) -> bytes:
        ino = self.tree.inode(req.nodeid)
        if ino.export is None:
            return P.encode_statfs(os.statvfs_result((4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255)))
        return P.encode_statfs(os.fstatvfs(ino.fd))

    def _access(self, req: P.Request) -> bytes:
        ino = self.tree.inode(req.nodeid)
        if req.args & os.W_OK and (ino.export is None or not ino.export.writable):
            raise fail(errno.EROFS)
        return b""

    def _fsync(self, req: P.Request) -> bytes:
        h = self.tree.handle(req.args)
        if h.export is not None:
            os.fsync(h.fd)
        return b""

    def _release(self, req: P.Request) -> bytes:
        self.tree.release(req.args)
        return b""

    # -- directories --

    def _listing(self, req: P.Request) -> tuple[Inode, list[Entry], int]:
        a: P.ReadIn = req.args
        h = self.tree.handle(a.fh)
        if h.entries is None or a.offset == 0:
            h.entries = snapshot(self.tree, h)
        return h.inode, h.entries, min(a.size, MAX_WRITE)

    def _readdir(self, req: P.Request) -> bytes:
        _, entries, size = self._listing(req)
        return encode_readdir(entries, req.args.offset, size)

    def _readdirplus(self, req: P.Request) -> bytes:
        parent, entries, size = self._listing(req)
        return encode_readdirplus(
            entries, req.args.offset, size, lambda n: self._entry(*self._child(parent, n))
        )


def _check(name: bytes) -> None:
    bad = check_name(name)
    if bad is not None:
        raise fail(bad)
