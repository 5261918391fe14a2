"""The seccomp filter (spectrumd/virtiofs/seccomp.py): the program run by a small BPF
interpreter here, and the real filter installed in a forked child that reports
through a pipe what each call gave."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import resource
import signal
import socket
import struct
import tempfile
import termios
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spectrumd.host import seccomp as S

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers"),
]

AUDIT_ARCH_I386 = 0x40000003
THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes to clone
EPERM = S.RET_ERRNO | errno.EPERM


def run(prog: bytes, nr: int, arch: int = S.AUDIT_ARCH_X86_64, args: tuple[int, ...] = ()) -> int:
    """What the filter returns for one call (classic BPF, the opcodes seccomp.py emits)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(args + (0,) * (6 - len(args))))
    insns = [S.INSN.unpack_from(prog, i) for i in range(0, len(prog), S.INSN.size)]
    pc = acc = 0
    while True:
        code, jt, jf, k = insns[pc]  # an IndexError is a jump out of the program
        if code == S.LD_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == S.JEQ:
            pc += 1 + (jt if acc == k else jf)
        elif code == S.JSET:
            pc += 1 + (jt if acc & k else jf)
        elif code == S.RET:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} at {pc}")


def test_the_program_denies_the_list_and_allows_the_rest() -> None:
    prog = S.program()
    assert len(prog) % S.INSN.size == 0 and len(prog) // S.INSN.size < 4096
    nr = S.SYSCALLS
    for name in S.DENIED:
        if name not in ("clone", "clone3", "ioctl"):
            assert run(prog, nr[name]) == EPERM, name
    # read, write, openat, mmap, futex, accept4, recvmsg, sendmsg, poll, exit_group
    for allowed in (0, 1, 257, 9, 202, 288, 47, 46, 7, 231):
        assert run(prog, allowed) == S.RET_ALLOW, allowed
    assert run(prog, nr["clone"], args=(THREAD_FLAGS,)) == S.RET_ALLOW
    assert run(prog, nr["clone"], args=(signal.SIGCHLD,)) == EPERM  # fork
    assert run(prog, nr["clone"], args=(THREAD_FLAGS | 0x10000000,)) == EPERM  # CLONE_NEWUSER
    assert run(prog, nr["clone"], args=(THREAD_FLAGS | 0x00020000,)) == EPERM  # CLONE_NEWNS
    assert run(prog, nr["clone3"]) == S.RET_ERRNO | errno.ENOSYS
    assert run(prog, nr["ioctl"], args=(2, termios.TIOCSTI)) == EPERM
    assert run(prog, nr["ioctl"], args=(2, (1 << 32) | termios.TIOCSTI)) == EPERM  # cmd is 32 bits
    assert run(prog, nr["ioctl"], args=(2, S.TIOCLINUX)) == EPERM
    assert run(prog, nr["ioctl"], args=(2, termios.FIONREAD)) == S.RET_ALLOW
    assert run(prog, 0, arch=AUDIT_ARCH_I386) == S.RET_KILL_PROCESS
    assert run(prog, S.X32_BIT | 0) == S.RET_KILL_PROCESS  # x32 read


def test_a_shorter_list_denies_only_what_it_names() -> None:
    prog = S.program(["socket"])
    assert run(prog, S.SYSCALLS["socket"]) == EPERM
    assert run(prog, S.SYSCALLS["execve"]) == S.RET_ALLOW
    with pytest.raises(ValueError, match="unknown system call 'no_such_call'"):
        S.program(["socket", "no_such_call"])


UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not UNISTD.exists(), reason="no kernel headers")
def test_the_table_matches_the_kernel_headers() -> None:
    headers = {}
    for line in UNISTD.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("__NR_"):
            headers[parts[1][5:]] = int(parts[2])
    assert {name: headers.get(name) for name in S.SYSCALLS} == S.SYSCALLS


def in_filtered_child(body: Callable[[], object]) -> tuple[int, object]:
    """Fork; the child installs the filter, runs *body* and sends its result back.

    Returns the child's wait status and the result (None if it sent none).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS leaves no core file
            S.install()
            os.write(w, json.dumps(body()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, wstatus = os.waitpid(pid, 0)
    return wstatus, json.loads(data) if data else None


def outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def _libc_call(name: str, *args: object) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def call() -> None:
        rc = getattr(libc, name)(*args)
        if rc == 0 and name == "syscall" and args[0] == S.SYSCALLS["clone"]:
            os._exit(0)  # pragma: no cover - a child the filter let through
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


def _fork() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a child the filter let through
        os._exit(0)
    os.waitpid(pid, 0)


def _files_threads_status() -> dict[str, str]:
    with tempfile.TemporaryFile() as f:
        f.write(b"data")
        f.seek(0)
        assert f.read() == b"data"
    seen = []
    t = threading.Thread(target=seen.append, args=("ran",))
    t.start()
    t.join()
    text = Path("/proc/self/status").read_text()
    status = {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    return {"thread": seen[0], "Seccomp": status["Seccomp"], "NoNewPrivs": status["NoNewPrivs"]}


@pytest.mark.skipif(os.geteuid() != 0, reason="root: the calls must fail by the filter alone")
def test_the_installed_filter_refuses_and_lets_threads_and_files_be() -> None:
    master, slave = os.openpty()

    def body() -> dict[str, object]:
        return {
            "socket": outcome(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
            "unshare": outcome(_libc_call("unshare", 0x00020000)),
            "mount": outcome(_libc_call("mount", b"none", b"/nonexistent", b"tmpfs", 0, None)),
            # Without the filter: ESRCH (no such pid).
            "ptrace": outcome(_libc_call("ptrace", 3, 0x7FFFFFF0, None, None)),
            "clone CLONE_NEWUSER": outcome(
                _libc_call("syscall", S.SYSCALLS["clone"], 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)
            ),
            "fork": outcome(_fork),
            "clone3": outcome(_libc_call("syscall", S.SYSCALLS["clone3"], None, 0)),
            "setuid": outcome(lambda: os.setuid(0)),
            "TIOCSTI": outcome(lambda: fcntl.ioctl(slave, termios.TIOCSTI, b"x")),
            "FIONREAD": outcome(lambda: fcntl.ioctl(slave, termios.FIONREAD, b"\0" * 4)),
            "files, a thread, status": _files_threads_status(),
            "execve": outcome(lambda: os.execv("/bin/true", ["true"])),
        }

    try:
        wstatus, got = in_filtered_child(body)
    finally:
        os.close(master)
        os.close(slave)
    assert os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) == 0, wstatus  # killed for nothing
    assert got == {
        "socket": "EPERM",
        "unshare": "EPERM",
        "mount": "EPERM",
        "ptrace": "EPERM",
        "clone CLONE_NEWUSER": "EPERM",
        "fork": "EPERM",
        "clone3": "ENOSYS",
        "setuid": "EPERM",
        "TIOCSTI": "EPERM",
        "FIONREAD": "ok",
        "files, a thread, status": {"thread": "ran", "Seccomp": "2", "NoNewPrivs": "1"},
        "execve": "EPERM",
    }


def _x32_getpid() -> None:
    _libc_call("syscall", S.X32_BIT | 39)()


def _i386_getpid() -> int:
    """getpid through ``int 0x80`` (the 32-bit entry), from a page of machine code."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20; int 0x80; ret
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(addr)())


def _i386_works() -> bool:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        with contextlib.suppress(BaseException):
            status = 0 if _i386_getpid() == os.getpid() else 1
        os._exit(status)
    _, wstatus = os.waitpid(pid, 0)
    return os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) == 0


@pytest.mark.parametrize("call", ["x32", "i386"])
def test_another_architecture_kills_the_process(call: str) -> None:
    if call == "i386" and not _i386_works():
        pytest.skip("no 32-bit syscall entry in this kernel")
    wstatus, got = in_filtered_child(_x32_getpid if call == "x32" else _i386_getpid)
    assert os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == signal.SIGSYS, (wstatus, got)
