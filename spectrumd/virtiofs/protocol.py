"""The FUSE wire format, as a sans-IO codec (include/uapi/linux/fuse.h, 7.31+).

:func:`parse_request` takes the bytes of one request (already copied out of
guest memory or read from /dev/fuse, so nothing can change them while they
are parsed) and returns a :class:`Request` whose ``args`` is the opcode's
parsed argument tuple; the ``encode_*`` functions build reply bodies. A
request that does not parse raises :class:`ProtocolError` carrying the errno
to answer with; nothing else is raised for any input.

WRITE is the one request whose payload is not copied: the caller copies
only the first :data:`WRITE_HEADER` bytes, and hands the rest of the
guest's buffers to pwritev as they are.
"""

from __future__ import annotations

import errno
import struct
from typing import Any, NamedTuple

KERNEL_VERSION = 7
KERNEL_MINOR = 31
ROOT_ID = 1

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY = 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK, SYNCFS = 42, 43, 44, 45, 46, 50

# INIT flags.
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22

# SETATTR valid bits.
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_LOCKOWNER, FATTR_CTIME = 128, 256, 512, 1024
FATTR_KILL_SUIDGID = 2048

FOPEN_DIRECT_IO = 1
FOPEN_NOFLUSH = 1 << 5  # 7.35: close() sends no FLUSH

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags pad
WRITE_HEADER = IN_HEADER.size + WRITE_IN.size
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_HEAD = struct.Struct("<QQQQII")
ATTR_OUT_HEAD = struct.Struct("<QII")
DIRENT = struct.Struct("<QQII")
NAME_MAX = 255
# Longest request other than WRITE that we parse (BATCH_FORGET dominates).
MAX_REQUEST = 1 << 16


class ProtocolError(Exception):
    """A request that cannot be parsed; ``errno`` is what to answer."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


class Request(NamedTuple):
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    args: Any  # the opcode's tuple, or None for an opcode we do not parse


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int


class SetattrIn(NamedTuple):
    valid: int
    fh: int
    size: int
    atime: int
    mtime: int
    atimensec: int
    mtimensec: int
    mode: int
    uid: int
    gid: int


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int
    flags: int


class CreateIn(NamedTuple):
    flags: int
    mode: int
    name: bytes


class RenameIn(NamedTuple):
    newdir: int
    flags: int
    old: bytes
    new: bytes


def _name(data: bytes, start: int) -> tuple[bytes, int]:
    """One NUL-terminated name at *start*; returns it and the offset after."""
    end = data.find(b"\0", start)
    if end < 0:
        raise ProtocolError(errno.EINVAL, "name not NUL-terminated")
    if end - start > NAME_MAX:
        raise ProtocolError(errno.ENAMETOOLONG, "name too long")
    return data[start:end], end + 1


def _fixed(fmt: struct.Struct, data: bytes, what: str) -> tuple[Any, ...]:
    if len(data) < IN_HEADER.size + fmt.size:
        raise ProtocolError(errno.EINVAL, f"{what}: short request")
    return fmt.unpack_from(data, IN_HEADER.size)


_U32X2 = struct.Struct("<II")
_U64 = struct.Struct("<Q")
_Q_II = struct.Struct("<QII")
_INIT = struct.Struct("<IIII")
_SETATTR = struct.Struct("<IIQQQQQQIIIIIIII")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags pad
_OPEN = struct.Struct("<II")
_CREATE = struct.Struct("<IIII")
_RELEASE = struct.Struct("<QIIQ")
_FORGET_ONE = struct.Struct("<QQ")
H = IN_HEADER.size


def _args(opcode: int, data: bytes) -> Any:
    if opcode in (LOOKUP, UNLINK, RMDIR):
        return _name(data, H)[0]
    if opcode in (GETATTR, STATFS, READLINK, DESTROY, SYNCFS):
        return None
    if opcode == FORGET:
        return _fixed(_U64, data, "forget")[0]
    if opcode == BATCH_FORGET:
        count, _ = _fixed(_U32X2, data, "batch_forget")
        if len(data) < H + 8 + count * 16:
            raise ProtocolError(errno.EINVAL, "batch_forget: short request")
        return [_FORGET_ONE.unpack_from(data, H + 8 + i * 16) for i in range(count)]
    if opcode == INIT:
        return InitIn(*_fixed(_INIT, data, "init"))
    if opcode == SETATTR:
        v = _fixed(_SETATTR, data, "setattr")
        return SetattrIn(v[0], v[2], v[3], v[5], v[6], v[8], v[9], v[11], v[13], v[14])
    if opcode in (OPEN, OPENDIR):
        return _fixed(_OPEN, data, "open")[0]
    if opcode in (READ, READDIR, READDIRPLUS):
        fh, offset, size, _rf, _lo, flags, _ = _fixed(READ_IN, data, "read")
        return ReadIn(fh, offset, size, flags)
    if opcode == WRITE:
        fh, offset, size, _wf, _lo, flags, _ = _fixed(WRITE_IN, data, "write")
        return ReadIn(fh, offset, size, flags)
    if opcode in (RELEASE, RELEASEDIR, FLUSH, FSYNC, FSYNCDIR):
        return _fixed(_U64, data, "release")[0]
    if opcode == CREATE:
        flags, mode, _umask, _of = _fixed(_CREATE, data, "create")
        return CreateIn(flags, mode, _name(data, H + _CREATE.size)[0])
    if opcode == MKDIR:
        mode, _umask = _fixed(_U32X2, data, "mkdir")
        return CreateIn(0, mode, _name(data, H + 8)[0])
    if opcode == RENAME:
        (newdir,) = _fixed(_U64, data, "rename")
        old, nxt = _name(data, H + 8)
        return RenameIn(newdir, 0, old, _name(data, nxt)[0])
    if opcode == RENAME2:
        newdir, flags, _ = _fixed(_Q_II, data, "rename2")
        old, nxt = _name(data, H + 16)
        return RenameIn(newdir, flags, old, _name(data, nxt)[0])
    if opcode == ACCESS:
        return _fixed(_U32X2, data, "access")[0]
    return None


def parse_request(data: bytes) -> Request:
    """Parse one request; raises ProtocolError.

    For WRITE, *data* may hold just the first WRITE_HEADER bytes.
    """
    if len(data) < H:
        raise ProtocolError(errno.EINVAL, "short header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(data)
    if opcode != WRITE:
        if length > len(data) or length < H:
            raise ProtocolError(errno.EINVAL, f"header length {length} vs {len(data)} bytes")
        data = data[:length]
    if extlen:
        raise ProtocolError(errno.EINVAL, "request extensions are not negotiated")
    try:
        args = _args(opcode, data)
    except ProtocolError as e:
        # Keep the unique so the caller can still answer.
        e.unique = unique  # type: ignore[attr-defined]
        raise
    return Request(opcode, unique, nodeid, uid, gid, pid, args)


def peek_unique(data: bytes) -> int | None:
    """The request id in *data*, if its header is complete."""
    return IN_HEADER.unpack_from(data)[2] if len(data) >= H else None


def out_header(unique: int, error: int, body_len: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + body_len, -error if error else 0, unique)


def encode_attr(st: Any) -> bytes:
    return ATTR.pack(
        st.st_ino, st.st_size, st.st_blocks,
        int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
        st.st_atime_ns % 1_000_000_000, st.st_mtime_ns % 1_000_000_000,
        st.st_ctime_ns % 1_000_000_000,
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_blksize, 0,
    )  # fmt: skip


def valid(seconds: float) -> tuple[int, int]:
    """A cache timeout as FUSE's (seconds, nanoseconds); negative is 0."""
    ns = max(0, int(seconds * 1e9))
    return ns // 10**9, ns % 10**9


def encode_entry(nodeid: int, st: Any, entry: tuple[int, int], attr: tuple[int, int]) -> bytes:
    """fuse_entry_out: *entry* and *attr* are (seconds, nanoseconds) timeouts."""
    return ENTRY_HEAD.pack(nodeid, 0, entry[0], attr[0], entry[1], attr[1]) + encode_attr(st)


def encode_attr_out(st: Any, attr: tuple[int, int]) -> bytes:
    return ATTR_OUT_HEAD.pack(attr[0], attr[1], 0) + encode_attr(st)


def encode_init(max_readahead: int, flags: int, max_write: int, max_pages: int) -> bytes:
    return struct.pack(
        "<IIIIHHIIHHI28x",
        KERNEL_VERSION, KERNEL_MINOR, max_readahead, flags,
        16, 12, max_write, 1, max_pages, 0, 0,
    )  # fmt: skip


def encode_open(fh: int, open_flags: int) -> bytes:
    return struct.pack("<QII", fh, open_flags, 0)


def encode_write(size: int) -> bytes:
    return struct.pack("<II", size, 0)


def encode_statfs(sv: Any) -> bytes:
    return struct.pack(
        "<QQQQQIII28x",
        sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
        sv.f_bsize, min(sv.f_namemax, NAME_MAX), sv.f_frsize,
    )  # fmt: skip


def dirent_size(name: bytes, plus: bool) -> int:
    n = DIRENT.size + len(name)
    return (ENTRY_HEAD.size + ATTR.size if plus else 0) + ((n + 7) & ~7)


def encode_dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    pad = -(DIRENT.size + len(name)) % 8
    return DIRENT.pack(ino, off, len(name), dtype) + name + b"\0" * pad
