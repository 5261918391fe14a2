"""A seccomp-BPF filter built with ctypes (no libseccomp): what a confined server may not call.

:func:`program` compiles a deny list into classic BPF (pure, tested
instruction by instruction); :func:`install` sets PR_SET_NO_NEW_PRIVS and
loads it for every thread of the process (SECCOMP_FILTER_FLAG_TSYNC). A
denied call fails with EPERM; the process keeps running and sees an error
it already handles.

Why a deny list and not an allow list: the process is a Python
interpreter, whose set of system calls depends on the interpreter's
version, the C library, and which corner of the standard library a rare
path (an error message, a traceback, the interpreter's exit) reaches. An
allow list would be a list of guesses that fails in production on the
first path no test took. What the filter must take away is small and
known: creating processes, namespaces and sockets, changing credentials,
mounts, tracing other processes and the kernel's larger attack surfaces
(bpf, io_uring, perf, userfaultfd, keyrings, modules). The mount
namespace, the empty root and the dropped uid (jail.py) do the rest.

The syscall numbers are x86_64's. The filter first checks the audit
architecture and kills the process on any other (a 32-bit ``int 0x80``
call would otherwise be judged by the wrong numbers), and kills x32 calls
(numbers with bit 30 set), which reach the same kernel functions under
other numbers.

Three calls are judged by their arguments:

* ``clone``: only a new thread passes (CLONE_THREAD set, no CLONE_NEW*
  flag). glibc's fork() is a clone without CLONE_THREAD, so denying the
  fork syscall alone would not stop it;
* ``clone3``: ENOSYS, not EPERM: its flags live in memory a filter cannot
  read, and on ENOSYS glibc falls back to clone for threads;
* ``ioctl``: TIOCSTI and TIOCLINUX are refused, the classic way out of a
  sandbox through an inherited terminal (typing into the user's shell).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYSCALLS: dict[str, int] = {
    "ioctl": 16, "socket": 41, "connect": 42, "bind": 49, "listen": 50,
    "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
    "ptrace": 101, "syslog": 103, "setuid": 105, "setgid": 106,
    "setreuid": 113, "setregid": 114, "setgroups": 116, "setresuid": 117,
    "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "mknod": 133,
    "uselib": 134, "personality": 135, "vhangup": 153, "pivot_root": 155,
    "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
    "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "migrate_pages": 256, "mknodat": 259, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "execveat": 322,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
    "mount_setattr": 442, "quotactl_fd": 443,
}  # fmt: skip

DENIED: tuple[str, ...] = (
    # new programs and processes (clone: everything but a thread)
    "execve", "execveat", "fork", "vfork", "clone", "clone3",
    # namespaces and mounts (the old mount API and the new one)
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "process_madvise", "migrate_pages", "move_pages",
    # large kernel attack surfaces
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key",
    # the kernel itself, the machine, its clock
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "uselib", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "iopl", "ioperm", "lookup_dcookie", "_sysctl", "vhangup",
    "fanotify_init", "personality",
    # files by handle (bypass every path check), device nodes
    "open_by_handle_at", "name_to_handle_at", "mknod", "mknodat",
    # new sockets (accept4, recvmsg and sendmsg on inherited ones stay)
    "socket", "socketpair", "connect", "bind", "listen",
    # credentials
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid",
    # the inherited terminal (TIOCSTI, TIOCLINUX only)
    "ioctl",
)  # fmt: skip

AUDIT_ARCH_X86_64 = 0xC000003E
X32_BIT = 0x40000000
CLONE_THREAD = 0x00010000
# CLONE_NEWTIME (0x80) is missing on purpose: for clone() the low byte is the
# exit signal; that flag only exists for clone3 and unshare.
CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# Classic BPF opcodes, and where seccomp_data's fields are.
LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
RET = 0x06  # BPF_RET | BPF_K
OFF_NR, OFF_ARCH = 0, 4


def off_arg(i: int) -> int:
    """Offset of the low 32 bits of argument *i* (little endian)."""
    return 16 + 8 * i


INSN = struct.Struct("=HBBI")  # struct sock_filter
_SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38

Insn = tuple[int, int, int, int]


def _errno(err: int) -> Insn:
    return (RET, 0, 0, RET_ERRNO | err)


def _by_argument(name: str) -> list[Insn]:
    """The instructions after ``nr == name`` matched, for the calls judged by argument."""
    if name == "clone":
        return [
            (LD_ABS, 0, 0, off_arg(0)),
            (JSET, 0, 1, CLONE_NEW),
            _errno(errno.EPERM),
            (JSET, 0, 1, CLONE_THREAD),
            (RET, 0, 0, RET_ALLOW),
            _errno(errno.EPERM),
        ]
    if name == "clone3":
        return [_errno(errno.ENOSYS)]
    if name == "ioctl":
        return [
            (LD_ABS, 0, 0, off_arg(1)),  # the kernel reads cmd as an unsigned int
            (JEQ, 2, 0, TIOCSTI),
            (JEQ, 1, 0, TIOCLINUX),
            (RET, 0, 0, RET_ALLOW),
            _errno(errno.EPERM),
        ]
    return [_errno(errno.EPERM)]


def program(deny: Iterable[str] = DENIED) -> bytes:
    """The filter for *deny* as struct sock_filter[]; raises ValueError on an unknown name."""
    insns: list[Insn] = [
        (LD_ABS, 0, 0, OFF_ARCH),
        (JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (RET, 0, 0, RET_KILL_PROCESS),
        (LD_ABS, 0, 0, OFF_NR),
        (JSET, 0, 1, X32_BIT),
        (RET, 0, 0, RET_KILL_PROCESS),
    ]
    # Each test jumps over its own block only, so no offset nears BPF's limit of
    # 255; every block ends in a return on every path, so the accumulator
    # still holds the syscall number at the next test.
    for name in dict.fromkeys(deny):
        nr = SYSCALLS.get(name)
        if nr is None:
            raise ValueError(f"seccomp: unknown system call {name!r} (not in the x86_64 table)")
        block = _by_argument(name)
        insns.append((JEQ, 0, len(block), nr))
        insns += block
    insns.append((RET, 0, 0, RET_ALLOW))
    return b"".join(INSN.pack(*i) for i in insns)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


_libc = ctypes.CDLL(None, use_errno=True)


def check_machine() -> None:
    """Refuse to run where the table's numbers are not the kernel's; raises OSError."""
    machine = os.uname().machine
    if machine != "x86_64":
        raise OSError(errno.ENOSYS, f"seccomp: syscall numbers are known for x86_64, not {machine}")


def install(deny: Iterable[str] = DENIED) -> None:
    """Set PR_SET_NO_NEW_PRIVS and load the filter for all threads, for good.

    Raises OSError (naming the step) or ValueError (an unknown name).
    """
    check_machine()
    code = program(deny)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // INSN.size, ctypes.cast(buf, ctypes.c_void_p))
    rc = _libc.syscall(
        ctypes.c_long(_SYS_SECCOMP),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(prog),
    )
    if rc > 0:  # TSYNC: the id of a thread that could not take the filter
        raise OSError(errno.EBUSY, f"seccomp: thread {rc} could not be given the filter")
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
