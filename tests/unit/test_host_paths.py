"""openat2 resolution of granted paths: no symlink in any component, against the real kernel."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.errors import InvalidArgument
from spectrumd.host.paths import (
    MAX_PATH,
    RESOLVE_NO_MAGICLINKS,
    check_canonical,
    open_directory,
    openat2,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "sublink").symlink_to("sub")
    return tmp_path


@contextlib.contextmanager
def root_symlink() -> Iterator[str]:
    """A symlink as the first component: merged-/usr's /bin, or one made for the test."""
    if os.path.islink("/bin") and os.path.isdir("/bin/"):
        yield "/bin"
        return
    link = f"/spectrumd-test-link-{os.getpid()}"
    os.symlink("/usr", link)
    try:
        yield link
    finally:
        os.unlink(link)


def refusal(path: str) -> str:
    with pytest.raises(InvalidArgument) as e:
        open_directory(path)
    return e.value.message


def test_a_plain_directory_is_held_as_an_o_path_fd(tree: Path) -> None:
    d = open_directory(str(tree / "real" / "sub"))
    try:
        st = os.fstat(d.fd)
        assert stat.S_ISDIR(st.st_mode)
        by_path = os.stat(tree / "real" / "sub")
        assert (st.st_dev, st.st_ino) == (d.dev, d.ino) == (by_path.st_dev, by_path.st_ino)
        assert not os.get_inheritable(d.fd), "the fd is close-on-exec"
        with pytest.raises(OSError):  # O_PATH: no reading through it
            os.read(d.fd, 1)
        assert d.still_named()
    finally:
        d.close()
    assert d.closed and not d.still_named()
    assert open_directory("/").path == "/"


def test_a_symlink_in_the_first_component_is_refused() -> None:
    with root_symlink() as link:
        assert f'component "{link}" is a symbolic link' in refusal(link)
        assert f'component "{link}" is a symbolic link' in refusal(link + "/x/y")
        assert os.path.isdir(link + "/")  # a following open would have taken it


def test_a_symlink_in_a_middle_component_is_refused_naming_it(tree: Path) -> None:
    msg = refusal(str(tree / "link" / "sub"))
    assert f'component "{tree / "link"}" is a symbolic link' in msg
    # What a follow-symlinks open would have given: the directory behind it.
    assert (tree / "link" / "sub").is_dir()


def test_a_symlink_as_the_last_component_is_refused(tree: Path) -> None:
    msg = refusal(str(tree / "real" / "sublink"))
    assert f'component "{tree / "real" / "sublink"}" is a symbolic link' in msg


def test_magic_links_are_refused() -> None:
    # /proc/self is itself a symlink; /proc/PID/root is a magic link to a root.
    assert 'component "/proc/self" is a symbolic link' in refusal("/proc/self/root/etc")
    pid = os.getpid()
    assert f'component "/proc/{pid}/root" is a symbolic link' in refusal(f"/proc/{pid}/root/etc")
    # The magic-link flag alone refuses it too (the kernel, not our lstat, decides).
    with pytest.raises(OSError) as e:
        openat2(-100, f"/proc/{pid}/root/etc", os.O_PATH | os.O_DIRECTORY, RESOLVE_NO_MAGICLINKS)
    assert e.value.errno == 40  # ELOOP
    fd = openat2(-100, f"/proc/{pid}/root/etc", os.O_PATH | os.O_DIRECTORY, 0)
    os.close(fd)  # ... which an unrestricted walk follows


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("relative/dir", "not an absolute path"),
        ("", "not an absolute path"),
        ("/tmp/../etc", 'component ".."'),
        ("/tmp/./x", 'component "."'),
        ("/tmp//x", "empty component"),
        ("/tmp/", "empty component"),
        ("/tmp/\0/x", "NUL"),
        ("/" + "a" * 4096, "4097 bytes long"),
        ("/" + "a" * 4095, "4096 bytes long"),
    ],
)
def test_non_canonical_paths_are_refused_before_the_kernel_sees_them(path: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        check_canonical(path)
    assert text in refusal(path)


def test_the_longest_path_reaches_the_kernel() -> None:
    path = "/" + "/".join(["b" * 200] * 21)
    path = path[:MAX_PATH]
    assert len(path.encode()) == MAX_PATH
    assert check_canonical(path) == path
    assert "does not exist" in refusal(path)


def test_a_file_or_a_missing_directory_is_refused_naming_the_component(tree: Path) -> None:
    file = tree / "real" / "file"
    assert f'component "{file}" is not a directory' in refusal(str(file))
    assert f'component "{file}" is not a directory' in refusal(str(file / "x"))
    assert f'component "{tree / "nope"}" does not exist' in refusal(str(tree / "nope" / "x"))


def test_a_held_directory_notices_its_path_swapped_for_a_symlink(tree: Path) -> None:
    d = open_directory(str(tree / "real" / "sub"))
    try:
        (tree / "real" / "sub").rename(tree / "moved")
        (tree / "real" / "sub").symlink_to(tree / "moved")
        assert not d.still_named()
        # The held fd still names the directory that was granted, wherever it went.
        assert os.fstat(d.fd).st_ino == os.stat(tree / "moved").st_ino
        (tree / "real" / "sub").unlink()
        (tree / "real" / "sub").mkdir()  # same name, another inode
        assert not d.still_named()
    finally:
        d.close()
