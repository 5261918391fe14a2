"""File operations on fids: open, create, I/O, attributes, directory changes.

Each function takes already-looked-up fids and raises OSError or FsError;
:mod:`.session` turns those into Rlerror. Rules kept here:

* Device nodes, FIFOs and sockets are never opened. The type is read with
  fstat on the fid's O_PATH fd, and only then is that same inode reopened
  (see :func:`.resolve.reopen`). Opening by name with O_NONBLOCK and
  checking afterwards would not do: the open itself already has effects on
  a FIFO (it wakes a writer) or a device (a tape rewinds).
* A read-only export refuses every change with EROFS, checked before any
  host call. So does the synthetic root.
* New files and directories get at most 0o777: a guest never creates
  set-id or sticky files on the host. Ownership is never changed (chown is
  refused unless it would change nothing, which ``cp -p`` relies on).
* Hard links are refused, but a hard link that already exists in an
  export to a file outside it is reachable: the file *is* in the export
  under that name, and no check on names can tell.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from spectrumd.virtiofs.resolve import check_name, open_beneath, reopen

from .messages import (
    AT_REMOVEDIR,
    SETATTR_ATIME,
    SETATTR_ATIME_SET,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_SET,
    SETATTR_SIZE,
    SETATTR_UID,
    Qid,
    Tsetattr,
)
from .nodes import DirCursor, Fid, FsError, qid_of

_WRITE_FLAGS = os.O_TRUNC  # besides a write access mode, what makes an open a change
_MODE_MASK = 0o777


def _name(name: bytes) -> bytes:
    bad = check_name(name)
    if bad is not None:
        raise FsError(bad)
    return name


def _writable(fid: Fid) -> None:
    """Refuse a change through *fid* unless its export is writable."""
    if fid.export is None or not fid.export.writable:
        raise FsError(errno.EROFS)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def lopen(fid: Fid, flags: int) -> Qid:
    if fid.opened or fid.xattr:
        raise FsError(errno.EINVAL)
    acc = flags & os.O_ACCMODE
    if acc == os.O_ACCMODE:
        raise FsError(errno.EINVAL)
    changes = acc != os.O_RDONLY or flags & _WRITE_FLAGS
    if fid.is_root:
        if changes:
            raise FsError(errno.EROFS)
        fid.accmode = os.O_RDONLY
        return fid.qid
    if changes:
        _writable(fid)
    st = os.fstat(fid.path_fd)
    if stat.S_ISDIR(st.st_mode):
        if changes:
            raise FsError(errno.EISDIR)
        # "." below an O_PATH directory fd is that directory, no link involved.
        fid.io_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fid.path_fd)
        fid.cursor = DirCursor(fid.io_fd)
    elif stat.S_ISREG(st.st_mode):
        # O_APPEND is dropped: pwrite on an O_APPEND fd ignores the offset,
        # and the client already sends end-of-file offsets for appends.
        fid.io_fd = reopen(fid.path_fd, acc | (flags & _WRITE_FLAGS))
    elif stat.S_ISLNK(st.st_mode):
        raise FsError(errno.ELOOP)
    else:
        raise FsError(errno.EPERM)  # device, FIFO or socket: never opened
    fid.accmode = acc
    fid.qid = qid_of(st)
    return fid.qid


def lcreate(fid: Fid, name: bytes, flags: int, mode: int) -> Qid:
    fid.require_dir()
    _writable(fid)
    acc = flags & os.O_ACCMODE
    if acc == os.O_ACCMODE:
        raise FsError(errno.EINVAL)
    # O_EXCL always: without it an existing FIFO or device of that name
    # would be opened (and O_NOFOLLOW alone still opens a FIFO).
    fd = open_beneath(fid.path_fd, _name(name), os.O_CREAT | os.O_EXCL | acc, mode & _MODE_MASK)
    try:
        st = os.fstat(fd)
        path_fd = os.dup(fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fid.path_fd)
    fid.path_fd, fid.io_fd, fid.accmode = path_fd, fd, acc
    fid.mode = st.st_mode
    fid.qid = qid_of(st)
    return fid.qid


def read(fid: Fid, offset: int, count: int) -> bytes:
    if fid.xattr:
        return b""
    if not fid.opened or fid.accmode == os.O_WRONLY:
        raise FsError(errno.EBADF)
    if fid.io_fd < 0 or fid.cursor is not None:
        raise FsError(errno.EISDIR)
    return os.pread(fid.io_fd, count, offset)


def write(fid: Fid, offset: int, data: bytes) -> int:
    if fid.xattr or fid.is_root:
        raise FsError(errno.EROFS)
    _writable(fid)
    if fid.io_fd < 0 or fid.accmode not in (os.O_WRONLY, os.O_RDWR):
        raise FsError(errno.EBADF)
    return os.pwrite(fid.io_fd, data, offset)


def readdir(fid: Fid, offset: int, count: int) -> bytes:
    if fid.cursor is None:
        raise FsError(errno.ENOTDIR if fid.opened else errno.EBADF)
    return fid.cursor.read(offset, count, os.fstat(fid.path_fd).st_dev)


def fsync(fid: Fid, datasync: int) -> None:
    if fid.io_fd >= 0 and fid.cursor is None and fid.accmode != os.O_RDONLY:
        (os.fdatasync if datasync else os.fsync)(fid.io_fd)


def setattr(fid: Fid, msg: Tsetattr) -> None:
    if fid.xattr:
        raise FsError(errno.EINVAL)
    _writable(fid)
    st = os.fstat(fid.path_fd)
    valid = msg.valid
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise FsError(errno.EPERM)
    if (valid & SETATTR_UID and msg.uid != st.st_uid) or (
        valid & SETATTR_GID and msg.gid != st.st_gid
    ):
        raise FsError(errno.EPERM)
    if valid & SETATTR_SIZE and stat.S_ISDIR(st.st_mode):
        raise FsError(errno.EISDIR)
    if valid & SETATTR_MODE:
        os.chmod(_proc(fid.path_fd), msg.mode & _MODE_MASK)
    if valid & SETATTR_SIZE:
        if fid.io_fd >= 0 and fid.accmode in (os.O_WRONLY, os.O_RDWR):
            os.ftruncate(fid.io_fd, msg.size)
        else:
            fd = reopen(fid.path_fd, os.O_WRONLY)
            try:
                os.ftruncate(fd, msg.size)
            finally:
                os.close(fd)
    if valid & (SETATTR_ATIME | SETATTR_MTIME):
        now = time.time_ns()

        def pick(bit: int, set_bit: int, sec: int, nsec: int, current: int) -> int:
            # A time bit without its _SET bit means "now" (utimensat UTIME_NOW).
            if not valid & bit:
                return current
            return sec * 1_000_000_000 + nsec if valid & set_bit else now

        atime = pick(SETATTR_ATIME, SETATTR_ATIME_SET, msg.atime_sec, msg.atime_nsec,
                     st.st_atime_ns)  # fmt: skip
        mtime = pick(SETATTR_MTIME, SETATTR_MTIME_SET, msg.mtime_sec, msg.mtime_nsec,
                     st.st_mtime_ns)  # fmt: skip
        os.utime(_proc(fid.path_fd), ns=(atime, mtime))
    # SETATTR_CTIME alone: the kernel moves ctime with any change; nothing to do.


def mkdir(fid: Fid, name: bytes, mode: int) -> Qid:
    fid.require_dir()
    _writable(fid)
    name = _name(name)
    os.mkdir(name, mode & _MODE_MASK, dir_fd=fid.path_fd)
    return qid_of(os.stat(name, dir_fd=fid.path_fd, follow_symlinks=False))


def unlinkat(fid: Fid, name: bytes, flags: int) -> None:
    fid.require_dir()
    _writable(fid)
    if flags & ~AT_REMOVEDIR:
        raise FsError(errno.EINVAL)
    name = _name(name)
    if flags & AT_REMOVEDIR:
        os.rmdir(name, dir_fd=fid.path_fd)
    else:
        os.unlink(name, dir_fd=fid.path_fd)


def renameat(old: Fid, oldname: bytes, new: Fid, newname: bytes) -> None:
    old.require_dir()
    new.require_dir()
    _writable(old)
    _writable(new)
    if old.export is not new.export:
        raise FsError(errno.EXDEV)  # exports are separate trees, even on one fs
    os.rename(_name(oldname), _name(newname), src_dir_fd=old.path_fd, dst_dir_fd=new.path_fd)


def readlink(fid: Fid) -> bytes:
    if fid.is_root or fid.xattr or not stat.S_ISLNK(fid.mode):
        raise FsError(errno.EINVAL)
    # readlinkat(fd, "") reads the link an O_PATH fd names; nothing is followed.
    return os.readlink(b"", dir_fd=fid.path_fd)
