"""Confining the backend for good: it reaches its exports and nothing else.

:func:`enter` is called once, by the backend while still root, after it
holds every descriptor it starts with and before it answers any request
(a request is the first thing a guest controls). Each step raises OSError
naming the step; the caller exits rather than serve half confined. In
order:

1. ``unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC)``: mounts of its
   own, a network namespace with only a downed ``lo`` (and its own
   abstract unix socket names), no System V IPC of the host;
2. every mount made private (nothing we do propagates back);
3. a procfs of its own mounted over /proc (``subset=pid``,
   ``hidepid=invisible``) and /proc/self/fd opened in it: the one directory
   all reopens go through (resolve.proc_fd). This fd outlives the file
   system below; from it ``..`` leads only to a /proc that shows the
   process itself, not the host's /proc/1 or /proc/sys;
4. an empty tmpfs (read-only, nosuid, nodev, noexec, 4 KiB) becomes the
   root: ``pivot_root(".", ".")`` stacks the old root on top of the new
   one and ``umount2(".", MNT_DETACH)`` drops it with every mount under it.
   From here no path names anything, so every module the process will
   ever import must be imported already (nothing here imports late);
5. limits: no core dumps, one task for the uid (no thread, no fork; the
   polling companion, spin.KeepAwake, forked before and in a jail of its
   own, is the uid's other process), not dumpable (no ptrace by the uid's
   other processes, /proc/PID is root's);
6. no supplementary groups, then gid, then uid (real, effective, saved),
   and a check that the drop sticks: setuid(0) fails and no capability is
   left;
7. PR_SET_NO_NEW_PRIVS and the seccomp filter (seccomp.py).

What is left reachable: the descriptors it holds. A directory fd leads up
(``openat(fd, "../..")``) into the rest of its file system unless it is the
root of a detached mount, so exports are handed over as such
(:func:`detach`; tree.py refuses others once sealed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

from spectrumd.host import seccomp

from . import resolve

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_DUMPABLE = 4

# open_tree(2) and mount_setattr(2): numbers of the unified table (all arches).
_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_SYS_PIVOT_ROOT = 155  # x86_64; enter() checks the machine first
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

ROOT_OPTIONS = b"size=4k,nr_inodes=1,mode=0555"
PROC_OPTIONS = b"subset=pid,hidepid=invisible"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _check(rc: int, step: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{step}: {os.strerror(err)}")
    return rc


def _mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
           data: bytes | None, step: str) -> None:  # fmt: skip
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), step)


def detach(dirfd: int, writable: bool) -> int:
    """A new fd on a private copy of the mount at directory *dirfd*, rooted at it.

    ``..`` of the new fd leads nowhere (the copy has no parent), mounts
    below the directory are not part of it, and it is nosuid, nodev,
    noexec, and read-only unless *writable*, whatever its process does.
    Needs CAP_SYS_ADMIN, and *dirfd* on a mount of the caller's mount
    namespace. The caller keeps *dirfd*. Raises OSError.
    """
    fd = _check(
        _libc.syscall(
            ctypes.c_long(_SYS_OPEN_TREE),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH),
        ),
        "open_tree(OPEN_TREE_CLONE) of an export",
    )
    attr = _MountAttr(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 0, MS_PRIVATE, 0)
    if not writable:
        attr.attr_set |= MOUNT_ATTR_RDONLY
    try:
        _check(
            _libc.syscall(
                ctypes.c_long(_SYS_MOUNT_SETATTR),
                ctypes.c_int(fd),
                ctypes.c_char_p(b""),
                ctypes.c_uint(AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            "mount_setattr of an export's detached mount",
        )
    except BaseException:
        os.close(fd)
        raise
    return int(fd)


def enter(uid: int, gid: int) -> None:
    """Confine this process for good as *uid*:*gid* (steps in the module docstring).

    Call as root with one thread. Raises OSError naming the step that failed.
    """
    if not (0 < uid < 2**32 - 1 and 0 < gid < 2**32 - 1):
        raise OSError(errno.EINVAL, f"uid {uid} gid {gid}: neither may be 0 (root) or 2**32-1")
    seccomp.check_machine()
    threads = _status().get("Threads")
    if threads != "1":
        # unshare(CLONE_NEWNS) and the pivot would move this thread alone.
        raise OSError(errno.EBUSY, f"confine: {threads} threads run, not one")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC),
           "unshare(CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC)")  # fmt: skip
    _mount(None, b"/", None, MS_REC | MS_PRIVATE, None, "make every mount private")
    _enter_empty_root()
    _limit()
    _drop(uid, gid)
    seccomp.install()
    status = _status()
    if status.get("Seccomp") != "2" or status.get("NoNewPrivs") != "1":
        raise OSError(errno.EPERM, "the seccomp filter did not take")


def _enter_empty_root() -> None:
    _mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, PROC_OPTIONS,
           "mount a procfs of our own on /proc")  # fmt: skip
    try:
        fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"open /proc/self/fd: {e.strerror}") from None
    resolve.use_proc_fd(fd)
    # Any directory will do as the tmpfs's mount point; /proc is one we know exists.
    _mount(b"tmpfs", b"/proc", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
           ROOT_OPTIONS, "mount the empty root")  # fmt: skip
    try:
        os.chdir("/proc")
    except OSError as e:
        raise OSError(e.errno, f"chdir into the empty root: {e.strerror}") from None
    _check(_libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), b".", b"."), 'pivot_root(".", ".")')
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    try:
        os.chdir("/")
    except OSError as e:
        raise OSError(e.errno, f"chdir to the new root: {e.strerror}") from None


def _limit() -> None:
    for which, value, name in (
        (resource.RLIMIT_CORE, 0, "RLIMIT_CORE"),
        (resource.RLIMIT_NPROC, 1, "RLIMIT_NPROC"),
    ):
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as e:
            raise OSError(errno.EPERM, f"setrlimit({name}, {value}): {e}") from None
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE, 0)")


def _drop(uid: int, gid: int) -> None:
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise OSError(e.errno, f"become {uid}:{gid}: {e.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError(errno.EPERM, f"become {uid}:{gid}: the ids did not all change")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError(errno.EPERM, f"become {uid}:{gid}: setuid(0) still works")
    status = _status()
    left = [k for k in ("CapPrm", "CapEff", "CapAmb") if int(status.get(k, "1"), 16)]
    if left:
        raise OSError(errno.EPERM, f"become {uid}:{gid}: capabilities left in {', '.join(left)}")


def _status() -> dict[str, str]:
    """/proc/self/status as a dict, read through the /proc/self/fd we keep."""
    try:
        fd = os.open("../status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=resolve.proc_fd())
        try:
            text = os.read(fd, 1 << 16).decode()
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"read /proc/self/status: {e.strerror}") from None
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}
