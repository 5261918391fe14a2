"""Warming (warm.py): after two READs or WRITEs in a row, the next block is
read into the CPU's caches; the guest still gets what the file holds when
it asks, and nothing is read of a handle that is gone or an export revoked.

Driven through the device on a fake guest (a memfd as its RAM), in Linux's
request layout, so the fast lanes that plan the warming are the ones used.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.virtiofs import protocol as P
from spectrumd.virtiofs.tree import Tree
from spectrumd.virtiofs.warm import CHUNK, MIN_RUN

from .fusereq import read_body, request
from .guestmem import FakeGuest
from .test_virtqueue import initialized_guest, lookup, open_node, reply_error, run

pytestmark = pytest.mark.timeout(60)
K = MIN_RUN  # one request's size: 64 KiB
SIZE = 8 * K


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[FakeGuest, Path, Tree]]:
    g, tree = initialized_guest(tmp_path, os.urandom(SIZE))
    yield g, tmp_path / "e" / "data", tree
    g.close()


def read(g: FakeGuest, fh: int, offset: int, size: int = K) -> bytes:
    r = request(P.READ, 0, read_body(fh, offset, size))
    n, outs = run(g, [r[:40], r[40:]], [16, size])  # the fast lane's layout
    assert reply_error(g, outs[0]) == 0
    return g.read(outs[1], n - 16)


def write(g: FakeGuest, fh: int, offset: int, data: bytes) -> None:
    body = struct.pack("<QQIIQII", fh, offset, len(data), 0, 0, 0, 0)
    r = bytearray(request(P.WRITE, 0, body))
    struct.pack_into("<I", r, 0, len(r) + len(data))
    _n, outs = run(g, [bytes(r[:40]), bytes(r[40:]), data], [16, 8])
    assert reply_error(g, outs[0]) == 0
    assert struct.unpack("<I", g.read(outs[1], 4))[0] == len(data)


def warm_all(g: FakeGuest) -> int:
    """Step the plan to its end, as the loop does between polls; returns the bytes warmed."""
    w = g.device.warmer
    before, steps = w.warmed, 0
    while w.plan is not None:
        w.step()
        steps += 1
        assert steps <= 1 + K // CHUNK + 1
    return w.warmed - before


def in_page_cache(fd: int, offset: int) -> bool:
    """Whether the page of ``fd`` at ``offset`` is in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    addr = libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset - offset % page)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * 1)()
        assert libc.mincore(addr, page, vec) == 0, os.strerror(ctypes.get_errno())
        return bool(vec[0] & 1)
    finally:
        libc.munmap(addr, page)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sequential_reads_warm_the_next_block_and_the_guest_still_gets_the_file(
    world: tuple[FakeGuest, Path, Tree],
) -> None:
    g, path, _tree = world
    fh = open_node(g, lookup(g, lookup(g, 1, b"e"), b"data"))
    data = path.read_bytes()
    assert read(g, fh, 0) == data[:K]
    assert g.device.warmer.plan is None  # one request says nothing about the next
    assert read(g, fh, K) == data[K : 2 * K]
    assert g.device.warmer.plan == (fh, False, 2 * K, 3 * K)
    assert warm_all(g) == K
    # The host changes the warmed range before the guest asks for it: the
    # guest gets the new bytes (warming throws what it read away).
    new = os.urandom(K)
    with open(path, "r+b") as f:
        f.seek(2 * K)
        f.write(new)
    assert read(g, fh, 2 * K) == new
    assert warm_all(g) == K  # and the stream goes on
    # At the end of the file the plan stops at what there is.
    assert read(g, fh, 3 * K, SIZE - 3 * K) == data[3 * K :]
    assert warm_all(g) == 0


def test_small_or_scattered_reads_warm_nothing(world: tuple[FakeGuest, Path, Tree]) -> None:
    g, _path, _tree = world
    fh = open_node(g, lookup(g, lookup(g, 1, b"e"), b"data"))
    for off in (0, 4096, 8192):  # in order, but 4 KiB at a time
        read(g, fh, off, 4096)
        assert g.device.warmer.plan is None
    read(g, fh, 0)
    read(g, fh, 4 * K)  # a jump
    assert g.device.warmer.plan is None
    read(g, fh, 5 * K)
    assert g.device.warmer.plan is not None
    read(g, fh, 0, 4096)  # a different request cancels the plan
    assert g.device.warmer.plan is None


def test_a_write_only_handle_warms_through_a_read_only_twin_closed_with_it(
    world: tuple[FakeGuest, Path, Tree],
) -> None:
    g, path, tree = world
    node = lookup(g, lookup(g, 1, b"e"), b"data")
    before = open_fd_count()
    fh = open_node(g, node, flags=os.O_WRONLY)
    a, b = os.urandom(K), os.urandom(K)
    write(g, fh, 0, a)
    write(g, fh, K, b)
    assert g.device.warmer.plan == (fh, True, 2 * K, 3 * K)
    assert warm_all(g) == K  # through its twin: the handle's own fd cannot read
    assert open_fd_count() == before + 2  # the handle's fd and its twin
    assert path.read_bytes()[: 2 * K] == a + b
    _n, outs = run(g, [request(P.RELEASE, node, struct.pack("<QIIQ", fh, 0, 0, 0))], [16])
    assert reply_error(g, outs[0]) == 0
    assert open_fd_count() == before  # both gone with the handle
    assert fh not in tree.handles


def test_a_file_the_server_may_not_read_is_written_and_not_warmed(
    world: tuple[FakeGuest, Path, Tree],
) -> None:
    g, path, _tree = world
    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 0200")  # pragma: no cover
    node = lookup(g, lookup(g, 1, b"e"), b"data")
    path.chmod(0o200)
    fh = open_node(g, node, flags=os.O_WRONLY)
    write(g, fh, 0, b"x" * K)
    write(g, fh, K, b"y" * K)
    assert warm_all(g) == 0
    path.chmod(0o600)
    assert path.read_bytes()[: 2 * K] == b"x" * K + b"y" * K


def test_nothing_is_warmed_of_a_released_handle_or_a_revoked_export(
    world: tuple[FakeGuest, Path, Tree],
) -> None:
    g, _path, tree = world
    node = lookup(g, lookup(g, 1, b"e"), b"data")
    fh = open_node(g, node)
    read(g, fh, 0)
    read(g, fh, K)
    tree.release(fh)  # as RELEASE would, between the reply and the loop's next step
    assert warm_all(g) == 0
    fh = open_node(g, node, flags=os.O_WRONLY)
    write(g, fh, 0, b"a" * K)
    write(g, fh, K, b"b" * K)
    before = open_fd_count()
    assert tree.remove_export("e")
    assert open_fd_count() < before
    assert warm_all(g) == 0


def test_warming_never_waits_for_the_disk(world: tuple[FakeGuest, Path, Tree]) -> None:
    g, path, _tree = world
    fh = open_node(g, lookup(g, lookup(g, 1, b"e"), b"data"))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        warmed = []
        # A warm read of a range not in memory starts the kernel's readahead and
        # answers EAGAIN without waiting for it; now and then (one in ten or so here)
        # that readahead is done before the kernel looks again, and the read gets
        # the data after all. A warmer that waited for the disk would warm every time.
        for _ in range(10):
            read(g, fh, 0)
            read(g, fh, K)  # the second in a row: the next block is planned
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
            # Asked with mincore, which reads nothing (a probing read would start
            # a readahead of its own).
            if in_page_cache(fd, 2 * K):  # pragma: no cover - depends on the file system
                pytest.skip(f"the page cache kept {path} (tmpfs?)")
            warmed.append(warm_all(g))
            if warmed[-1] == 0:
                break  # gave up at once: the range was not in memory
        assert warmed[-1] == 0, f"warmed {warmed} bytes of a range not in memory"
        assert os.preadv(fd, [bytearray(1)], 2 * K) == 1  # (and still there to read)
    finally:
        os.close(fd)
