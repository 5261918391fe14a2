"""Fids and what they point at: qids, attributes, directory cursors.

A fid under an export holds an O_PATH fd for its inode, obtained by a walk
of single names from the export's root fd. Every later operation is
relative to that fd (``*at`` calls with one checked name, or fstat on the
fd itself), never to a host path string, so a rename or a symlink swapped
in by someone else cannot redirect it outside the export: the fd keeps
naming the inode the walk reached.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from .codec import dirent_size, encode_dirent
from .exports import Export
from .messages import GETATTR_BASIC, QTDIR, QTFILE, QTSYMLINK, Qid, Rgetattr

_MASK64 = (1 << 64) - 1
ROOT_QID_PATH = 0xFFFF_FFFF_FFFF_FFFE  # the synthetic root; mixed inode paths rarely hit it

DT_UNKNOWN = 0
DT_DIR = 4
DT_REG = 8
DT_LNK = 10


class FsError(Exception):
    """An operation failed with a Linux errno to send back as Rlerror."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.errno = code


def qid_path(dev: int, ino: int) -> int:
    # Exports may sit on different file systems with overlapping inode
    # numbers; fold the device in so paths stay distinct in practice.
    return (ino ^ (dev * 0x9E37_79B9_7F4A_7C15)) & _MASK64


def qid_type(mode: int) -> int:
    if stat.S_ISDIR(mode):
        return QTDIR
    if stat.S_ISLNK(mode):
        return QTSYMLINK
    return QTFILE


def qid_of(st: os.stat_result) -> Qid:
    return Qid(qid_type(st.st_mode), 0, qid_path(st.st_dev, st.st_ino))


def root_qid(generation: int) -> Qid:
    return Qid(QTDIR, generation & 0xFFFF_FFFF, ROOT_QID_PATH)


def getattr_reply(tag: int, qid: Qid, st: os.stat_result) -> Rgetattr:
    a_s, a_ns = divmod(st.st_atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(st.st_mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(st.st_ctime_ns, 1_000_000_000)
    return Rgetattr(
        tag, GETATTR_BASIC, qid, st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
        st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
        a_s & _MASK64, a_ns, m_s & _MASK64, m_ns, c_s & _MASK64, c_ns,
        0, 0, 0, 0,
    )  # fmt: skip


class DirCursor:
    """Readdir state of one opened directory.

    Offsets handed to the client are entry counts. Reading on from the last
    offset continues the open iterator; any other offset rescans from the
    start and skips, which costs time proportional to the offset but keeps
    memory bounded however large the directory is.
    """

    def __init__(self, dir_fd: int) -> None:
        self._fd = dir_fd
        self._it: os._ScandirIterator[str] | None = None
        self._pos = 0
        self._pending: os.DirEntry[str] | None = None

    def _restart(self) -> None:
        self.close()
        # scandir dups the fd, and dups share the file offset: rewind first.
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._it = os.scandir(self._fd)
        self._pos = 0

    def _next(self) -> os.DirEntry[str] | None:
        if self._pending is not None:
            entry, self._pending = self._pending, None
            return entry
        assert self._it is not None
        return next(self._it, None)

    def read(self, offset: int, count: int, dev: int) -> bytes:
        if self._it is None or offset != self._pos:
            self._restart()
            while self._pos < offset and self._next() is not None:
                self._pos += 1
        out: list[bytes] = []
        used = 0
        while (entry := self._next()) is not None:
            name = os.fsencode(entry.name)
            if used + dirent_size(name) > count:
                self._pending = entry
                if not out:
                    # An empty reply would read as the end of the directory.
                    raise FsError(errno.EINVAL)
                break
            # is_dir/is_file/is_symlink use d_type, or lstat when the file
            # system gives none: never a stat that follows a link.
            if entry.is_symlink():
                dtype, qtype = DT_LNK, QTSYMLINK
            elif entry.is_dir(follow_symlinks=False):
                dtype, qtype = DT_DIR, QTDIR
            elif entry.is_file(follow_symlinks=False):
                dtype, qtype = DT_REG, QTFILE
            else:
                dtype, qtype = DT_UNKNOWN, QTFILE
            self._pos += 1
            qid = Qid(qtype, 0, qid_path(dev, entry.inode()))
            rec = encode_dirent(qid, self._pos, dtype, name)
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        self._pending = None


def root_listing(entries: dict[str, Export], offset: int, count: int) -> bytes:
    """Readdir of the synthetic root: one directory per live export."""
    out: list[bytes] = []
    used = 0
    names = sorted(entries)
    for index in range(offset, len(names)):
        export = entries[names[index]]
        name = names[index].encode("utf-8", "surrogatepass")
        if used + dirent_size(name) > count:
            if not out:
                raise FsError(errno.EINVAL)  # see DirCursor.read
            break
        rec = encode_dirent(qid_of(export.root_stat), index + 1, DT_DIR, name)
        out.append(rec)
        used += len(rec)
    return b"".join(out)


@dataclass(eq=False, slots=True)
class Fid:
    """One client fid. ``export`` None with ``path_fd`` -1 is the synthetic root."""

    export: Export | None
    path_fd: int
    qid: Qid
    mode: int  # st_mode when walked; only the file type is relied upon
    io_fd: int = -1
    accmode: int = -1  # O_RDONLY/O_WRONLY/O_RDWR once opened, else -1
    cursor: DirCursor | None = None
    xattr: bool = False  # an (always empty) extended-attribute fid

    @property
    def is_root(self) -> bool:
        return self.export is None and not self.xattr

    @property
    def opened(self) -> bool:
        return self.accmode != -1

    def check(self) -> None:
        """Raise FsError(EIO) when the fid's export was revoked."""
        if self.export is not None and self.export.revoked:
            raise FsError(errno.EIO)

    def require_dir(self) -> Export:
        """The fid's export, if the fid is an unopened directory in one."""
        if self.xattr or self.opened:
            raise FsError(errno.EINVAL)
        if self.export is None:
            raise FsError(errno.EROFS)  # the synthetic root is read-only
        if not stat.S_ISDIR(self.mode):
            raise FsError(errno.ENOTDIR)
        return self.export

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None
        for fd in (self.io_fd, self.path_fd):
            if fd >= 0:
                os.close(fd)
        self.io_fd = self.path_fd = -1
