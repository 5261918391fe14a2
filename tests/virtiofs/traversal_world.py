"""The world of the traversal tests: a real export tree, its outside, a FUSE client.

Shared by test_traversal.py and test_special_files.py.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spectrumd.virtiofs import protocol as P
from spectrumd.virtiofs import resolve
from spectrumd.virtiofs.tree import Tree

from .fusereq import Client, FuseError, name, setattr_body

pytestmark = pytest.mark.timeout(60)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
# Fields of a fuse_attr, as Client.lookup returns it.
SIZE, MODE, NLINK, RDEV = 1, 9, 10, 13

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100

Snapshot = dict[str, tuple[object, ...]]


# -- the world --


@pytest.fixture(params=["openat2", "fallback"])
def resolver(request: pytest.FixtureRequest) -> Iterator[str]:
    want = request.param == "openat2"
    old = resolve.use_openat2(want)
    if want and not resolve.use_openat2(want):  # returns what the first call set
        resolve.use_openat2(old)
        pytest.skip("openat2 is not available here")
    try:
        yield request.param
    finally:
        resolve.use_openat2(old)


def dirfd(p: Path | str) -> int:
    return os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def snapshot(top: Path, skip: frozenset[Path] = frozenset()) -> Snapshot:
    """Everything a change would show in, for *top* and all below it but *skip*."""
    out: Snapshot = {}

    def visit(p: Path) -> None:
        st = p.lstat()
        body: object = None
        if stat.S_ISLNK(st.st_mode):
            body = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            body = p.read_bytes()
        out[str(p.relative_to(top))] = (
            st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns, body
        )  # fmt: skip
        if stat.S_ISDIR(st.st_mode):
            for child in sorted(p.iterdir()):
                if child not in skip:
                    visit(child)

    visit(top)
    return out


@dataclass
class World:
    """One read-write export "rw" of ``tmp/export``, next to ``tmp/outside``.

    ``tmp/export``: ``f`` ("file"), ``sub/secret`` ("inside"), ``sub/deep/``.
    ``tmp/outside``: ``secret`` ("SECRET"), ``only-outside``: the victims.
    """

    c: Client
    tmp: Path
    export: Path
    outside: Path
    rw: int  # the export's nodeid
    inside: set[Path] = field(default_factory=set)  # left out of the outside snapshot
    before: Snapshot = field(default_factory=dict)

    def mark(self) -> None:
        """Take the outside snapshot again, after the host side changed things."""
        self.before = snapshot(self.tmp, frozenset(self.inside | {self.export}))

    def assert_outside_untouched(self) -> None:
        assert snapshot(self.tmp, frozenset(self.inside | {self.export})) == self.before


@pytest.fixture
def w(tmp_path: Path, resolver: str) -> Iterator[World]:
    export, outside = tmp_path / "export", tmp_path / "outside"
    export.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    (outside / "only-outside").write_bytes(b"")
    (export / "f").write_bytes(b"file")
    (export / "sub").mkdir()
    (export / "sub" / "secret").write_bytes(b"inside")
    (export / "sub" / "deep").mkdir()
    c = Client(Tree())
    c.tree.add_export("rw", dirfd(export), True)
    try:
        c.init()
        world = World(c, tmp_path, export, outside, c.lookup(1, b"rw")[0])
        world.mark()
        yield world
    finally:
        c.tree.close()


# -- what a guest can do --


def errno_of(fn: Callable[..., object], *args: object, **kw: object) -> int:
    with pytest.raises(FuseError) as e:
        fn(*args, **kw)
    return e.value.errno


def read_all(c: Client, node: int, flags: int = os.O_RDONLY) -> bytes:
    fh = c.open(node, flags)
    try:
        return c.read(fh, 0, 1 << 16)
    finally:
        c.release(fh)


def forget(c: Client, node: int, n: int = 1) -> None:
    c.call(P.FORGET, node, struct.pack("<Q", n))


def read_dir(c: Client, node: int, plus: bool = False) -> list[tuple[bytes, int, int]]:
    """(name, nodeid, mode) of each entry; READDIR gives nodeid 0 and only the type."""
    fh = c.open(node, op=P.OPENDIR)
    try:
        out = c.read(fh, 0, 65536, P.READDIRPLUS if plus else P.READDIR)
    finally:
        c.release(fh, P.RELEASEDIR)
    entries, pos = [], 0
    while pos < len(out):
        nodeid, mode = 0, 0
        if plus:
            nodeid = struct.unpack_from("<Q", out, pos)[0]
            mode = P.ATTR.unpack_from(out, pos + P.ENTRY_HEAD.size)[MODE]
            pos += P.ENTRY_HEAD.size + P.ATTR.size
        _ino, _off, namelen, dtype = P.DIRENT.unpack_from(out, pos)
        entry = out[pos + P.DIRENT.size : pos + P.DIRENT.size + namelen]
        entries.append((entry, nodeid, mode if plus else dtype << 12))
        pos += (P.DIRENT.size + namelen + 7) & ~7
    return entries


def listings(c: Client, node: int) -> tuple[list[bytes], list[bytes]]:
    """The names READDIR and READDIRPLUS give (READDIRPLUS's lookups forgotten again)."""
    plain = sorted(n for n, _, _ in read_dir(c, node))
    plus = read_dir(c, node, plus=True)
    for _, nodeid, _ in plus:
        if nodeid:
            forget(c, nodeid)
    return plain, sorted(n for n, _, _ in plus)


def names_in(c: Client, node: int) -> list[bytes]:
    """The listing, the same in READDIR and READDIRPLUS."""
    plain, plus = listings(c, node)
    assert plus == plain
    return plain


def rename1(c: Client, parent: int, old: bytes, newdir: int, new: bytes) -> None:
    """The old RENAME opcode (no flags), which the kernel still sends for rename(2)."""
    c.call(P.RENAME, parent, struct.pack("<Q", newdir) + name(old) + name(new))


def getattr_mode(c: Client, node: int) -> int:
    out = c.call(P.GETATTR, node, bytes(16))
    mode: int = P.ATTR.unpack_from(out, P.ATTR_OUT_HEAD.size)[MODE]
    return mode


SETATTRS = {
    "size": setattr_body(P.FATTR_SIZE, size=0),
    "mode": setattr_body(P.FATTR_MODE, mode=0o777),
    "mtime": setattr_body(P.FATTR_MTIME),
    "times-now": setattr_body(
        P.FATTR_ATIME | P.FATTR_MTIME | P.FATTR_ATIME_NOW | P.FATTR_MTIME_NOW
    ),
}


def exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE), as a host-side attacker can."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def real_opens_of(path: Path) -> list[str]:
    """Our fds on *path* that are not O_PATH: a FIFO or device opened for real."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split()[3], 8)
        except OSError:
            continue
        if not flags & 0o10000000:  # O_PATH
            found.append(fd)
    return found
