"""Transport 1: the same file system served through /dev/fuse on the host.

Used by the tests (a real kernel FUSE client without a VM) and nothing
else. :func:`mount` is the only place that takes a path: the caller mounts
and hands the /dev/fuse fd to :func:`serve_fd` (``python -m
spectrumd.virtiofs --fuse-fd N``), which needs no path at all.

Mount options: ``default_permissions`` is on, so the host kernel checks
mode bits against the calling host user before a request reaches us (the
server would otherwise act with its own rights for anyone who can reach
the mount); without ``allow_other`` only the mounting uid can enter at
all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
from pathlib import Path

from . import protocol as P
from .control import ControlServer
from .ops import MAX_WRITE, FileSystem
from .serve import answer

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_BUF = MAX_WRITE + 4096


def mount(where: Path, name: str = "spectrum") -> int:
    """Mount a FUSE file system on *where*; returns the /dev/fuse fd. Raises OSError."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    st = os.stat(where)
    opts = (
        f"fd={fd},rootmode={st.st_mode & 0o170000:o},user_id={os.geteuid()},"
        f"group_id={os.getegid()},default_permissions,max_read={MAX_WRITE}"
    )
    rc = _libc.mount(
        name.encode(), os.fsencode(where), b"fuse.spectrum", MS_NOSUID | MS_NODEV, opts.encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount {where}: {os.strerror(err)}")
    return fd


def umount(where: Path) -> None:
    """Detach the mount at *where* (lazily: a stuck server cannot hold it)."""
    if _libc.umount2(os.fsencode(where), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {where}: {os.strerror(err)}")


def serve_fd(
    fd: int,
    fs: FileSystem,
    control: socket.socket | None = None,
    *,
    control_listener: socket.socket | None = None,
) -> None:
    """Answer requests on the /dev/fuse *fd* until the file system is unmounted.

    Commands on *control*, or on connections accepted on *control_listener*
    (control.py), are handled between requests.
    """
    buf = bytearray(_BUF)
    mv = memoryview(buf)
    out = bytearray(MAX_WRITE)
    out_mv = memoryview(out)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ctl = ControlServer(
        fs.tree, poller, listener=control_listener, conn=control, settle=fs.attr_timeout
    )
    try:
        while True:
            ready = {f for f, _ in poller.poll()}
            for f in ready - {fd}:
                ctl.handle(f)
            if fd in ready and not _one(fd, fs, mv, out_mv):
                return
    finally:
        ctl.close()


def _one(fd: int, fs: FileSystem, mv: memoryview, out_mv: memoryview) -> bool:
    """Read and answer one request; False once the file system is gone."""
    try:
        n = os.readv(fd, [mv])
    except OSError as e:
        if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
            return True  # ENOENT: the request was interrupted before we read it
        if e.errno == errno.ENODEV:
            return False  # unmounted
        raise
    if n == 0:
        return False
    opcode = P.IN_HEADER.unpack_from(mv)[1] if n >= P.IN_HEADER.size else 0
    if opcode == P.WRITE:
        head, payload = bytes(mv[: min(n, P.WRITE_HEADER)]), [mv[P.WRITE_HEADER : n]]
    else:
        head, payload = bytes(mv[:n]), []
    reply = answer(fs, head, payload, [out_mv])
    if reply is None:
        return True
    parts: list[bytes | memoryview] = [reply.header()]
    if reply.body:
        parts.append(reply.body)
    elif reply.data_len:
        parts.append(out_mv[: reply.data_len])
    try:
        os.writev(fd, parts)
    except OSError as e:
        # ENOENT: the request was interrupted and its caller is gone.
        if e.errno == errno.ENODEV:
            return False
        if e.errno != errno.ENOENT:
            raise
    return True
