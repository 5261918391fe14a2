"""The guest as attacker at the export boundary: names, symlinks, races.

The export is a DAG that no name, symlink, race or special file leads out
of. These are the attacks the 9P server's traversal tests played, sent as
real FUSE requests (``fusereq.Client``) to the ops layer over real host
directories, with the host side racing where a real host could. Each test
asserts what the guest observes (errno, bytes, listing) and that nothing
outside the export changed: every file and directory next to it keeps its
type, mode, link count, size, times and content.

Every test runs with openat2 and with its fallback. Special files (FIFOs,
sockets, devices) are in test_special_files.py.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spectrumd.virtiofs import protocol as P
from spectrumd.virtiofs.tree import Tree

from .fusereq import Client, FuseError, name, request, setattr_body
from .traversal_world import (
    MODE,
    NLINK,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SETATTRS,
    SIZE,
    World,
    dirfd,
    errno_of,
    exchange,
    forget,
    getattr_mode,
    listings,
    names_in,
    read_all,
    read_dir,
    rename1,
    snapshot,
)

pytestmark = pytest.mark.timeout(60)


# -- names --

BAD_NAMES = [
    (b"..", errno.ENOENT),
    (b".", errno.ENOENT),
    (b"/etc", errno.EINVAL),
    (b"sub/secret", errno.EINVAL),
    (b"../outside", errno.EINVAL),
    (b"../outside/secret", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"a" * 256, errno.ENAMETOOLONG),
    (b"a" * 4096, errno.ENAMETOOLONG),
]


@pytest.mark.parametrize(("bad", "code"), BAD_NAMES, ids=lambda v: repr(v)[:20])
def test_bad_names_are_refused_in_every_op(w: World, bad: bytes, code: int) -> None:
    c = w.c
    sub, _ = c.lookup(w.rw, b"sub")
    inside = snapshot(w.export)
    nodes = set(c.tree.inodes)
    for parent, plain in ((w.rw, b"f"), (sub, b"secret")):
        assert errno_of(c.lookup, parent, bad) == code
        for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_CREAT | os.O_EXCL):
            assert errno_of(c.create, parent, bad, flags=flags) in (code, errno.EINVAL)
        assert errno_of(c.mkdir, parent, bad) in (code, errno.EINVAL)
        assert errno_of(c.call, P.UNLINK, parent, name(bad)) in (code, errno.EINVAL)
        assert errno_of(c.call, P.RMDIR, parent, name(bad)) in (code, errno.EINVAL)
        for newdir in (parent, w.rw):
            for flags in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
                assert errno_of(c.rename, parent, bad, newdir, b"x", flags) in (code, errno.EINVAL)
                assert errno_of(c.rename, parent, plain, newdir, bad, flags) in (
                    code,
                    errno.EINVAL,
                )
            assert errno_of(rename1, c, parent, bad, newdir, b"x") in (code, errno.EINVAL)
            assert errno_of(rename1, c, parent, plain, newdir, bad) in (code, errno.EINVAL)
    assert set(c.tree.inodes) == nodes  # no node was made for any of them
    assert snapshot(w.export) == inside
    w.assert_outside_untouched()


@pytest.mark.parametrize(("bad", "code"), BAD_NAMES, ids=lambda v: repr(v)[:20])
def test_bad_names_are_refused_at_the_root_too(w: World, bad: bytes, code: int) -> None:
    """The synthetic root answers a bad name as an export's directory does."""
    c = w.c
    assert errno_of(c.lookup, 1, bad) == code
    refused = (code, errno.EINVAL, errno.EROFS)  # the root is read-only whatever the name
    assert errno_of(c.create, 1, bad) in refused
    assert errno_of(c.mkdir, 1, bad) in refused
    assert errno_of(c.call, P.UNLINK, 1, name(bad)) in refused
    assert errno_of(c.call, P.RMDIR, 1, name(bad)) in refused
    assert errno_of(c.rename, 1, b"rw", 1, bad) in refused
    assert errno_of(c.rename, 1, bad, w.rw, b"x") in refused
    assert names_in(c, 1) == [b"rw"]
    w.assert_outside_untouched()


def test_a_name_ends_at_its_first_nul_in_every_op(w: World) -> None:
    """A FUSE name is NUL-terminated: what follows the NUL never reaches a lookup."""
    c = w.c
    tail = b"\0/../outside/secret\0"
    err, out = c.raw(request(P.LOOKUP, w.rw, b"f" + tail))
    assert err == 0 and struct.unpack_from("<Q", out)[0] == c.lookup(w.rw, b"f")[0]
    create = struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o644, 0, 0)
    assert c.raw(request(P.CREATE, w.rw, create + b"new" + tail))[0] == 0
    assert c.raw(request(P.MKDIR, w.rw, struct.pack("<II", 0o755, 0) + b"dir" + tail))[0] == 0
    assert sorted(os.listdir(w.export)) == ["dir", "f", "new", "sub"]
    assert c.raw(request(P.UNLINK, w.rw, b"new" + tail))[0] == 0
    assert c.raw(request(P.RMDIR, w.rw, b"dir" + tail))[0] == 0
    rename = struct.pack("<QII", w.rw, 0, 0) + b"f\0g"
    assert c.raw(request(P.RENAME2, w.rw, rename + tail))[0] == 0
    assert sorted(os.listdir(w.export)) == ["g", "sub"]
    # A name with no NUL at all is not a name.
    assert c.raw(request(P.LOOKUP, w.rw, b"g"))[0] == errno.EINVAL
    assert c.raw(request(P.UNLINK, w.rw, b"g"))[0] == errno.EINVAL
    assert (w.export / "g").read_bytes() == b"file"
    w.assert_outside_untouched()


def test_walking_up_from_a_subdirectory_fails(w: World) -> None:
    c = w.c
    sub, _ = c.lookup(w.rw, b"sub")
    deep, _ = c.lookup(sub, b"deep")
    nodes = set(c.tree.inodes)
    for parent in (w.rw, sub, deep):
        for up in (b"..", b"."):
            assert errno_of(c.lookup, parent, up) == errno.ENOENT
    assert set(c.tree.inodes) == nodes  # no node for a parent, nor a second one for itself
    # No listing offers a way up either (READDIRPLUS would hand out its node).
    assert names_in(c, w.rw) == [b"f", b"sub"]
    assert names_in(c, sub) == [b"deep", b"secret"]
    assert names_in(c, deep) == []
    w.assert_outside_untouched()


# -- symlinks --

SYMLINK_TARGETS = {
    "absolute-outside-file": "{outside}/secret",
    "absolute-outside-dir": "{outside}",
    "relative-escaping": "../outside/secret",
    "inside-file": "f",
    "inside-dir": "sub",
    "dangling-into-outside": "../outside/created",
    "dangling": "nowhere",
    "proc-self-root": "/proc/self/root",
}


@pytest.mark.parametrize("target", SYMLINK_TARGETS.values(), ids=SYMLINK_TARGETS.keys())
def test_symlinks_are_never_followed(w: World, target: str) -> None:
    c, rw = w.c, w.rw
    target = target.format(outside=w.outside)
    os.symlink(target, w.export / "link")
    inside = snapshot(w.export)
    # Shown as what it is, in LOOKUP, GETATTR, READDIRPLUS and READLINK.
    link, attr = c.lookup(rw, b"link")
    assert stat.S_ISLNK(attr[MODE]) and attr[SIZE] == len(os.fsencode(target))
    assert stat.S_ISLNK(getattr_mode(c, link))
    assert {n: stat.S_IFMT(m) for n, _, m in read_dir(c, rw, plus=True)}[b"link"] == stat.S_IFLNK
    assert c.call(P.READLINK, link) == os.fsencode(target)
    # Never opened ...
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC,
                  os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_NONBLOCK):  # fmt: skip
        assert errno_of(c.open, link, flags) == errno.ELOOP
    assert errno_of(c.open, link, op=P.OPENDIR) == errno.ELOOP
    # ... nor walked through ...
    for n in (b"secret", b"f", b"deep", b"x"):
        assert errno_of(c.lookup, link, n) == errno.ENOTDIR
    assert errno_of(c.create, link, b"x") == errno.ENOTDIR
    assert errno_of(c.mkdir, link, b"x") == errno.ENOTDIR
    assert errno_of(c.call, P.UNLINK, link, name(b"secret")) == errno.ENOTDIR
    assert errno_of(c.call, P.RMDIR, link, name(b"deep")) == errno.ENOTDIR
    assert errno_of(c.rename, link, b"secret", rw, b"stolen") == errno.ENOTDIR
    assert errno_of(c.rename, rw, b"f", link, b"x") == errno.ENOTDIR
    # ... nor created over, written through, or changed.
    for flags in (os.O_WRONLY, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert errno_of(c.create, rw, b"link", flags=flags) == errno.ELOOP
    assert errno_of(c.create, rw, b"link", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL) == (
        errno.EEXIST
    )
    assert errno_of(c.mkdir, rw, b"link") == errno.EEXIST
    assert errno_of(c.call, P.RMDIR, rw, name(b"link")) == errno.ENOTDIR
    for body in SETATTRS.values():
        assert errno_of(c.call, P.SETATTR, link, body) == errno.EPERM
    assert errno_of(c.rename, rw, b"f", rw, b"link", RENAME_NOREPLACE) == errno.EEXIST
    assert snapshot(w.export) == inside
    w.assert_outside_untouched()
    # RENAME onto it replaces the link itself, never what it points at.
    sub_before = snapshot(w.export / "sub")
    c.rename(rw, b"f", rw, b"link")
    assert not (w.export / "link").is_symlink()
    assert (w.export / "link").read_bytes() == b"file"
    assert snapshot(w.export / "sub") == sub_before
    w.assert_outside_untouched()


def test_a_held_directory_is_not_followed_after_a_symlink_swap(w: World) -> None:
    """The guest holds sub; the host moves it away and plants a symlink out in its place."""
    c = w.c
    sub, _ = c.lookup(w.rw, b"sub")
    moved = w.export / "sub.moved"
    os.rename(w.export / "sub", moved)
    os.symlink(w.outside, w.export / "sub")
    # The held node still names the original directory, wherever it went.
    secret, _ = c.lookup(sub, b"secret")
    assert read_all(c, secret) == b"inside"
    assert errno_of(c.lookup, sub, b"only-outside") == errno.ENOENT
    assert names_in(c, sub) == [b"deep", b"secret"]
    _, fh = c.create(sub, b"created")
    assert c.write(fh, 0, b"new") == 3
    c.release(fh)
    c.mkdir(sub, b"made")
    c.rename(sub, b"made", sub, b"renamed")
    c.call(P.SETATTR, sub, setattr_body(P.FATTR_MODE, mode=0o700))
    assert (moved / "created").read_bytes() == b"new"
    assert (moved / "renamed").is_dir()
    assert stat.S_IMODE(moved.stat().st_mode) == 0o700
    w.assert_outside_untouched()
    # A fresh lookup meets the symlink and stops there.
    fresh, attr = c.lookup(w.rw, b"sub")
    assert fresh != sub and stat.S_ISLNK(attr[MODE])
    assert errno_of(c.lookup, fresh, b"secret") == errno.ENOTDIR
    assert errno_of(c.create, fresh, b"x") == errno.ENOTDIR
    assert errno_of(c.open, fresh, op=P.OPENDIR) == errno.ELOOP
    w.assert_outside_untouched()


def test_a_held_file_is_not_followed_after_a_symlink_swap(w: World) -> None:
    c = w.c
    f, _ = c.lookup(w.rw, b"f")
    os.rename(w.export / "f", w.export / "f.moved")
    os.symlink(w.outside / "secret", w.export / "f")
    assert read_all(c, f) == b"file"
    fh = c.open(f, os.O_RDWR | os.O_TRUNC)
    assert c.write(fh, 0, b"changed") == 7
    c.release(fh)
    body = setattr_body(P.FATTR_SIZE | P.FATTR_MODE | P.FATTR_MTIME, size=3, mode=0o100600)
    c.call(P.SETATTR, f, body)
    st = (w.export / "f.moved").stat()
    assert (w.export / "f.moved").read_bytes() == b"cha"
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 0
    w.assert_outside_untouched()
    fresh, attr = c.lookup(w.rw, b"f")
    assert fresh != f and stat.S_ISLNK(attr[MODE])
    assert errno_of(c.open, fresh, os.O_RDWR) == errno.ELOOP
    w.assert_outside_untouched()


def test_an_export_root_swapped_for_a_symlink_keeps_its_directory(w: World) -> None:
    """The export is the directory the daemon opened, not the path it was opened by."""
    c = w.c
    moved = w.tmp / "export.moved"
    os.rename(w.export, moved)
    os.symlink(w.outside, w.export)
    w.inside.add(moved)
    w.mark()
    assert c.lookup(1, b"rw")[0] == w.rw
    for n in (b"secret", b"only-outside"):
        assert errno_of(c.lookup, w.rw, n) == errno.ENOENT
    assert names_in(c, w.rw) == [b"f", b"sub"]
    _, fh = c.create(w.rw, b"created")
    c.release(fh)
    assert (moved / "created").exists()
    w.assert_outside_untouched()


def test_racing_swaps_never_reach_outside(w: World) -> None:
    """The host swaps sub and f for symlinks out, thousands of times, while the guest
    looks up, reads and lists: never a byte of the outside file, never an outside name."""
    c, rw = w.c, w.rw
    sub, sub_link = w.export / "sub", w.export / "sub.link"
    f, f_link = w.export / "f", w.export / "f.link"
    os.symlink(w.outside, sub_link)
    os.symlink(w.outside / "secret", f_link)
    held, _ = c.lookup(rw, b"sub")
    stop = threading.Event()
    swaps = [0]
    failures: list[BaseException] = []

    def swapper() -> None:
        try:
            while not stop.is_set():
                # Atomic: the name is always there, a directory or a symlink out.
                exchange(sub, sub_link)
                exchange(f, f_link)
                exchange(sub, sub_link)
                exchange(f, f_link)
                # Not atomic: moved away, a symlink planted, then put back.
                os.rename(sub, w.export / "sub.tmp")
                os.symlink(w.outside, sub)
                os.unlink(sub)
                os.rename(w.export / "sub.tmp", sub)
                swaps[0] += 1
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    data: set[bytes] = set()
    names: set[bytes] = set()
    kinds: set[int] = set()

    def attempt(fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except FuseError as e:
            # Absent between the moves, a symlink met as a parent or opened.
            assert e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP), e
            return None

    def through(node: int, n: bytes) -> None:
        """Look *n* up below *node*, read it, and forget it."""
        child = attempt(c.lookup, node, n)
        if isinstance(child, tuple):
            got = attempt(read_all, c, child[0])
            if isinstance(got, bytes):
                data.add(got)
            forget(c, child[0])

    def list_into(node: int) -> None:
        # Two listings taken at different moments of the race: they may differ.
        listed = attempt(listings, c, node)
        if isinstance(listed, tuple):
            names.update(*listed)

    def guest_round() -> None:
        through(held, b"secret")
        list_into(held)
        fresh = attempt(c.lookup, rw, b"sub")
        if isinstance(fresh, tuple):
            kinds.add(stat.S_IFMT(fresh[1][MODE]))
            through(fresh[0], b"secret")
            list_into(fresh[0])
            forget(c, fresh[0])
        through(rw, b"f")
        list_into(rw)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the two threads finely
    t = threading.Thread(target=swapper, name="swapper")
    t.start()
    rounds = 0
    try:
        deadline = time.monotonic() + 30
        while (swaps[0] < 2000 or rounds < 2000) and time.monotonic() < deadline:
            if failures:
                break
            guest_round()
            rounds += 1
    finally:
        stop.set()
        t.join(10)
        sys.setswitchinterval(interval)
    assert not failures
    assert swaps[0] >= 2000 and rounds >= 2000, (swaps[0], rounds)  # the race really ran
    assert kinds == {stat.S_IFDIR, stat.S_IFLNK}  # the guest met both
    assert b"SECRET" not in data
    assert b"only-outside" not in names
    assert data == {b"inside", b"file"}  # and the guest did read both, all along
    w.assert_outside_untouched()


# -- hard links --


def test_hard_link_to_an_outside_file_is_reachable_by_design(w: World) -> None:
    """A hard link made on the host *is* the file, and no name check can tell;
    the server only refuses to make new ones (LINK is not implemented).

    This is the known limit: whoever can write the exported directory on the
    host can hand the guest any file on the same file system."""
    c = w.c
    os.link(w.outside / "secret", w.export / "hard")
    w.mark()
    hard, attr = c.lookup(w.rw, b"hard")
    assert attr[NLINK] == 2  # the guest can see that it has another name
    assert read_all(c, hard) == b"SECRET"
    link_in = struct.pack("<Q", hard) + name(b"another")
    assert errno_of(c.call, P.LINK, w.rw, link_in) == errno.ENOSYS
    assert not (w.export / "another").exists()
    w.assert_outside_untouched()


# -- across exports --


def test_rename_across_exports_is_refused(tmp_path: Path, resolver: str) -> None:
    """Even between two exports of one file system, or of one directory, or nested."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    (a / "f").write_bytes(b"a")
    (a / "sub" / "g").write_bytes(b"g")
    (b / "keep").write_bytes(b"b")
    c = Client(Tree())
    c.tree.add_export("a", dirfd(a), True)
    c.tree.add_export("b", dirfd(b), True)
    c.tree.add_export("nested", dirfd(a / "sub"), True)
    c.tree.add_export("again", dirfd(a), True)
    try:
        c.init()
        ea, eb, en, eg = (c.lookup(1, n)[0] for n in (b"a", b"b", b"nested", b"again"))
        asub, _ = c.lookup(ea, b"sub")
        before = snapshot(tmp_path)
        for src, old, dst, new in (
            (ea, b"f", eb, b"f"), (eb, b"keep", ea, b"keep"), (ea, b"f", en, b"f"),
            (en, b"g", ea, b"g"), (asub, b"g", en, b"g2"), (ea, b"f", eg, b"f2"),
            (asub, b"g", eb, b"g"),
        ):  # fmt: skip
            for flags in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
                assert errno_of(c.rename, src, old, dst, new, flags) == errno.EXDEV
            assert errno_of(rename1, c, src, old, dst, new) == errno.EXDEV
        # Into or out of the synthetic root: it takes no changes.
        assert errno_of(c.rename, ea, b"f", 1, b"f") == errno.EROFS
        assert errno_of(c.rename, 1, b"a", ea, b"x") == errno.EROFS
        assert snapshot(tmp_path) == before
        c.rename(ea, b"f", asub, b"f")  # within one export it is an ordinary rename
        assert (a / "sub" / "f").read_bytes() == b"a"
    finally:
        c.tree.close()
