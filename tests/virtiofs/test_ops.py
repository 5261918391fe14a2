"""The ops layer on a real temporary tree: every operation, and the guest as attacker.

Each attack asserts what a guest would observe (the errno) and that nothing
outside the export changed or was opened.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.virtiofs import protocol as P
from spectrumd.virtiofs.tree import Tree

from .fusereq import Client, FuseError, name, request, setattr_body
from .traversal_world import real_opens_of

pytestmark = pytest.mark.timeout(30)


def dirfd(p: Path) -> int:
    return os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Client, Path]]:
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    (tmp_path / "rw" / "hello").write_text("hello world")
    (tmp_path / "rw" / "sub").mkdir()
    (tmp_path / "ro" / "file").write_text("read only")
    c = Client(Tree(max_inodes=64, max_handles=8))
    c.tree.add_export("rw", dirfd(tmp_path / "rw"), True)
    c.tree.add_export("ro", dirfd(tmp_path / "ro"), False)
    c.init()
    yield c, tmp_path
    c.tree.close()


def errno_of(fn: object, *args: object, **kw: object) -> int:
    with pytest.raises(FuseError) as e:
        fn(*args, **kw)  # type: ignore[operator]
    return e.value.errno


def test_init_never_grants_export_support(world: tuple[Client, Path]) -> None:
    c, _ = world
    flags = c.init()
    assert not flags & P.EXPORT_SUPPORT
    assert flags & P.MAX_PAGES


def test_requests_before_init_fail() -> None:
    c = Client()
    assert errno_of(c.lookup, 1, b"x") == errno.EIO


def test_root_lists_exports_and_refuses_changes(world: tuple[Client, Path]) -> None:
    c, _ = world
    fh = c.open(1, op=P.OPENDIR)
    assert c.readdir(fh) == [b"ro", b"rw"]
    assert errno_of(c.create, 1, b"new") == errno.EROFS
    assert errno_of(c.mkdir, 1, b"new") == errno.EROFS
    assert errno_of(c.call, P.UNLINK, 1, name(b"rw")) == errno.EROFS


def test_read_write_create_rename_unlink(world: tuple[Client, Path]) -> None:
    c, tmp = world
    rw, _ = c.lookup(1, b"rw")
    hello, attr = c.lookup(rw, b"hello")
    assert attr[1] == 11  # size
    fh = c.open(hello)
    assert c.read(fh, 6, 100) == b"world"
    c.release(fh)
    node, fh = c.create(rw, b"new", 0o600)
    assert c.write(fh, 0, b"abc" * 1000) == 3000
    assert c.read(fh, 2997, 10) == b"abc"
    c.call(P.FSYNC, node, struct.pack("<QII", fh, 0, 0))
    c.release(fh)
    assert (tmp / "rw" / "new").read_bytes() == b"abc" * 1000
    assert stat.S_IMODE((tmp / "rw" / "new").stat().st_mode) == 0o600
    sub, _ = c.lookup(rw, b"sub")
    c.rename(rw, b"new", sub, b"moved")
    assert (tmp / "rw" / "sub" / "moved").exists()
    c.call(P.UNLINK, sub, name(b"moved"))
    d = c.mkdir(rw, b"dir")
    assert (tmp / "rw" / "dir").is_dir() and d > 1
    c.call(P.RMDIR, rw, name(b"dir"))
    assert not (tmp / "rw" / "dir").exists()
    fh = c.open(rw, op=P.OPENDIR)
    assert sorted(c.readdir(fh)) == [b"hello", b"sub"]
    assert sorted(c.readdir(fh, P.READDIRPLUS)) == [b"hello", b"sub"]
    c.release(fh, P.RELEASEDIR)
    out = c.call(P.STATFS, rw)
    assert struct.unpack_from("<Q", out)[0] > 0
    c.call(P.FORGET, sub, struct.pack("<Q", 2))  # its LOOKUP and its READDIRPLUS entry
    assert errno_of(c.call, P.GETATTR, sub, bytes(16)) == errno.ESTALE


def test_setattr_truncate_chmod_times(world: tuple[Client, Path]) -> None:
    c, tmp = world
    rw, _ = c.lookup(1, b"rw")
    hello, _ = c.lookup(rw, b"hello")
    c.call(P.SETATTR, hello, setattr_body(P.FATTR_SIZE | P.FATTR_MODE, size=5, mode=0o100640))
    st = (tmp / "rw" / "hello").stat()
    assert st.st_size == 5 and stat.S_IMODE(st.st_mode) == 0o640
    c.call(P.SETATTR, hello, setattr_body(P.FATTR_MTIME))
    assert (tmp / "rw" / "hello").stat().st_mtime == 0


@pytest.mark.parametrize("bad", [b"..", b".", b"a/b", b"../outside", b"/etc", b"x" * 256])
def test_names_that_are_not_one_component(world: tuple[Client, Path], bad: bytes) -> None:
    c, _ = world
    rw, _ = c.lookup(1, b"rw")
    for parent in (1, rw):
        assert errno_of(c.lookup, parent, bad) in (errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG)
    assert errno_of(c.create, rw, bad) in (errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG)
    assert errno_of(c.mkdir, rw, bad) in (errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG)


def test_name_with_nul_in_it_is_cut_at_the_nul(world: tuple[Client, Path]) -> None:
    c, _ = world
    rw, _ = c.lookup(1, b"rw")
    # The kernel's names end at the first NUL: "hello\0/../x" is "hello".
    err, _ = c.raw(request(P.LOOKUP, rw, b"hello\0/../outside\0"))
    assert err == 0


def test_symlinks_are_shown_never_followed(world: tuple[Client, Path]) -> None:
    c, tmp = world
    os.symlink(tmp / "outside", tmp / "rw" / "link")
    os.symlink("../outside/secret", tmp / "rw" / "rel")
    rw, _ = c.lookup(1, b"rw")
    link, attr = c.lookup(rw, b"link")
    assert stat.S_ISLNK(attr[9])
    assert c.call(P.READLINK, link) == os.fsencode(tmp / "outside")
    assert errno_of(c.lookup, link, b"secret") == errno.ENOTDIR
    assert errno_of(c.open, link) == errno.ELOOP
    assert errno_of(c.open, link, op=P.OPENDIR) == errno.ELOOP
    rel, _ = c.lookup(rw, b"rel")
    assert errno_of(c.open, rel, os.O_RDWR) == errno.ELOOP
    # CREATE over a symlink does not write through it.
    assert errno_of(c.create, rw, b"rel", flags=os.O_RDWR | os.O_TRUNC) == errno.ELOOP
    assert (tmp / "outside" / "secret").read_text() == "secret"
    # A symlink as an export root's replacement or as a middle component.
    os.symlink(tmp / "outside", tmp / "rw" / "sub" / "deeper")
    sub, _ = c.lookup(rw, b"sub")
    deeper, _ = c.lookup(sub, b"deeper")
    assert errno_of(c.lookup, deeper, b"secret") == errno.ENOTDIR


def test_rename_race_swapping_a_directory_for_a_symlink(world: tuple[Client, Path]) -> None:
    """The guest holds a directory; the host side swaps it for a symlink out, over and over."""
    c, tmp = world
    (tmp / "rw" / "sub" / "inner").write_text("inner")
    rw, _ = c.lookup(1, b"rw")
    sub, _ = c.lookup(rw, b"sub")
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            os.rename(tmp / "rw" / "sub", tmp / "rw" / "real")
            os.symlink(tmp / "outside", tmp / "rw" / "sub")
            os.unlink(tmp / "rw" / "sub")
            os.rename(tmp / "rw" / "real", tmp / "rw" / "sub")

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for _ in range(300):
            for parent in (sub,):
                try:
                    node, _ = c.lookup(parent, b"secret")
                except FuseError as e:
                    assert e.errno == errno.ENOENT
                else:  # pragma: no cover - would be the escape
                    raise AssertionError(f"reached outside/secret as node {node}")
            try:
                fresh, attr = c.lookup(rw, b"sub")
            except FuseError:
                continue
            if stat.S_ISLNK(attr[9]):
                assert errno_of(c.lookup, fresh, b"secret") == errno.ENOTDIR
            else:
                with pytest.raises(FuseError):
                    c.lookup(fresh, b"secret")
    finally:
        stop.set()
        t.join()


def test_fifos_and_device_nodes_are_never_opened(world: tuple[Client, Path]) -> None:
    c, tmp = world
    os.mkfifo(tmp / "rw" / "fifo")
    os.mknod(tmp / "rw" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    rw, _ = c.lookup(1, b"rw")
    fifo, attr = c.lookup(rw, b"fifo")
    assert stat.S_ISFIFO(attr[9])
    dev, _ = c.lookup(rw, b"null")
    for node in (fifo, dev):
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            assert errno_of(c.open, node, flags) == errno.EACCES
        assert errno_of(c.open, node, op=P.OPENDIR) == errno.ENOTDIR
    # CREATE without O_EXCL on an existing FIFO must not open it (it would block).
    assert errno_of(c.create, rw, b"fifo", flags=os.O_WRONLY) == errno.EACCES
    assert errno_of(c.create, rw, b"null", flags=os.O_RDWR) == errno.EACCES
    # The only fds on them are the O_PATH ones of their inodes.
    assert real_opens_of(tmp / "rw" / "fifo") == [] and real_opens_of(tmp / "rw" / "null") == []


def test_setuid_setgid_and_chown_are_refused(world: tuple[Client, Path]) -> None:
    c, tmp = world
    rw, _ = c.lookup(1, b"rw")
    hello, _ = c.lookup(rw, b"hello")
    for mode in (0o4755, 0o2755, 0o6777):
        assert errno_of(c.call, P.SETATTR, hello, setattr_body(P.FATTR_MODE, mode=mode)) == (
            errno.EPERM
        )
        assert errno_of(c.create, rw, b"suid", mode) == errno.EPERM
        assert errno_of(c.mkdir, rw, b"sgid", mode) == errno.EPERM
    assert errno_of(c.call, P.SETATTR, hello, setattr_body(P.FATTR_UID, uid=12345)) == errno.EPERM
    assert not (tmp / "rw" / "suid").exists()
    assert stat.S_IMODE((tmp / "rw" / "hello").stat().st_mode) & 0o6000 == 0


def test_created_files_belong_to_the_server_not_the_request(world: tuple[Client, Path]) -> None:
    c, tmp = world
    rw, _ = c.lookup(1, b"rw")
    c.create(rw, b"mine")  # the request claims uid 1000
    assert (tmp / "rw" / "mine").stat().st_uid == os.geteuid()


def test_read_only_export_refuses_every_change(world: tuple[Client, Path]) -> None:
    c, tmp = world
    ro, _ = c.lookup(1, b"ro")
    f, _ = c.lookup(ro, b"file")
    assert errno_of(c.create, ro, b"x") == errno.EROFS
    assert errno_of(c.mkdir, ro, b"x") == errno.EROFS
    assert errno_of(c.call, P.UNLINK, ro, name(b"file")) == errno.EROFS
    assert errno_of(c.rename, ro, b"file", ro, b"f2") == errno.EROFS
    assert errno_of(c.open, f, os.O_RDWR) == errno.EROFS
    assert errno_of(c.open, f, os.O_RDONLY | os.O_TRUNC) == errno.EROFS
    assert errno_of(c.call, P.SETATTR, f, setattr_body(P.FATTR_SIZE)) == errno.EROFS
    fh = c.open(f)
    assert c.read(fh, 0, 100) == b"read only"
    assert errno_of(c.write, fh, 0, b"x") == errno.EROFS
    assert (tmp / "ro" / "file").read_text() == "read only"
    rw, _ = c.lookup(1, b"rw")
    assert errno_of(c.rename, rw, b"hello", ro, b"stolen") == errno.EROFS


def test_rename_across_exports_is_exdev(world: tuple[Client, Path]) -> None:
    c, tmp = world
    (tmp / "rw2").mkdir()
    c.tree.add_export("rw2", dirfd(tmp / "rw2"), True)
    rw, _ = c.lookup(1, b"rw")
    rw2, _ = c.lookup(1, b"rw2")
    assert errno_of(c.rename, rw, b"hello", rw2, b"h") == errno.EXDEV


def test_tables_are_bounded(world: tuple[Client, Path]) -> None:
    c, tmp = world
    for i in range(80):
        (tmp / "rw" / f"f{i}").write_text("x")
    rw, _ = c.lookup(1, b"rw")
    got = []
    with pytest.raises(FuseError) as e:
        for i in range(80):
            got.append(c.lookup(rw, f"f{i}".encode())[0])
    assert e.value.errno == errno.ENFILE and len(c.tree.inodes) == 64
    with pytest.raises(FuseError) as e:
        for _ in range(20):
            c.open(got[0])
    assert e.value.errno == errno.EMFILE and len(c.tree.handles) == 8
    # Forgetting frees room again.
    c.call(P.BATCH_FORGET, 0, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", got[0], 1, got[1], 1))
    assert c.lookup(rw, b"f79")[0] > 0


def test_live_add_and_remove_of_exports(world: tuple[Client, Path]) -> None:
    c, tmp = world
    rw, _ = c.lookup(1, b"rw")
    hello, _ = c.lookup(rw, b"hello")
    fh = c.open(hello)
    dh = c.open(rw, op=P.OPENDIR)
    (tmp / "new").mkdir()
    (tmp / "new" / "n").write_text("n")
    c.tree.add_export("new", dirfd(tmp / "new"), False)
    assert c.readdir(c.open(1, op=P.OPENDIR)) == [b"new", b"ro", b"rw"]
    new, _ = c.lookup(1, b"new")
    assert c.lookup(new, b"n")[0] > 0
    assert c.tree.remove_export("rw")
    # At once: the name is gone, every node and handle under it fails.
    assert errno_of(c.lookup, 1, b"rw") == errno.ENOENT
    assert errno_of(c.read, fh, 0, 10) == errno.EIO
    assert errno_of(c.call, P.GETATTR, hello, bytes(16)) == errno.EIO
    assert errno_of(c.lookup, rw, b"sub") == errno.EIO
    assert errno_of(c.create, rw, b"late") == errno.EIO
    assert errno_of(c.readdir, dh) == errno.EIO
    assert not (tmp / "rw" / "late").exists()
    # Re-adding the same directory is a new export; old nodes stay dead.
    c.tree.add_export("rw", dirfd(tmp / "rw"), True)
    assert errno_of(c.call, P.GETATTR, hello, bytes(16)) == errno.EIO
    rw2, _ = c.lookup(1, b"rw")
    assert rw2 != rw and c.lookup(rw2, b"hello")[0] != hello
    c.release(fh)


def test_unknown_opcodes_and_xattrs_are_enosys(world: tuple[Client, Path]) -> None:
    c, _ = world
    for op in (P.GETXATTR, P.SETXATTR, P.LISTXATTR, P.SYMLINK, P.MKNOD, P.LINK, 99, 4000):
        assert errno_of(c.call, op, 1, b"security.selinux\0") == errno.ENOSYS


def test_forget_gets_no_reply_and_unknown_nodes_are_ignored(world: tuple[Client, Path]) -> None:
    c, _ = world
    assert c.raw(request(P.FORGET, 12345, struct.pack("<Q", 1))) == (0, b"")
    assert c.raw(request(P.FORGET, 1, struct.pack("<Q", 1 << 60))) == (0, b"")
    assert c.lookup(1, b"rw")[0] > 1  # the root survived its forget


def test_a_guest_sync_is_not_a_host_wide_flush(world: tuple[Client, Path]) -> None:
    """SYNCFS answers ENOSYS (the guest kernel then stops sending it): one thread
    must not sit in a flush of the whole host file system. FSYNC works."""
    c, _ = world
    assert errno_of(c.call, P.SYNCFS, 1, bytes(8)) == errno.ENOSYS
    rw, _ = c.lookup(1, b"rw")
    node, fh = c.create(rw, b"synced")
    assert c.call(P.FSYNC, node, struct.pack("<QII", fh, 0, 0)) == b""
