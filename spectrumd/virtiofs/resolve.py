"""Opening one name below a directory fd without ever leaving it (shared by the FUSE server).

Every lookup the server makes is ``(directory fd, one name)``; a name is
checked by :func:`check_name` first, so a path string never reaches the
kernel. The open itself is ``openat2(2)`` with RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV, called through
ctypes because Python 3.11 has no wrapper. That is defence in depth: with a
single checked component the kernel would already stay below the fd, and
the flags also forbid following a symlink in the last component and
crossing into another mount. Where openat2 is missing (kernels before 5.6,
or a seccomp filter answering ENOSYS) the fallback is ``openat`` with
O_NOFOLLOW and an st_dev comparison in place of RESOLVE_NO_XDEV (it cannot
see a bind mount of the same file system; openat2 can).

With O_PATH | O_NOFOLLOW both paths give an fd for a symlink itself
instead of failing, which lets walk report a symlink without following it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Any

NAME_MAX = 255

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

# openat2 was added after the syscall tables were unified: 437 everywhere.
_SYS_OPENAT2 = 437


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_syscall: Any = None
try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
    _syscall = None


def _probe_openat2() -> bool:
    """Whether openat2 works here; some seccomp filters answer EPERM, not ENOSYS."""
    if _syscall is None:
        return False
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(_openat2(root, b".", os.O_PATH | os.O_CLOEXEC, 0))
    except OSError:
        return False
    finally:
        os.close(root)
    return True


_have_openat2: bool | None = None  # probed on first use


def check_name(name: bytes) -> int | None:
    """The errno refusing *name* as a single path component, or None if fine.

    ``.`` and ``..`` read as absent (ENOENT): the exported tree is a DAG
    with no way up, and ``.`` would alias the directory itself.
    """
    if not name or b"/" in name or b"\0" in name:
        return errno.EINVAL
    if len(name) > NAME_MAX:
        return errno.ENAMETOOLONG
    if name in (b".", b".."):
        return errno.ENOENT
    return None


def _openat2(dirfd: int, name: bytes, flags: int, mode: int) -> int:
    how = _OpenHow(flags, mode, _RESOLVE)
    for _ in range(8):
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(name),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        # EAGAIN: a concurrent rename or mount made the kernel unsure that
        # the result is beneath dirfd; it asks us to retry.
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def _openat_fallback(dirfd: int, name: bytes, flags: int, mode: int) -> int:
    fd = os.open(name, flags, mode, dir_fd=dirfd)
    try:
        st = os.fstat(fd)
        if st.st_dev != os.fstat(dirfd).st_dev and not stat.S_ISLNK(st.st_mode):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """Open *name* (one checked component) below *dirfd*, never following links.

    O_NOFOLLOW and O_CLOEXEC are always added. Raises OSError.
    """
    global _have_openat2
    bad = check_name(name)
    if bad is not None:
        raise OSError(bad, os.strerror(bad))
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _have_openat2 is None:
        _have_openat2 = _probe_openat2()
    if _have_openat2:
        try:
            return _openat2(dirfd, name, flags, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return _openat_fallback(dirfd, name, flags, mode)


def use_openat2(enabled: bool) -> bool:
    """Switch openat2 on or off (tests exercise the fallback); returns the old value."""
    global _have_openat2
    old = _have_openat2 if _have_openat2 is not None else _probe_openat2()
    _have_openat2 = enabled and _probe_openat2()
    return old


# /proc/self/fd as a directory fd: every reopen goes through it, so the
# server names no path. Opened on first use; jail.enter installs one from a
# procfs of its own before the file system disappears.
_proc_fd = -1


def proc_fd() -> int:
    """The directory fd of /proc/self/fd (opened on first use). Raises OSError."""
    global _proc_fd
    if _proc_fd < 0:
        _proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _proc_fd


def use_proc_fd(fd: int) -> None:
    """Reopen through *fd* (a /proc/self/fd directory, owned here) from now on."""
    global _proc_fd
    old, _proc_fd = _proc_fd, fd
    if old >= 0:
        os.close(old)


def _forget_proc_fd() -> None:
    # A forked child inherits its parent's /proc/PID/fd: reopening through it
    # would reach the parent's descriptors. The child opens its own.
    global _proc_fd
    if _proc_fd >= 0:
        os.close(_proc_fd)
    _proc_fd = -1


os.register_at_fork(after_in_child=_forget_proc_fd)


def reopen(path_fd: int, flags: int) -> int:
    """A new open file description for the inode behind the O_PATH *path_fd*.

    Safe only after the caller checked, with fstat on *path_fd*, that the
    inode is a regular file or a directory: the inode behind an fd never
    changes, so unlike reopening by name no rename or symlink swap can slip
    a FIFO or device in between the check and the open. The open goes
    through the /proc/self/fd magic link because openat2 has no
    AT_EMPTY_PATH; that is the one magic link this server follows.
    """
    return os.open(str(path_fd), flags | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=proc_fd())


def chmod_fd(path_fd: int, mode: int) -> None:
    """chmod the inode behind the O_PATH *path_fd* (fchmod refuses O_PATH fds)."""
    os.chmod(str(path_fd), mode, dir_fd=proc_fd())


def utime_fd(path_fd: int, ns: tuple[int, int]) -> None:
    """Set the atime and mtime (nanoseconds) of the inode behind *path_fd*."""
    os.utime(str(path_fd), ns=ns, dir_fd=proc_fd())


def truncate_fd(path_fd: int, size: int) -> None:
    """Truncate the regular file behind *path_fd* (truncate(2) has no dirfd form).

    Opening it for writing needs the same permission truncate(2) does.
    """
    fd = reopen(path_fd, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def no_way_up(dirfd: int) -> bool:
    """Whether ``..`` of the directory *dirfd* is the directory itself. Raises OSError.

    True for the root of a detached mount (jail.detach) and for a root
    directory: whoever holds such an fd reaches nothing above it. For any
    other directory fd, ``openat(fd, "../..")`` walks up into the rest of
    its file system.
    """
    up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        here, there = os.fstat(dirfd), os.fstat(up)
    finally:
        os.close(up)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
