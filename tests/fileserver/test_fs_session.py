"""Session behaviour a guest observes: files, directories, errors, live exports."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from fs9p_helpers import (
    O_RDONLY,
    O_RDWR,
    O_WRONLY,
    NinePError,
    SessionClient,
    make_table,
    session_client,
)

from spectrumd.fileserver.codec import decode_dirents
from spectrumd.fileserver.exports import ExportSpec
from spectrumd.fileserver.messages import (
    AT_REMOVEDIR,
    NOFID,
    QTDIR,
    SETATTR_ATIME,
    SETATTR_ATIME_SET,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_SET,
    SETATTR_SIZE,
    SETATTR_UID,
    BadMessage,
    Rflush,
    Rlerror,
    Rversion,
    Tattach,
    Tauth,
    Tflush,
    Tfsync,
    Tlink,
    Tlock,
    Tmkdir,
    Tmknod,
    Treadlink,
    Tremove,
    Trenameat,
    Tsetattr,
    Tstatfs,
    Tsymlink,
    Tunlinkat,
    Tversion,
    Twalk,
    Txattrcreate,
    Txattrwalk,
)
from spectrumd.fileserver.session import Session


def err(exc: pytest.ExceptionInfo[NinePError]) -> int:
    return exc.value.errno


@pytest.fixture
def rw(tmp_path: Path) -> tuple[SessionClient, Path]:
    root = tmp_path / "rw"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello world")
    (root / "sub").mkdir()
    return session_client(make_table(rw=(str(root), True))), root


def names(data: bytes) -> list[bytes]:
    return [name for _, _, _, name in decode_dirents(data)]


def test_version_negotiation() -> None:
    s = SessionClient(Session(make_table(), max_msize=1 << 20))
    assert s.rpc(Tversion, 512 * 1024, b"9P2000.L") == Rversion(s._tag, 512 * 1024, b"9P2000.L")
    assert s.session.msize == 512 * 1024
    # Capped at the server's maximum; other dialects are refused.
    assert s.rpc(Tversion, 1 << 30, b"9P2000.L").msize == 1 << 20
    assert s.rpc(Tversion, 8192, b"9P2000.u").version == b"unknown"
    assert s.rpc(Tversion, 100, b"9P2000.L").version == b"unknown"


def test_requests_before_version_are_refused() -> None:
    s = SessionClient(Session(make_table()))
    with pytest.raises(NinePError) as e:
        s.attach(0)
    assert err(e) == errno.EPROTO


def test_root_lists_exports_and_is_read_only(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    s = session_client(
        make_table(docs=(str(tmp_path / "a"), False), rw=(str(tmp_path / "b"), True))
    )
    attr = s.getattr(0)
    assert stat.S_ISDIR(attr.mode) and attr.qid.type == QTDIR
    s.walk(0, 1)
    s.lopen(1)
    assert names(s.readdir(1)) == [b"docs", b"rw"]
    assert s.readdir(1, offset=2) == b""
    for flags in (O_WRONLY, O_RDWR):
        s.walk(0, 2)
        with pytest.raises(NinePError) as e:
            s.lopen(2, flags)
        assert err(e) == errno.EROFS
        s.clunk(2)
    for call in (
        lambda: s.rpc(Tmkdir, 0, b"new", 0o755, 0),
        lambda: s.lcreate(0, b"new"),
        lambda: s.rpc(Tunlinkat, 0, b"docs", AT_REMOVEDIR),
        lambda: s.rpc(Tsetattr, 0, SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0),
    ):
        with pytest.raises(NinePError) as e:
            call()
        assert err(e) == errno.EROFS


def test_attach_by_aname(tmp_path: Path) -> None:
    s = SessionClient(Session(make_table(docs=(str(tmp_path), False))))
    s.version()
    s.attach(0, b"docs")
    assert s.getattr(0).qid.path != 0
    with pytest.raises(NinePError) as e:
        s.attach(1, b"nope")
    assert err(e) == errno.ENOENT


def test_file_life_cycle(rw: tuple[SessionClient, Path]) -> None:
    s, root = rw
    s.walk(0, 1, b"rw")
    s.lcreate(1, b"new.txt", O_RDWR, 0o4755)  # set-id bits are dropped
    assert s.write(1, b"abcdef") == 6
    assert s.read(1, 2, 3) == b"cde"
    assert stat.S_IMODE(os.stat(root / "new.txt").st_mode) & 0o7000 == 0
    s.clunk(1)
    s.walk(0, 2, b"rw", b"new.txt")
    s.rpc(Tsetattr, 2, SETATTR_SIZE, 0, 0, 0, 2, 0, 0, 0, 0)
    assert (root / "new.txt").read_bytes() == b"ab"
    s.rpc(Tsetattr, 2, SETATTR_MODE, 0o600, 0, 0, 0, 0, 0, 0, 0)
    assert stat.S_IMODE(os.stat(root / "new.txt").st_mode) == 0o600
    valid = SETATTR_ATIME | SETATTR_ATIME_SET | SETATTR_MTIME | SETATTR_MTIME_SET
    s.rpc(Tsetattr, 2, valid, 0, 0, 0, 0, 1000, 5, 2000, 7)
    st = os.stat(root / "new.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    attr = s.getattr(2)
    assert (attr.size, attr.mtime_sec, attr.mtime_nsec) == (2, 2000, 7)
    with pytest.raises(NinePError) as e:  # chown to someone else
        s.rpc(Tsetattr, 2, SETATTR_UID, 0, st.st_uid + 1, 0, 0, 0, 0, 0, 0)
    assert err(e) == errno.EPERM
    s.rpc(Tsetattr, 2, SETATTR_UID, 0, st.st_uid, 0, 0, 0, 0, 0, 0)  # a no-op is fine
    s.lopen(2, O_WRONLY | os.O_TRUNC)
    s.rpc(Tfsync, 2, 0)
    assert (root / "new.txt").read_bytes() == b""
    s.walk(0, 3, b"rw")
    s.rpc(Tunlinkat, 3, b"new.txt", 0)
    assert not (root / "new.txt").exists()
    # The open fid still works on the unlinked inode, like a Unix fd.
    assert s.write(2, b"zz") == 2


def test_directories(rw: tuple[SessionClient, Path]) -> None:
    s, root = rw
    s.walk(0, 1, b"rw")
    qid = s.rpc(Tmkdir, 1, b"d", 0o755, 0).qid
    assert qid.type == QTDIR and (root / "d").is_dir()
    s.rpc(Trenameat, 1, b"d", 1, b"e")
    assert (root / "e").is_dir()
    with pytest.raises(NinePError) as e:
        s.rpc(Tunlinkat, 1, b"e", 0)
    assert err(e) == errno.EISDIR
    s.rpc(Tunlinkat, 1, b"e", AT_REMOVEDIR)
    assert not (root / "e").exists()
    st = s.rpc(Tstatfs, 1)
    assert st.bsize > 0 and st.namelen == 255


def test_readdir_pages_through_a_large_directory(rw: tuple[SessionClient, Path]) -> None:
    s, root = rw
    big = root / "big"
    big.mkdir()
    expected = {f"file-{i:04d}".encode() for i in range(300)}
    for n in expected:
        (big / n.decode()).touch()
    s.walk(0, 1, b"rw", b"big")
    s.lopen(1)
    seen: list[bytes] = []
    offset = 0
    while data := s.readdir(1, offset, 700):
        ents = decode_dirents(data)
        seen += [n for _, _, _, n in ents]
        offset = ents[-1][1]
    assert sorted(seen) == sorted(expected)
    # A count too small for the next entry is an error, not the end.
    with pytest.raises(NinePError) as e:
        s.readdir(1, 0, 10)
    assert err(e) == errno.EINVAL
    # Seeking back restarts the listing consistently.
    again = decode_dirents(s.readdir(1, 10, 1 << 16))
    assert [n for *_, n in again] == seen[10:]


def test_fid_errors(rw: tuple[SessionClient, Path]) -> None:
    s, _ = rw
    with pytest.raises(NinePError) as e:
        s.walk(99, 1)
    assert err(e) == errno.EBADF
    s.walk(0, 1)
    with pytest.raises(NinePError) as e:
        s.walk(0, 1)
    assert err(e) == errno.EEXIST
    with pytest.raises(NinePError) as e:
        s.rpc(Tattach, 1, NOFID, b"", b"", 0)
    assert err(e) == errno.EEXIST
    with pytest.raises(NinePError) as e:
        s.walk(0, 2, *([b"rw"] * 17))
    assert err(e) == errno.EINVAL
    with pytest.raises(NinePError) as e:
        s.clunk(77)
    assert err(e) == errno.EBADF
    with pytest.raises(NinePError) as e:
        s.read(0)
    assert err(e) == errno.EBADF  # not opened
    with pytest.raises(NinePError) as e:
        s.rpc(Tauth, 5, b"u", b"", 0)
    assert err(e) == errno.EOPNOTSUPP
    with pytest.raises(NinePError):
        s.rpc(Tremove, 1)
    assert 1 not in s.session.fids  # remove clunks even when it fails
    assert s.raw(Tflush(3, 2)) == Rflush(3)
    assert s.session.handle(BadMessage(4, 110, known=True)) == Rlerror(4, errno.EINVAL)
    assert s.session.handle(BadMessage(4, 250, known=False)) == Rlerror(4, errno.EOPNOTSUPP)


def test_partial_walk(rw: tuple[SessionClient, Path]) -> None:
    s, _ = rw
    reply = s.walk(0, 1, b"rw", b"sub", b"missing", b"x")
    assert len(reply.qids) == 2
    assert 1 not in s.session.fids  # newfid is only made by a full walk
    with pytest.raises(NinePError) as e:
        s.walk(0, 1, b"missing")
    assert err(e) == errno.ENOENT
    s.walk(0, 0, b"rw")  # walking a fid onto itself replaces it
    assert s.getattr(0).qid.type == QTDIR


def test_links_symlinks_and_nodes_are_refused(rw: tuple[SessionClient, Path]) -> None:
    s, root = rw
    s.walk(0, 1, b"rw")
    s.walk(1, 2, b"hello.txt")
    for msg in (
        (Tsymlink, 1, b"l", b"/etc/passwd", 0),
        (Tlink, 1, 2, b"hard"),
        (Tmknod, 1, b"node", stat.S_IFCHR | 0o666, 1, 3, 0),
        (Tmknod, 1, b"fifo", stat.S_IFIFO | 0o666, 0, 0, 0),
    ):
        with pytest.raises(NinePError) as e:
            s.rpc(*msg)
        assert err(e) == errno.EPERM
    assert sorted(os.listdir(root)) == ["hello.txt", "sub"]


def test_xattrs_are_empty_and_locks_granted(rw: tuple[SessionClient, Path]) -> None:
    s, _ = rw
    s.walk(0, 1, b"rw", b"hello.txt")
    assert s.rpc(Txattrwalk, 1, 5, b"").size == 0
    assert s.read(5) == b""
    s.clunk(5)
    with pytest.raises(NinePError) as e:
        s.rpc(Txattrwalk, 1, 5, b"user.x")
    assert err(e) == errno.ENODATA
    with pytest.raises(NinePError) as e:
        s.rpc(Txattrcreate, 1, b"user.x", 1, 0)
    assert err(e) == errno.EOPNOTSUPP
    s.lopen(1)
    assert s.rpc(Tlock, 1, 1, 0, 0, 0, 1, b"guest").status == 0


def test_read_only_export_refuses_every_change(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "d").mkdir()
    before = sorted(os.listdir(tmp_path))
    s = session_client(make_table(ro=(str(tmp_path), False)))
    s.walk(0, 1, b"ro")
    s.walk(1, 2, b"f")
    attempts = [
        lambda: s.lopen(2, O_WRONLY),
        lambda: s.lopen(2, O_RDWR),
        lambda: s.lopen(2, O_RDONLY | os.O_TRUNC),
        lambda: s.lcreate(1, b"new"),
        lambda: s.rpc(Tmkdir, 1, b"new", 0o755, 0),
        lambda: s.rpc(Tunlinkat, 1, b"f", 0),
        lambda: s.rpc(Tunlinkat, 1, b"d", AT_REMOVEDIR),
        lambda: s.rpc(Trenameat, 1, b"f", 1, b"g"),
        lambda: s.rpc(Tsetattr, 2, SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0),
        lambda: s.rpc(Tsetattr, 2, SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0),
        lambda: s.rpc(Tsetattr, 2, SETATTR_MTIME, 0, 0, 0, 0, 0, 0, 0, 0),
        lambda: s.rpc(Tsymlink, 1, b"l", b"f", 0),
        lambda: s.rpc(Tlink, 1, 2, b"l"),
        lambda: s.rpc(Tmknod, 1, b"n", stat.S_IFIFO | 0o644, 0, 0, 0),
        lambda: s.rpc(Txattrcreate, 2, b"user.a", 1, 0),
    ]
    for attempt in attempts:
        with pytest.raises(NinePError) as e:
            attempt()
        assert err(e) == errno.EROFS
    s.lopen(2)
    with pytest.raises(NinePError) as e:
        s.write(2, b"x")
    assert err(e) == errno.EROFS
    assert s.read(2) == b"data"
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "f").read_bytes() == b"data"


def test_live_add_and_remove_of_exports(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_bytes(b"A")
    table = make_table(a=(str(a), True))
    s = session_client(table)
    s.walk(0, 1)
    s.lopen(1)
    assert names(s.readdir(1)) == [b"a"]
    s.walk(0, 2, b"a", b"f")
    s.lopen(2)
    gen = s.getattr(0).qid.version

    table.replace({"a": ExportSpec(str(a), True), "b": ExportSpec(str(b), False)})
    assert names(s.readdir(1)) == [b"a", b"b"]  # same open fid sees it at once
    s.walk(0, 3, b"b")
    assert s.read(2) == b"A"  # unchanged entries keep working
    assert s.getattr(0).qid.version != gen

    table.replace({"b": ExportSpec(str(b), False)})
    assert names(s.readdir(1)) == [b"b"]
    with pytest.raises(NinePError) as e:
        s.read(2)
    assert err(e) == errno.EIO
    with pytest.raises(NinePError) as e:
        s.walk(0, 4, b"a")
    assert err(e) == errno.ENOENT
    s.clunk(2)  # a revoked fid can still be clunked

    # Changing an export's writability revokes it too.
    table.replace({"b": ExportSpec(str(b), True)})
    with pytest.raises(NinePError) as e:
        s.getattr(3)
    assert err(e) == errno.EIO
    s.walk(0, 5, b"b")
    s.lcreate(5, b"now-writable")
    assert (b / "now-writable").exists()


def test_version_resets_fids(rw: tuple[SessionClient, Path]) -> None:
    s, _ = rw
    s.walk(0, 1, b"rw")
    s.version()
    assert s.session.fids == {}


def test_walk_into_symlink_then_readlink(rw: tuple[SessionClient, Path]) -> None:
    s, root = rw
    os.symlink("hello.txt", root / "link")
    s.walk(0, 1, b"rw", b"link")
    assert s.rpc(Treadlink, 1).target == b"hello.txt"
    with pytest.raises(NinePError) as e:
        s.lopen(1)
    assert err(e) == errno.ELOOP
    with pytest.raises(NinePError) as e:
        s.rpc(Tsetattr, 1, SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0)
    assert err(e) == errno.EPERM
    assert s.rpc(Twalk, 0, 9, ()).qids == ()
