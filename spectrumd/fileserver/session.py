"""One 9P2000.L connection's state: one request in, one reply out.

:meth:`Session.handle` never raises: every failure becomes Rlerror with a
Linux errno (OSError keeps its own; anything unexpected is EIO and is
logged at DEBUG with its traceback). A Session is confined to one thread
(see :mod:`.driver`); only its :class:`.exports.ExportTable` is shared.

Errors for hostile requests follow Linux's server side where it has one
(QEMU's 9pfs): more than 16 names in a walk is EINVAL; an unknown fid is
EBADF; a fid number already in use is EEXIST; a frame over msize ends the
connection (that is the driver's job, via the decoder).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from spectrumd.virtiofs.resolve import check_name, open_beneath

from . import fileops
from .exports import Export, ExportTable, RevokedError
from .messages import (
    GETATTR_BASIC,
    LOCK_SUCCESS,
    LOCK_TYPE_UNLCK,
    MAXWELEM,
    NOFID,
    VERSION_9P2000_L,
    BadMessage,
    Message,
    Qid,
    Rattach,
    Rclunk,
    Rflush,
    Rfsync,
    Rgetattr,
    Rgetlock,
    Rlcreate,
    Rlerror,
    Rlock,
    Rlopen,
    Rmkdir,
    Rread,
    Rreaddir,
    Rreadlink,
    Rrenameat,
    Rsetattr,
    Rstatfs,
    Runlinkat,
    Rversion,
    Rwalk,
    Rwrite,
    Rxattrwalk,
    Tattach,
    Tclunk,
    Tflush,
    Tfsync,
    Tgetattr,
    Tgetlock,
    Tlcreate,
    Tlink,
    Tlock,
    Tlopen,
    Tmkdir,
    Tmknod,
    Tread,
    Treaddir,
    Treadlink,
    Tremove,
    Trenameat,
    Tsetattr,
    Tstatfs,
    Tsymlink,
    Tunlinkat,
    Tversion,
    Twalk,
    Twrite,
    Txattrcreate,
    Txattrwalk,
)
from .nodes import Fid, FsError, getattr_reply, qid_of, root_listing, root_qid

logger = logging.getLogger(__name__)

MIN_MSIZE = 4096  # below this not even Rgetattr plus a path fits comfortably
DEFAULT_MAX_MSIZE = 1 << 20
READ_OVERHEAD = 11  # size[4] type[1] tag[2] count[4]
V9FS_MAGIC = 0x01021997


class Session:
    def __init__(
        self,
        exports: ExportTable,
        *,
        max_msize: int = DEFAULT_MAX_MSIZE,
        max_fids: int = 1 << 14,
    ) -> None:
        self.exports = exports
        self.max_msize = max_msize
        self.msize = max_msize  # what the decoder accepts before Tversion
        self.max_fids = max_fids
        self.negotiated = False
        self.fids: dict[int, Fid] = {}
        self._started = time.time_ns()
        self._handlers: dict[type[Message], Callable[[Any], Message]] = {
            Tversion: self._version, Tattach: self._attach, Twalk: self._walk,
            Tclunk: self._clunk, Tremove: self._remove, Tlopen: self._lopen,
            Tlcreate: self._lcreate, Tread: self._read, Twrite: self._write,
            Treaddir: self._readdir, Tgetattr: self._getattr,
            Tsetattr: self._setattr, Tstatfs: self._statfs, Tmkdir: self._mkdir,
            Tunlinkat: self._unlinkat, Trenameat: self._renameat,
            Txattrwalk: self._xattrwalk, Txattrcreate: self._xattrcreate,
            Tsymlink: self._refuse_create, Tmknod: self._refuse_create,
            Tlink: self._refuse_create, Treadlink: self._readlink,
            Tlock: self._lock, Tgetlock: self._getlock, Tfsync: self._fsync,
        }  # fmt: skip

    # --- plumbing -------------------------------------------------------

    def handle(self, msg: Message) -> Message:
        """The reply to *msg*; never raises."""
        try:
            if isinstance(msg, BadMessage):
                return Rlerror(msg.tag, errno.EINVAL if msg.known else errno.EOPNOTSUPP)
            if isinstance(msg, Tflush):
                # Requests are answered in order, so whatever oldtag named
                # has been answered already.
                return Rflush(msg.tag)
            handler = self._handlers.get(type(msg))
            if handler is None:
                return Rlerror(msg.tag, errno.EOPNOTSUPP)
            if not self.negotiated and not isinstance(msg, Tversion):
                return Rlerror(msg.tag, errno.EPROTO)
            return handler(msg)
        except FsError as e:
            return Rlerror(msg.tag, e.errno)
        except RevokedError:
            return Rlerror(msg.tag, errno.EIO)
        except OSError as e:
            return Rlerror(msg.tag, e.errno or errno.EIO)
        except (OverflowError, ValueError):
            return Rlerror(msg.tag, errno.EINVAL)
        except Exception:
            logger.debug("unexpected failure handling %s", type(msg).__name__, exc_info=True)
            return Rlerror(msg.tag, errno.EIO)

    def close(self) -> None:
        fids, self.fids = self.fids, {}
        for fid in fids.values():
            fid.close()

    def _fid(self, number: int) -> Fid:
        fid = self.fids.get(number)
        if fid is None:
            raise FsError(errno.EBADF)
        fid.check()
        return fid

    def _free(self, number: int) -> None:
        if number == NOFID:
            raise FsError(errno.EBADF)
        if number in self.fids:
            raise FsError(errno.EEXIST)
        if len(self.fids) >= self.max_fids:
            raise FsError(errno.EMFILE)

    def _root(self) -> Fid:
        return Fid(None, -1, root_qid(self.exports.generation), stat.S_IFDIR | 0o555)

    @staticmethod
    def _export_root(export: Export) -> Fid:
        fd = export.dup_root()
        return Fid(export, fd, qid_of(export.root_stat), export.root_stat.st_mode)

    # --- session --------------------------------------------------------

    def _version(self, msg: Tversion) -> Message:
        # A version message starts a new session: all fids go (version(5)).
        self.close()
        self.negotiated = False
        msize = min(msg.msize, self.max_msize)
        if not msg.version.startswith(VERSION_9P2000_L) or msize < MIN_MSIZE:
            return Rversion(msg.tag, msize, b"unknown")
        self.msize = msize
        self.negotiated = True
        return Rversion(msg.tag, msize, VERSION_9P2000_L)

    def _attach(self, msg: Tattach) -> Message:
        self._free(msg.fid)
        aname = msg.aname.strip(b"/")
        if not aname:
            fid = self._root()
        else:
            export = self.exports.lookup(aname)
            if export is None or check_name(aname) is not None:
                raise FsError(errno.ENOENT)
            fid = self._export_root(export)
        self.fids[msg.fid] = fid
        return Rattach(msg.tag, fid.qid)

    def _step(self, cur: Fid, name: bytes) -> Fid:
        """The fid one name below *cur* (a new O_PATH fd, or the root's export)."""
        bad = check_name(name)
        if bad is not None:
            raise FsError(bad)
        if cur.is_root:
            export = self.exports.lookup(name)
            if export is None:
                raise FsError(errno.ENOENT)
            return self._export_root(export)
        if cur.export is None or not stat.S_ISDIR(cur.mode):
            raise FsError(errno.ENOTDIR)
        cur.export.check()
        fd = open_beneath(cur.path_fd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return Fid(cur.export, fd, qid_of(st), st.st_mode)

    def _walk(self, msg: Twalk) -> Message:
        if len(msg.wnames) > MAXWELEM:
            raise FsError(errno.EINVAL)
        src = self._fid(msg.fid)
        if src.xattr:
            raise FsError(errno.EINVAL)
        if msg.newfid != msg.fid:
            self._free(msg.newfid)
        cur = Fid(src.export, os.dup(src.path_fd) if src.path_fd >= 0 else -1, src.qid, src.mode)
        qids: list[Qid] = []
        try:
            for name in msg.wnames:
                nxt = self._step(cur, name)
                cur.close()
                cur = nxt
                qids.append(cur.qid)
        except (OSError, FsError, RevokedError):
            cur.close()
            if not qids:
                raise
            # A partial walk succeeds with the qids it reached; newfid is
            # not created (walk(5)).
            return Rwalk(msg.tag, tuple(qids))
        except BaseException:
            cur.close()
            raise
        if msg.newfid == msg.fid:
            self.fids.pop(msg.fid).close()
        self.fids[msg.newfid] = cur
        return Rwalk(msg.tag, tuple(qids))

    def _clunk(self, msg: Tclunk) -> Message:
        fid = self.fids.pop(msg.fid, None)
        if fid is None:
            raise FsError(errno.EBADF)
        fid.close()
        return Rclunk(msg.tag)

    def _remove(self, msg: Tremove) -> Message:
        # remove needs the parent, which a DAG fid does not know; Linux
        # uses unlinkat and falls back to remove only on EOPNOTSUPP.
        # remove clunks the fid even when it fails (remove(5)).
        self._clunk(Tclunk(msg.tag, msg.fid))
        raise FsError(errno.EOPNOTSUPP)

    # --- files ----------------------------------------------------------

    def _lopen(self, msg: Tlopen) -> Message:
        return Rlopen(msg.tag, fileops.lopen(self._fid(msg.fid), msg.flags), 0)

    def _lcreate(self, msg: Tlcreate) -> Message:
        qid = fileops.lcreate(self._fid(msg.fid), msg.name, msg.flags, msg.mode)
        return Rlcreate(msg.tag, qid, 0)

    def _read(self, msg: Tread) -> Message:
        count = min(msg.count, self.msize - READ_OVERHEAD)
        return Rread(msg.tag, fileops.read(self._fid(msg.fid), msg.offset, count))

    def _write(self, msg: Twrite) -> Message:
        return Rwrite(msg.tag, fileops.write(self._fid(msg.fid), msg.offset, msg.data))

    def _readdir(self, msg: Treaddir) -> Message:
        fid = self._fid(msg.fid)
        count = min(msg.count, self.msize - READ_OVERHEAD)
        if fid.is_root:
            if not fid.opened:
                raise FsError(errno.EBADF)
            return Rreaddir(msg.tag, root_listing(self.exports.entries(), msg.offset, count))
        return Rreaddir(msg.tag, fileops.readdir(fid, msg.offset, count))

    def _getattr(self, msg: Tgetattr) -> Message:
        fid = self._fid(msg.fid)
        if fid.xattr:
            raise FsError(errno.EINVAL)
        if fid.is_root:
            s, ns = divmod(self._started, 1_000_000_000)
            qid = root_qid(self.exports.generation)
            return Rgetattr(
                msg.tag, GETATTR_BASIC, qid, stat.S_IFDIR | 0o555, 0, 0,
                2, 0, 0, 4096, 0, s, ns, s, ns, s, ns, 0, 0, 0, 0,
            )  # fmt: skip
        st = os.fstat(fid.path_fd)
        return getattr_reply(msg.tag, qid_of(st), st)

    def _setattr(self, msg: Tsetattr) -> Message:
        fileops.setattr(self._fid(msg.fid), msg)
        return Rsetattr(msg.tag)

    def _statfs(self, msg: Tstatfs) -> Message:
        fid = self._fid(msg.fid)
        if fid.path_fd < 0:
            return Rstatfs(msg.tag, V9FS_MAGIC, 4096, 0, 0, 0, 0, 0, 0, 255)
        v = os.fstatvfs(fid.path_fd)
        return Rstatfs(
            msg.tag, V9FS_MAGIC, v.f_bsize, v.f_blocks, v.f_bfree, v.f_bavail,
            v.f_files, v.f_ffree, v.f_fsid & ((1 << 64) - 1), min(v.f_namemax, 255),
        )  # fmt: skip

    def _fsync(self, msg: Tfsync) -> Message:
        fileops.fsync(self._fid(msg.fid), msg.datasync)
        return Rfsync(msg.tag)

    def _readlink(self, msg: Treadlink) -> Message:
        return Rreadlink(msg.tag, fileops.readlink(self._fid(msg.fid)))

    # --- directories ----------------------------------------------------

    def _mkdir(self, msg: Tmkdir) -> Message:
        return Rmkdir(msg.tag, fileops.mkdir(self._fid(msg.dfid), msg.name, msg.mode))

    def _unlinkat(self, msg: Tunlinkat) -> Message:
        fileops.unlinkat(self._fid(msg.dirfid), msg.name, msg.flags)
        return Runlinkat(msg.tag)

    def _renameat(self, msg: Trenameat) -> Message:
        old, new = self._fid(msg.olddirfid), self._fid(msg.newdirfid)
        fileops.renameat(old, msg.oldname, new, msg.newname)
        return Rrenameat(msg.tag)

    def _refuse_create(self, msg: Tsymlink | Tmknod | Tlink) -> Message:
        # Symlinks, device nodes and hard links are never made on the host:
        # each would let the guest plant something that points elsewhere.
        fid = self._fid(msg.fid if isinstance(msg, Tsymlink) else msg.dfid)
        if fid.export is None or not fid.export.writable:
            raise FsError(errno.EROFS)
        raise FsError(errno.EPERM)

    # --- extended attributes and locks ----------------------------------

    def _xattrwalk(self, msg: Txattrwalk) -> Message:
        fid = self._fid(msg.fid)
        self._free(msg.newfid)
        if msg.name:
            raise FsError(errno.ENODATA)  # no file has any attribute here
        self.fids[msg.newfid] = Fid(fid.export, -1, fid.qid, 0, xattr=True)
        return Rxattrwalk(msg.tag, 0)

    def _xattrcreate(self, msg: Txattrcreate) -> Message:
        fid = self._fid(msg.fid)
        if fid.export is None or not fid.export.writable:
            raise FsError(errno.EROFS)
        raise FsError(errno.EOPNOTSUPP)

    def _lock(self, msg: Tlock) -> Message:
        # Locks are advisory and only between processes of one guest (its
        # kernel keeps them): granting here is what a single-client export
        # needs, and nothing on the host is locked on a guest's behalf.
        self._fid(msg.fid)
        return Rlock(msg.tag, LOCK_SUCCESS)

    def _getlock(self, msg: Tgetlock) -> Message:
        self._fid(msg.fid)
        return Rgetlock(msg.tag, LOCK_TYPE_UNLCK, msg.start, msg.length, msg.proc_id,
                        msg.client_id)  # fmt: skip
