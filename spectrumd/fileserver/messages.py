"""9P2000.L messages as frozen value objects.

Each class names its wire type (``TYPE``) and its body layout (``FMT``), one
letter per field after ``tag``, in wire order (see Linux
``include/net/9p/9p.h`` and diod's ``protocol.md``):

    B u8   H u16   I u32   Q u64   s string[s]   q qid[13]
    W nwname[2] nwname*(wname[s])   X nwqid[2] nwqid*(qid[13])
    D count[4] data[count]

Strings stay ``bytes``: Linux sends file names as raw bytes, and a name that
is not UTF-8 must round-trip unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
VERSION_9P2000_L = b"9P2000.L"
MAXWELEM = 16  # 9P's limit of names per walk (walk(5))
HEADER_SIZE = 7  # size[4] type[1] tag[2]
IOHDRSZ = 24  # Linux's P9_IOHDRSZ: room kept for a read/write header

# qid.type bits
QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00

# getattr request/valid bits
GETATTR_BASIC = 0x7FF

# setattr valid bits
SETATTR_MODE = 0x1
SETATTR_UID = 0x2
SETATTR_GID = 0x4
SETATTR_SIZE = 0x8
SETATTR_ATIME = 0x10
SETATTR_MTIME = 0x20
SETATTR_CTIME = 0x40
SETATTR_ATIME_SET = 0x80
SETATTR_MTIME_SET = 0x100

AT_REMOVEDIR = 0x200  # Tunlinkat flags use Linux's value


@dataclass(frozen=True, slots=True)
class Qid:
    type: int
    version: int
    path: int


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``tag`` pairs a reply with its request."""

    TYPE: ClassVar[int] = -1
    FMT: ClassVar[str] = ""
    tag: int


@dataclass(frozen=True, slots=True)
class BadMessage(Message):
    """A well-framed message the decoder could not read (never encoded).

    ``known`` is False for a type number 9P2000.L does not define; the
    server answers EOPNOTSUPP then, EINVAL for a malformed body.
    """

    type: int
    known: bool


# --- session ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tversion(Message):
    TYPE = 100
    FMT = "Is"
    msize: int
    version: bytes


@dataclass(frozen=True, slots=True)
class Rversion(Message):
    TYPE = 101
    FMT = "Is"
    msize: int
    version: bytes


@dataclass(frozen=True, slots=True)
class Tauth(Message):
    TYPE = 102
    FMT = "IssI"
    afid: int
    uname: bytes
    aname: bytes
    n_uname: int


@dataclass(frozen=True, slots=True)
class Rauth(Message):
    TYPE = 103
    FMT = "q"
    aqid: Qid


@dataclass(frozen=True, slots=True)
class Tattach(Message):
    TYPE = 104
    FMT = "IIssI"
    fid: int
    afid: int
    uname: bytes
    aname: bytes
    n_uname: int


@dataclass(frozen=True, slots=True)
class Rattach(Message):
    TYPE = 105
    FMT = "q"
    qid: Qid


@dataclass(frozen=True, slots=True)
class Rlerror(Message):
    TYPE = 7
    FMT = "I"
    ecode: int


@dataclass(frozen=True, slots=True)
class Tflush(Message):
    TYPE = 108
    FMT = "H"
    oldtag: int


@dataclass(frozen=True, slots=True)
class Rflush(Message):
    TYPE = 109


# --- names -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Twalk(Message):
    TYPE = 110
    FMT = "IIW"
    fid: int
    newfid: int
    wnames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Rwalk(Message):
    TYPE = 111
    FMT = "X"
    qids: tuple[Qid, ...]


@dataclass(frozen=True, slots=True)
class Tclunk(Message):
    TYPE = 120
    FMT = "I"
    fid: int


@dataclass(frozen=True, slots=True)
class Rclunk(Message):
    TYPE = 121


@dataclass(frozen=True, slots=True)
class Tremove(Message):
    TYPE = 122
    FMT = "I"
    fid: int


@dataclass(frozen=True, slots=True)
class Rremove(Message):
    TYPE = 123


@dataclass(frozen=True, slots=True)
class Tstatfs(Message):
    TYPE = 8
    FMT = "I"
    fid: int


@dataclass(frozen=True, slots=True)
class Rstatfs(Message):
    TYPE = 9
    FMT = "IIQQQQQQI"
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


# --- open, create, I/O -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tlopen(Message):
    TYPE = 12
    FMT = "II"
    fid: int
    flags: int


@dataclass(frozen=True, slots=True)
class Rlopen(Message):
    TYPE = 13
    FMT = "qI"
    qid: Qid
    iounit: int


@dataclass(frozen=True, slots=True)
class Tlcreate(Message):
    TYPE = 14
    FMT = "IsIII"
    fid: int
    name: bytes
    flags: int
    mode: int
    gid: int


@dataclass(frozen=True, slots=True)
class Rlcreate(Message):
    TYPE = 15
    FMT = "qI"
    qid: Qid
    iounit: int


@dataclass(frozen=True, slots=True)
class Tread(Message):
    TYPE = 116
    FMT = "IQI"
    fid: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Rread(Message):
    TYPE = 117
    FMT = "D"
    data: bytes


@dataclass(frozen=True, slots=True)
class Twrite(Message):
    TYPE = 118
    FMT = "IQD"
    fid: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Rwrite(Message):
    TYPE = 119
    FMT = "I"
    count: int


@dataclass(frozen=True, slots=True)
class Treaddir(Message):
    TYPE = 40
    FMT = "IQI"
    fid: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Rreaddir(Message):
    TYPE = 41
    FMT = "D"
    data: bytes


@dataclass(frozen=True, slots=True)
class Tfsync(Message):
    TYPE = 50
    FMT = "II"
    fid: int
    datasync: int


@dataclass(frozen=True, slots=True)
class Rfsync(Message):
    TYPE = 51


# --- attributes ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tgetattr(Message):
    TYPE = 24
    FMT = "IQ"
    fid: int
    request_mask: int


@dataclass(frozen=True, slots=True)
class Rgetattr(Message):
    TYPE = 25
    FMT = "QqIIIQQQQQQQQQQQQQQQ"
    valid: int
    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int
    btime_sec: int
    btime_nsec: int
    gen: int
    data_version: int


@dataclass(frozen=True, slots=True)
class Tsetattr(Message):
    TYPE = 26
    FMT = "IIIIIQQQQQ"
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@dataclass(frozen=True, slots=True)
class Rsetattr(Message):
    TYPE = 27


@dataclass(frozen=True, slots=True)
class Txattrwalk(Message):
    TYPE = 30
    FMT = "IIs"
    fid: int
    newfid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rxattrwalk(Message):
    TYPE = 31
    FMT = "Q"
    size: int


@dataclass(frozen=True, slots=True)
class Txattrcreate(Message):
    TYPE = 32
    FMT = "IsQI"
    fid: int
    name: bytes
    attr_size: int
    flags: int


@dataclass(frozen=True, slots=True)
class Rxattrcreate(Message):
    TYPE = 33


# --- directory changes -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tmkdir(Message):
    TYPE = 72
    FMT = "IsII"
    dfid: int
    name: bytes
    mode: int
    gid: int


@dataclass(frozen=True, slots=True)
class Rmkdir(Message):
    TYPE = 73
    FMT = "q"
    qid: Qid


@dataclass(frozen=True, slots=True)
class Tunlinkat(Message):
    TYPE = 76
    FMT = "IsI"
    dirfid: int
    name: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class Runlinkat(Message):
    TYPE = 77


@dataclass(frozen=True, slots=True)
class Trenameat(Message):
    TYPE = 74
    FMT = "IsIs"
    olddirfid: int
    oldname: bytes
    newdirfid: int
    newname: bytes


@dataclass(frozen=True, slots=True)
class Rrenameat(Message):
    TYPE = 75


@dataclass(frozen=True, slots=True)
class Trename(Message):
    TYPE = 20
    FMT = "IIs"
    fid: int
    dfid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rrename(Message):
    TYPE = 21


@dataclass(frozen=True, slots=True)
class Tsymlink(Message):
    TYPE = 16
    FMT = "IssI"
    fid: int
    name: bytes
    symtgt: bytes
    gid: int


@dataclass(frozen=True, slots=True)
class Rsymlink(Message):
    TYPE = 17
    FMT = "q"
    qid: Qid


@dataclass(frozen=True, slots=True)
class Tmknod(Message):
    TYPE = 18
    FMT = "IsIIII"
    dfid: int
    name: bytes
    mode: int
    major: int
    minor: int
    gid: int


@dataclass(frozen=True, slots=True)
class Rmknod(Message):
    TYPE = 19
    FMT = "q"
    qid: Qid


@dataclass(frozen=True, slots=True)
class Tlink(Message):
    TYPE = 70
    FMT = "IIs"
    dfid: int
    fid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rlink(Message):
    TYPE = 71


@dataclass(frozen=True, slots=True)
class Treadlink(Message):
    TYPE = 22
    FMT = "I"
    fid: int


@dataclass(frozen=True, slots=True)
class Rreadlink(Message):
    TYPE = 23
    FMT = "s"
    target: bytes


# --- locks -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tlock(Message):
    TYPE = 52
    FMT = "IBIQQIs"
    fid: int
    type: int
    flags: int
    start: int
    length: int
    proc_id: int
    client_id: bytes


@dataclass(frozen=True, slots=True)
class Rlock(Message):
    TYPE = 53
    FMT = "B"
    status: int


@dataclass(frozen=True, slots=True)
class Tgetlock(Message):
    TYPE = 54
    FMT = "IBQQIs"
    fid: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: bytes


@dataclass(frozen=True, slots=True)
class Rgetlock(Message):
    TYPE = 55
    FMT = "BQQIs"
    type: int
    start: int
    length: int
    proc_id: int
    client_id: bytes


LOCK_SUCCESS = 0
LOCK_TYPE_UNLCK = 2

ALL_MESSAGES: tuple[type[Message], ...] = tuple(
    cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Message) and cls.TYPE >= 0
)
