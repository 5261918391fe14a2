"""Warming: the time a poll would spend idle brings the next block of a
sequential read or write into this CPU's caches.

A 1 MiB READ costs the server one copy, from the host's page cache to the
guest's pages; the copy's time is mostly the source coming in from memory
(on this machine 210-260 us, against 85 us when the same range comes again
and sits in the CPU's caches). The guest then takes a few hundred
microseconds of its own before it asks for the next block. When a handle is
read (or written) in order, in requests of at least ``MIN_RUN``, the next
request is most likely the range right after the last: so between polls,
the loop reads that range into a small scratch buffer (``CHUNK`` at a
time, checking for kicks between chunks) and throws the bytes away. The
request that follows then copies from the cache. Writes gain the same way:
their copy goes into page-cache pages that are in the cache already.

The warm read never serves data: the request is answered by its own
``preadv``/``pwritev`` as before, so what the guest gets is what the file
holds when it asks, whatever changed in between. It never waits for a
disk (``RWF_NOWAIT``: a range that is not in the page cache ends the plan;
a file system that cannot say so, such as tmpfs, which has no disk, is
read plainly), reads only a handle that is still open in an export not
revoked, and for a write-only handle uses a read-only descriptor of the
same inode that the handle owns (tree.py closes both together). The loop
warms only where it would poll (spin.py): never while the CPU is shared.
"""

from __future__ import annotations

import errno
import os

from .tree import Tree

# Requests smaller than this are not worth warming after (a 4 KiB read's
# copy is in the noise); 64 KiB and up are bulk transfers.
MIN_RUN = 64 << 10
# Warmed per step, between two looks for a kick: some 25 us here.
CHUNK = 128 << 10
SCRATCH = 64 << 10  # the buffer the chunk is read into, twice over (it stays in L1/L2)


class Warmer:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self._last: tuple[int, int] = (0, -1)  # the last READ/WRITE: handle, end offset
        # What to warm: handle, whether it was written, the range [start, end).
        self.plan: tuple[int, bool, int, int] | None = None
        self._plain_fh = 0  # a handle on a file system without RWF_NOWAIT
        mv = memoryview(bytearray(SCRATCH))
        self._full = [mv] * (CHUNK // SCRATCH)
        self._mv = mv
        self.warmed = 0  # bytes, all told (for tuning and tests)

    def after(self, fh: int, offset: int, n: int, write: bool) -> None:
        """A READ or WRITE of *n* bytes at *offset* of handle *fh* was answered."""
        sequential = self._last == (fh, offset)
        self._last = (fh, offset + n)
        if sequential and n >= MIN_RUN:
            self.plan = (fh, write, offset + n, offset + 2 * n)
        else:
            self.plan = None

    def cancel(self) -> None:
        self.plan = None

    def step(self) -> None:
        """Warm the next chunk of the plan (the caller checks ``plan`` first)."""
        plan = self.plan
        if plan is None:
            return
        fh, write, start, end = plan
        self.plan = None  # unless the chunk goes well
        h = self.tree.handles.get(fh)
        if h is None or h.export is None or h.export.revoked or h.fd < 0:
            return
        fd = self.tree.read_fd(h) if write else h.fd
        if fd < 0:
            return
        k = min(CHUNK, end - start)
        bufs = self._full if k == CHUNK else _first(self._mv, k)
        try:
            if fh == self._plain_fh:
                got = os.preadv(fd, bufs, start)
            else:
                try:
                    got = os.preadv(fd, bufs, start, os.RWF_NOWAIT)
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._plain_fh = fh
                    got = os.preadv(fd, bufs, start)
        except OSError:
            return  # EAGAIN (not in the page cache), or the file went away: no more
        self.warmed += got
        if got == k and start + got < end:
            self.plan = (fh, write, start + got, end)


def _first(mv: memoryview, k: int) -> list[memoryview]:
    """Buffers of *k* bytes in all (k < CHUNK), made of *mv*."""
    out = []
    while k > 0:
        out.append(mv[: min(k, len(mv))])
        k -= len(out[-1])
    return out
