"""The export is a DAG that no name, symlink, race or special file leads out of."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
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

from spectrumd.fileserver.messages import QTSYMLINK, Tmkdir, Trenameat, Tunlinkat
from spectrumd.virtiofs import resolve


@pytest.fixture(params=["openat2", "fallback"])
def resolver(request: pytest.FixtureRequest) -> Iterator[str]:
    old = resolve.use_openat2(request.param == "openat2")
    try:
        yield request.param
    finally:
        resolve.use_openat2(old)


@pytest.fixture
def tree(tmp_path: Path, resolver: str) -> tuple[SessionClient, Path, Path]:
    export = tmp_path / "export"
    outside = tmp_path / "outside"
    export.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    (export / "sub").mkdir()
    (export / "sub" / "secret").write_bytes(b"inside")
    (export / "f").write_bytes(b"file")
    s = session_client(make_table(rw=(str(export), True)))
    s.walk(0, 1, b"rw")
    return s, export, outside


def errno_of(call: object, *args: object) -> int:
    with pytest.raises(NinePError) as e:
        call(*args)  # type: ignore[operator]
    return e.value.errno


BAD_NAMES = [
    (b"..", errno.ENOENT),
    (b".", errno.ENOENT),
    (b"/etc", errno.EINVAL),
    (b"sub/secret", errno.EINVAL),
    (b"../outside", errno.EINVAL),
    (b"f\0x", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"a" * 4096, errno.ENAMETOOLONG),
    (b"a" * 256, errno.ENAMETOOLONG),
]


@pytest.mark.parametrize(("name", "code"), BAD_NAMES, ids=lambda v: repr(v)[:20])
def test_bad_names_are_refused_everywhere(
    tree: tuple[SessionClient, Path, Path], name: bytes, code: int
) -> None:
    s, export, outside = tree
    assert errno_of(s.walk, 1, 2, name) == code
    assert errno_of(s.walk, 0, 2, name) == code  # from the synthetic root too
    assert errno_of(s.lcreate, 1, name) in (code, errno.EINVAL)
    assert errno_of(s.rpc, Tmkdir, 1, name, 0o755, 0) in (code, errno.EINVAL)
    assert errno_of(s.rpc, Tunlinkat, 1, name, 0) in (code, errno.EINVAL)
    assert errno_of(s.rpc, Trenameat, 1, b"f", 1, name) in (code, errno.EINVAL)
    assert (outside / "secret").read_bytes() == b"SECRET"
    assert sorted(os.listdir(export)) == ["f", "sub"]


def test_walking_up_from_a_subdirectory_fails(tree: tuple[SessionClient, Path, Path]) -> None:
    s, _, _ = tree
    assert errno_of(s.walk, 1, 2, b"..") == errno.ENOENT
    reply = s.walk(1, 2, b"sub", b"..")
    assert len(reply.qids) == 1  # stops at "sub"; newfid not made
    assert 2 not in s.session.fids


@pytest.mark.parametrize("target", ["/etc", "sub", "../outside", "/proc/self/root"])
def test_symlinks_are_never_followed(tree: tuple[SessionClient, Path, Path], target: str) -> None:
    s, export, _ = tree
    os.symlink(target, export / "link")
    reply = s.walk(1, 2, b"link")
    assert reply.qids[0].type == QTSYMLINK
    assert errno_of(s.lopen, 2) == errno.ELOOP
    assert errno_of(s.lcreate, 2, b"x") == errno.ENOTDIR
    assert errno_of(s.rpc, Tmkdir, 2, b"x", 0o755, 0) == errno.ENOTDIR
    # Walking through it stops at the link.
    assert len(s.walk(1, 3, b"link", b"secret").qids) == 1
    assert len(s.walk(1, 3, b"link", b"passwd").qids) == 1
    assert 3 not in s.session.fids
    # Creating over it does not write through it.
    assert errno_of(s.lcreate, 1, b"link") == errno.EEXIST


def test_symlinked_export_child_of_a_fid_after_swap(tree: tuple[SessionClient, Path, Path]) -> None:
    """A directory swapped for a symlink between walk steps is not followed."""
    s, export, outside = tree
    s.walk(1, 2, b"sub")  # the guest holds sub ...
    os.rename(export / "sub", export / "sub.moved")  # ... and the host swaps it
    os.symlink(outside, export / "sub")
    # The held fid still names the original directory, wherever it went.
    s.walk(2, 3, b"secret")
    s.lopen(3)
    assert s.read(3) == b"inside"
    s.lcreate(2, b"created")
    assert (export / "sub.moved" / "created").exists()
    assert not (outside / "created").exists()
    # A fresh walk meets the symlink and stops there.
    assert len(s.walk(1, 4, b"sub", b"secret").qids) == 1


def test_racing_swaps_never_reach_outside(tree: tuple[SessionClient, Path, Path]) -> None:
    s, export, outside = tree
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            try:
                os.rename(export / "sub", export / "sub.tmp")
                os.symlink(outside, export / "sub")
                os.unlink(export / "sub")
                os.rename(export / "sub.tmp", export / "sub")
            except OSError:
                pass

    t = threading.Thread(target=swapper)
    t.start()
    seen: set[bytes] = set()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                s.walk(1, 2, b"sub", b"secret")
                s.lopen(2)
                seen.add(s.read(2))
            except NinePError:
                pass
            finally:
                if 2 in s.session.fids:
                    s.clunk(2)
    finally:
        stop.set()
        t.join()
    assert b"SECRET" not in seen


def test_hard_link_to_outside_file_is_reachable_by_design(
    tree: tuple[SessionClient, Path, Path],
) -> None:
    """A hard link made on the host *is* the file, and no name check can tell;
    the server only refuses to make new ones (Tlink gives EPERM)."""
    s, export, outside = tree
    os.link(outside / "secret", export / "hard")
    s.walk(1, 2, b"hard")
    s.lopen(2)
    assert s.read(2) == b"SECRET"


def test_fifo_is_never_opened_and_never_hangs(tree: tuple[SessionClient, Path, Path]) -> None:
    s, export, _ = tree
    os.mkfifo(export / "fifo")
    s.walk(1, 2, b"fifo")
    assert stat.S_ISFIFO(s.getattr(2).mode)  # visible, stat-able
    start = time.monotonic()
    for flags in (O_RDONLY, O_WRONLY, O_RDWR, O_RDONLY | os.O_NONBLOCK):
        assert errno_of(s.lopen, 2, flags) == errno.EPERM
    assert errno_of(s.lcreate, 1, b"fifo") == errno.EEXIST
    assert time.monotonic() - start < 1
    # Nobody has it open for reading: a non-blocking writer finds no reader.
    with pytest.raises(OSError) as e:
        os.open(export / "fifo", os.O_WRONLY | os.O_NONBLOCK)
    assert e.value.errno == errno.ENXIO


def test_fifo_swapped_in_after_walk_is_not_opened(tree: tuple[SessionClient, Path, Path]) -> None:
    s, export, _ = tree
    s.walk(1, 2, b"f")
    os.mkfifo(export / "fifo")
    os.rename(export / "fifo", export / "f")
    s.lopen(2)  # opens the walked (now unlinked) regular file, not the FIFO
    assert s.read(2) == b"file"


def test_socket_is_never_opened(tree: tuple[SessionClient, Path, Path]) -> None:
    s, export, _ = tree
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(export / "sock"))
        s.walk(1, 2, b"sock")
        assert errno_of(s.lopen, 2) == errno.EPERM


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_device_node_is_never_opened(tree: tuple[SessionClient, Path, Path]) -> None:
    s, export, _ = tree
    try:
        os.mknod(export / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    except OSError as e:
        pytest.skip(f"mknod not allowed here: {e}")
    s.walk(1, 2, b"zero")
    assert stat.S_ISCHR(s.getattr(2).mode)
    assert errno_of(s.lopen, 2) == errno.EPERM
    s.rpc(Tunlinkat, 1, b"zero", 0)  # removing one is an ordinary change
    assert not (export / "zero").exists()


def test_cross_export_rename_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    s = session_client(make_table(a=(str(tmp_path / "a"), True), b=(str(tmp_path / "b"), True)))
    s.walk(0, 1, b"a")
    s.walk(0, 2, b"b")
    assert errno_of(s.rpc, Trenameat, 1, b"f", 2, b"f") == errno.EXDEV
    assert (tmp_path / "a" / "f").exists()


def test_open_beneath_refuses_what_the_kernel_would_resolve(tmp_path: Path, resolver: str) -> None:
    os.symlink("/etc", tmp_path / "link")
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        for name, code in ((b"..", errno.ENOENT), (b"../d", errno.EINVAL), (b"/etc", errno.EINVAL)):
            with pytest.raises(OSError) as e:
                resolve.open_beneath(fd, name, os.O_PATH)
            assert e.value.errno == code
    finally:
        os.close(fd)
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            resolve.open_beneath(top, b"link", os.O_RDONLY)
        assert e.value.errno == errno.ELOOP
        link = resolve.open_beneath(top, b"link", os.O_PATH)
        assert stat.S_ISLNK(os.fstat(link).st_mode)  # the link itself, not /etc
        os.close(link)
    finally:
        os.close(top)
