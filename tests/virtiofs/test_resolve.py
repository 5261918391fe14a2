"""open_beneath: one checked name below a directory fd, and nothing the kernel would follow.

Every test runs twice, with openat2 and with its fallback (openat with
O_NOFOLLOW and an st_dev comparison), since a host without openat2 must be
as safe as one with it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from spectrumd.virtiofs import resolve

from .traversal_world import dirfd

pytestmark = pytest.mark.timeout(30)


def errno_of(dir_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
    with pytest.raises(OSError) as e:
        os.close(resolve.open_beneath(dir_fd, name, flags, mode))
    return e.value.errno or 0


NOT_ONE_COMPONENT = [
    (b"..", errno.ENOENT),
    (b".", errno.ENOENT),
    (b"../d", errno.EINVAL),
    (b"/etc", errno.EINVAL),
    (b"d/x", errno.EINVAL),
    (b"x\0y", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"a" * 256, errno.ENAMETOOLONG),
    (b"a" * 4096, errno.ENAMETOOLONG),
]


@pytest.mark.parametrize(("name", "code"), NOT_ONE_COMPONENT, ids=lambda v: repr(v)[:16])
def test_check_name(name: bytes, code: int) -> None:
    assert resolve.check_name(name) == code


def test_check_name_accepts_one_component() -> None:
    for name in (b"a", b"...", b"a" * 255, b".hidden", "ü".encode(), b"\xff", b"a\\b"):
        assert resolve.check_name(name) is None


@pytest.mark.parametrize(("name", "code"), NOT_ONE_COMPONENT, ids=lambda v: repr(v)[:16])
def test_open_beneath_refuses_what_is_not_one_component(
    tmp_path: Path, resolver: str, name: bytes, code: int
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"x")
    fd = dirfd(tmp_path / "d")
    try:
        for flags in (os.O_PATH, os.O_RDONLY, os.O_RDWR | os.O_CREAT):
            assert errno_of(fd, name, flags, 0o644 if flags & os.O_CREAT else 0) == code
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert os.listdir(tmp_path / "d") == ["x"]


def test_open_beneath_never_follows_a_trailing_symlink(tmp_path: Path, resolver: str) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"f")
    os.symlink("/etc", tmp_path / "abs")
    os.symlink("d", tmp_path / "todir")
    os.symlink("f", tmp_path / "tofile")
    top = dirfd(tmp_path)
    try:
        for name in (b"abs", b"todir", b"tofile"):
            for flags in (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_RDWR):
                assert errno_of(top, name, flags) == errno.ELOOP
            assert errno_of(top, name, os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
            # O_PATH gives the link itself, which is how a lookup shows it.
            link = resolve.open_beneath(top, name, os.O_PATH)
            try:
                assert stat.S_ISLNK(os.fstat(link).st_mode)
            finally:
                os.close(link)
    finally:
        os.close(top)
    assert (tmp_path / "f").read_bytes() == b"f"


def test_open_beneath_never_creates_through_a_dangling_symlink(
    tmp_path: Path, resolver: str
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink("../outside/new", tmp_path / "d" / "rel")
    os.symlink(tmp_path / "outside" / "new", tmp_path / "d" / "abs")
    fd = dirfd(tmp_path / "d")
    try:
        for name in (b"rel", b"abs"):
            assert errno_of(fd, name, os.O_WRONLY | os.O_CREAT, 0o644) == errno.ELOOP
            assert errno_of(fd, name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) == errno.ELOOP
            assert errno_of(fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) == (errno.EEXIST)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path / "outside") == []


def test_open_beneath_never_follows_a_magic_link(tmp_path: Path, resolver: str) -> None:
    """/proc/self/fd/N names any file we hold open, wherever it is."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    held = os.open(victim, os.O_RDONLY | os.O_CLOEXEC)
    proc_fds = dirfd("/proc/self/fd")
    try:
        for flags in (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(proc_fds, str(held).encode(), flags) == errno.ELOOP
        link = resolve.open_beneath(proc_fds, str(held).encode(), os.O_PATH)
        try:
            assert stat.S_ISLNK(os.fstat(link).st_mode)
        finally:
            os.close(link)
    finally:
        os.close(proc_fds)
        os.close(held)
    assert victim.read_bytes() == b"victim"


def test_open_beneath_never_crosses_into_another_mount(resolver: str) -> None:
    if os.stat("/proc").st_dev == os.stat("/").st_dev:
        pytest.skip("/proc is not a separate mount here")
    root = dirfd("/")
    try:
        for flags in (os.O_PATH, os.O_RDONLY | os.O_DIRECTORY):
            assert errno_of(root, b"proc", flags) == errno.EXDEV
    finally:
        os.close(root)


def test_open_beneath_opens_one_plain_name(tmp_path: Path, resolver: str) -> None:
    (tmp_path / "f").write_bytes(b"content")
    top = dirfd(tmp_path)
    try:
        fd = resolve.open_beneath(top, b"f", os.O_RDONLY)
        try:
            assert os.read(fd, 100) == b"content"
            assert os.get_inheritable(fd) is False  # O_CLOEXEC is always added
        finally:
            os.close(fd)
        fd = resolve.open_beneath(top, b"new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    finally:
        os.close(top)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600
