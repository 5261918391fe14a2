"""Confining a VMM: its own uid, an empty network namespace, Landlock, limits.

What is built here, in the daemon before the fork:

- a Landlock ruleset (``landlock_create_ruleset``/``landlock_add_rule``) that
  handles every file-system access right the kernel knows and allows only
  reading (and executing) the VMM's own program files, reading the VM's
  kernel, initrd and images, and reading and writing the device nodes and
  disks the VM is given; with ABI 4 and later it also handles TCP bind and
  connect and allows neither;
- the list of steps the child runs between ``fork`` and ``exec``
  (:meth:`Prepared.enter`): ``unshare`` of a new network and IPC namespace
  (its taps are descriptors, it needs no route anywhere), resource limits,
  ``setgroups``/``setresgid``/``setresuid`` to the instance's own ids,
  ``PR_SET_NO_NEW_PRIVS`` and ``landlock_restrict_self``. Each is a plain
  system call through ctypes, prepared in the parent, so the forked child
  runs no import and takes no lock.

:func:`check` tells at daemon start whether this kernel can do all of it; a
missing part is a start error, never a silent downgrade.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
from collections.abc import Iterable
from pathlib import Path

import attrs

from spectrumd.errors import Failed

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWIPC = 0x08000000

# Landlock file-system rights, by the ABI version that added them.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
_FS_BY_ABI = {1: (1 << 13) - 1, 2: 1 << 13, 3: 1 << 14, 5: 1 << 15}  # REFER, TRUNCATE, IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
READ = FS_READ_FILE | FS_READ_DIR
RUN = READ | FS_EXECUTE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.unshare.argtypes = [ctypes.c_int]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> tuple[int, int]:
    """(the kernel's Landlock ABI version, 0) or (0, the errno that says why there is none)."""
    v = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return (int(v), 0) if v > 0 else (0, ctypes.get_errno())


def _handled_fs(abi: int) -> int:
    return sum(bits for version, bits in _FS_BY_ABI.items() if version <= abi)


def check() -> int:
    """Raise Failed naming what this kernel lacks to confine VMMs; return the Landlock ABI."""
    abi, err = landlock_abi()
    if abi < 1:
        why = {
            errno.EOPNOTSUPP: "Landlock is built in but not enabled (lsm= on the command line)",
            errno.ENOSYS: "the kernel has no Landlock, or a seccomp filter (a container's) "
            "hides it",
        }.get(err, f"landlock_create_ruleset: {os.strerror(err)}")
        raise Failed(
            f"VMMs cannot be confined: {why}; start with --unsafe-unconfined-vmm to run "
            "them unconfined anyway"
        )
    if os.geteuid() != 0:
        raise Failed("confining VMMs (their own uids, network namespaces) needs root")
    return abi


# A VMM's own program: its binary, libraries, loader cache and data (firmware).
PROGRAMS = (Path("/usr"), Path("/lib"), Path("/lib64"), Path("/etc/ld.so.cache"))


@attrs.frozen
class Confinement:
    """What one VMM may be and reach."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    # Directories or files (and all beneath) the VMM may read and execute: its program.
    programs: tuple[Path, ...] = attrs.field(factory=lambda: PROGRAMS)
    read: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()
    # Directories of the VMM's own, where it may make and remove files (crosvm's sockets).
    own: tuple[Path, ...] = ()
    max_files: int = 4096
    max_processes: int = 512  # QEMU's threads count here too, per uid


class Prepared:
    """A ruleset made in the parent, and the steps the child takes with it."""

    def __init__(self, conf: Confinement, ruleset_fd: int) -> None:
        self.conf = conf
        self.ruleset_fd = ruleset_fd

    def enter(self) -> None:
        """Run in the child between fork and exec (``preexec_fn``): no imports, no locks.

        Any failure raises, and the spawn fails; nothing runs unconfined.
        """
        c = self.conf
        if _libc.unshare(_CLONE_NEWNET | _CLONE_NEWIPC) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        resource.setrlimit(resource.RLIMIT_NOFILE, (c.max_files, c.max_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (c.max_processes, c.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setgroups(list(c.groups))
        os.setresgid(c.gid, c.gid, c.gid)
        os.setresuid(c.uid, c.uid, c.uid)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if _libc.syscall(_SYS_RESTRICT_SELF, self.ruleset_fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.ruleset_fd)


def prepare(conf: Confinement, abi: int) -> Prepared:
    """Build the ruleset for ``conf``. Raises Failed naming a path that cannot be opened."""
    handled = _handled_fs(abi)
    attr = _RulesetAttr(handled, (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else ctypes.sizeof(ctypes.c_uint64)
    fd = int(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0))
    if fd < 0:
        raise Failed(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        _allow(fd, conf.programs, RUN, handled, optional=True)
        _allow(fd, conf.read, READ, handled)
        # Writing a device node or disk also needs its ioctls (KVM), when handled.
        _allow(fd, conf.read_write, handled & ~FS_EXECUTE & _file_rights(handled), handled)
        _allow(fd, conf.own, handled & ~FS_EXECUTE, handled)
    except BaseException:
        os.close(fd)
        raise
    os.set_inheritable(fd, False)
    return Prepared(conf, fd)


def _file_rights(handled: int) -> int:
    # The rights that apply to a file itself (not to making entries in a directory).
    file_only = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (1 << 14) | (1 << 15)
    return handled & file_only


def _allow(
    ruleset: int, paths: Iterable[Path], access: int, handled: int, optional: bool = False
) -> None:
    for path in paths:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if optional:
                continue
            raise Failed(f"cannot confine the VMM: {path} does not exist") from None
        except OSError as e:
            raise Failed(f"cannot confine the VMM: {path}: {e.strerror}") from None
        try:
            rights = access & handled
            if not os.path.isdir(f"/proc/self/fd/{pfd}"):
                rights &= _file_rights(handled)
            rule = _PathBeneathAttr(rights, pfd)
            if (
                _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                != 0
            ):
                err = ctypes.get_errno()
                raise Failed(
                    f"cannot confine the VMM: landlock rule for {path}: {os.strerror(err)}"
                )
        finally:
            os.close(pfd)
