"""Directory listings: snapshots of a directory and READDIR / READDIRPLUS replies.

A directory handle takes a snapshot of its entries when the guest reads at
offset 0 (opendir or rewinddir); later offsets index into it, so entries
added or removed meanwhile cannot shift what the guest has already seen.
The root's listing is the export table. ``.`` and ``..`` are never listed:
the tree has no way up.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from . import protocol as P
from .tree import Handle, Tree

Entry = tuple[bytes, int, int]  # name, inode number, DT_* type
_DT_DIR = stat.S_IFDIR >> 12
_NO_NODE = bytes(P.ENTRY_HEAD.size + P.ATTR.size)


def snapshot(tree: Tree, h: Handle) -> list[Entry]:
    if h.inode.export is None:
        exports = tree.exports
        return [(n, os.fstat(exports[n].fd).st_ino, _DT_DIR) for n in sorted(exports)]
    with os.scandir(h.fd) as it:
        return [(os.fsencode(e.name), e.inode(), _dtype(e)) for e in it]


def encode_readdir(entries: list[Entry], offset: int, size: int) -> bytes:
    out: list[bytes] = []
    used = 0
    for i in range(offset, len(entries)):
        name, ino, dtype = entries[i]
        used += P.dirent_size(name, False)
        if used > size:
            break
        out.append(P.encode_dirent(ino, i + 1, dtype, name))
    return b"".join(out)


def encode_readdirplus(
    entries: list[Entry], offset: int, size: int, entry_of: Callable[[bytes], bytes]
) -> bytes:
    """Like encode_readdir, each entry led by ``entry_of(name)`` (a lookup, counted)."""
    out: list[bytes] = []
    used = 0
    for i in range(offset, len(entries)):
        name, ino, dtype = entries[i]
        used += P.dirent_size(name, True)
        if used > size:
            break  # checked before the lookup: an entry not sent is not counted
        try:
            head = entry_of(name)
        except OSError:
            # Gone since the snapshot, or refused: an entry without a node
            # (nodeid 0), which the kernel does not count as a lookup.
            head = _NO_NODE
        out.append(head + P.encode_dirent(ino, i + 1, dtype, name))
    return b"".join(out)


def _dtype(e: os.DirEntry[str]) -> int:
    if e.is_symlink():
        return stat.S_IFLNK >> 12
    if e.is_dir(follow_symlinks=False):
        return stat.S_IFDIR >> 12
    if e.is_file(follow_symlinks=False):
        return stat.S_IFREG >> 12
    return stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) >> 12


class RootStat:
    """The synthetic root's attributes: a read-only directory owned by us."""

    def __init__(self, n: int) -> None:
        self.st_ino = 1
        self.st_size = 0
        self.st_blocks = 0
        self.st_atime = self.st_mtime = self.st_ctime = 0
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = 0
        self.st_mode = stat.S_IFDIR | 0o555
        self.st_nlink = 2 + n
        self.st_uid = os.geteuid()
        self.st_gid = os.getegid()
        self.st_rdev = 0
        self.st_blksize = 4096
