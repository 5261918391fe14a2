"""Host paths that another uid may have shaped, resolved once and held as descriptors.

A path a caller names (an ad-hoc grant, a file chooser's answer) is resolved
with openat2(2) and ``RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``: the
kernel refuses a symlink in *any* component, not only the last, and a
``/proc/PID/root``-style magic link, in the same walk that opens the
directory. ``lstat`` per component, then ``open``, would race a rename; this
does not. The result is an ``O_PATH | O_DIRECTORY`` descriptor: what is
granted is that inode, whatever the path names later.

Rules for the path itself, checked before the kernel sees it: absolute;
canonical (no empty, ``.`` or ``..`` component, no trailing ``/`` except for
``/`` itself); no NUL; at most ``MAX_PATH`` bytes of UTF-8 (the kernel's
PATH_MAX counts the terminating NUL).

openat2 arrived in Linux 5.6; without it nothing is resolved (Failed), never
by a weaker fallback.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import attrs

from spectrumd.errors import Failed, InvalidArgument

MAX_PATH = 4095  # PATH_MAX (4096) less the terminating NUL
SYS_OPENAT2 = 437  # the same number on every architecture (the unified table, Linux 5.6)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """The raw syscall: a new fd, or OSError with the kernel's errno."""
    how = _OpenHow(flags=flags, mode=mode, resolve=resolve)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _shown(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "…"


def check_canonical(untrusted_path: str) -> str:
    """The path if it is absolute and canonical; InvalidArgument naming what is wrong."""
    if "\0" in untrusted_path:
        raise InvalidArgument("path contains NUL")
    try:
        size = len(untrusted_path.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f'"{_shown(untrusted_path)}" is not valid UTF-8') from None
    if size > MAX_PATH:
        raise InvalidArgument(f"path is {size} bytes long (at most {MAX_PATH})")
    if not untrusted_path.startswith("/"):
        raise InvalidArgument(f'"{_shown(untrusted_path)}" is not an absolute path')
    if untrusted_path != "/":
        for part in untrusted_path.split("/")[1:]:
            if part in ("", ".", ".."):
                what = f'component "{part}"' if part else "an empty component"
                raise InvalidArgument(
                    f'"{_shown(untrusted_path)}" is not a canonical path ({what})'
                )
    return untrusted_path


def _first_offender(path: str, want_dir_last: bool) -> tuple[str, str] | None:
    """For the error message only (the kernel's walk decided): the first component
    that is a symlink, missing or not a directory, and what is wrong with it."""
    prefix = ""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        prefix += "/" + part
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return prefix, "does not exist (No such file or directory)"
        except OSError as e:
            return prefix, e.strerror or str(e)
        if stat.S_ISLNK(st.st_mode):
            return prefix, "is a symbolic link"
        if not stat.S_ISDIR(st.st_mode) and (i < len(parts) - 1 or want_dir_last):
            return prefix, "is not a directory"
    return None


@attrs.define(eq=False)
class HeldDirectory:
    """A directory resolved with no symlink in any component, held as an O_PATH fd."""

    path: str
    fd: int
    dev: int
    ino: int

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def still_named(self) -> bool:
        """True if ``path``, resolved afresh with no symlink, is still the held inode.

        Whoever gives the path (not the fd) to a consumer checks this first: a
        component swapped for a symlink, or a directory replaced, is caught.
        """
        if self.fd < 0:
            return False
        try:
            fresh = open_directory(self.path)
        except (InvalidArgument, Failed):
            return False
        try:
            held = os.fstat(self.fd)
            return (fresh.dev, fresh.ino) == (held.st_dev, held.st_ino) == (self.dev, self.ino)
        finally:
            fresh.close()


def open_directory(untrusted_path: str) -> HeldDirectory:
    """Resolve an absolute, canonical path to a directory, refusing any symlink.

    Raises InvalidArgument naming the offending component (a symlink, a magic
    link, a missing component, a non-directory) or the rule broken; Failed if
    the kernel has no openat2.
    """
    path = check_canonical(untrusted_path)
    try:
        fd = openat2(
            _AT_FDCWD,
            path,
            os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
            RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        )
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise Failed("the kernel has no openat2 (Linux 5.6 or later is needed)") from None
        offender = _first_offender(path, want_dir_last=True)
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT) and offender is not None:
            component, why = offender
            raise InvalidArgument(
                f'"{_shown(path)}": component "{_shown(component)}" {why}'
                + (" (no symlink may appear in a granted path)" if "symbolic" in why else "")
            ) from None
        if e.errno == errno.ELOOP:
            # Swapped back between the kernel's walk and ours: still a symlink refusal.
            raise InvalidArgument(f'"{_shown(path)}": a component is a symbolic link') from None
        raise InvalidArgument(f'"{_shown(path)}": {e.strerror}') from None
    st = os.fstat(fd)
    return HeldDirectory(path=path, fd=fd, dev=st.st_dev, ino=st.st_ino)
