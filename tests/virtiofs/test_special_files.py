"""The guest as attacker with special files: FIFOs, sockets and device nodes are
listed but never opened, also when one is swapped in after a lookup or in a race.

Every test runs with openat2 and with its fallback (traversal_world.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spectrumd.virtiofs import protocol as P

from .fusereq import Client, FuseError, name
from .traversal_world import (
    MODE,
    RDEV,
    SETATTRS,
    World,
    errno_of,
    exchange,
    forget,
    getattr_mode,
    read_all,
    read_dir,
    real_opens_of,
)

pytestmark = pytest.mark.timeout(60)


def assert_no_reader(fifo: Path) -> None:
    """Nobody holds *fifo* open for reading: a non-blocking writer finds no reader."""
    with pytest.raises(OSError) as e:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert e.value.errno == errno.ENXIO


def guarded(fifos: list[Path], guest: Callable[[], None], seconds: float = 5.0) -> float:
    """Run *guest* in a thread and return how long it took.

    A server that opened a FIFO would block in open(2) for good; past
    *seconds* the test opens the FIFOs' other ends, so that the stuck open
    returns and the thread ends, and fails.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            guest()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="guest", daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    took = time.monotonic() - start
    if t.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        t.join(seconds)
        pytest.fail(f"the server blocked for {seconds} s: it opened a FIFO")
    if errors:
        raise errors[0]
    return took


# -- special files --

OPEN_FLAGS = (
    os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_NONBLOCK,
    os.O_WRONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
)  # fmt: skip


def assert_never_opened(c: Client, parent: int, n: bytes, kind: int) -> int:
    """Every way a guest could open the special file *n*; returns its node."""
    node, attr = c.lookup(parent, n)
    assert stat.S_IFMT(attr[MODE]) == kind  # visible and stat-able
    assert stat.S_IFMT(getattr_mode(c, node)) == kind
    for flags in OPEN_FLAGS:
        assert errno_of(c.open, node, flags) == errno.EACCES
    assert errno_of(c.open, node, op=P.OPENDIR) == errno.ENOTDIR
    assert errno_of(c.lookup, node, b"x") == errno.ENOTDIR
    # CREATE without O_EXCL of an existing name opens it: it must not.
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
        assert errno_of(c.create, parent, n, flags=flags) == errno.EACCES
    assert errno_of(c.create, parent, n, flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL) == (
        errno.EEXIST
    )
    # Truncating by path would open it too.
    for body in SETATTRS.values():
        assert errno_of(c.call, P.SETATTR, node, body) == errno.EPERM
    listed = {e: stat.S_IFMT(m) for e, _, m in read_dir(c, parent, plus=True)}
    assert listed[n] == kind
    return node


def test_a_fifo_is_never_opened_and_never_hangs(w: World) -> None:
    c = w.c
    fifo = w.export / "fifo"
    os.mkfifo(fifo)
    took = guarded([fifo], lambda: assert_never_opened(c, w.rw, b"fifo", stat.S_IFIFO))
    assert took < 1
    assert_no_reader(fifo)
    assert real_opens_of(fifo) == []
    w.assert_outside_untouched()


def test_a_fifo_swapped_in_after_lookup_is_not_opened(w: World) -> None:
    c = w.c
    f, fifo = w.export / "f", w.export / "fifo"
    node, _ = c.lookup(w.rw, b"f")
    os.mkfifo(fifo)
    os.rename(fifo, f)

    def guest() -> None:
        # The looked-up (now unlinked) regular file, not the FIFO in its place.
        assert read_all(c, node) == b"file"
        assert read_all(c, node, os.O_RDWR) == b"file"
        fresh, attr = c.lookup(w.rw, b"f")
        assert fresh != node and stat.S_ISFIFO(attr[MODE])
        assert errno_of(c.open, fresh, os.O_WRONLY) == errno.EACCES
        assert errno_of(c.create, w.rw, b"f", flags=os.O_WRONLY) == errno.EACCES

    assert guarded([f], guest) < 1
    assert_no_reader(f)
    assert real_opens_of(f) == []
    w.assert_outside_untouched()


def test_a_fifo_swapped_in_and_out_in_a_race_is_never_opened(w: World) -> None:
    """The host swaps f and a FIFO atomically, over and over, while the guest opens f."""
    c = w.c
    f, fifo = w.export / "f", w.export / "fifo"
    os.mkfifo(fifo)
    held, _ = c.lookup(w.rw, b"f")
    stop = threading.Event()
    swaps = [0]
    seen: set[bytes] = set()
    refused = [0]

    def swapper() -> None:
        while not stop.is_set():
            exchange(f, fifo)
            swaps[0] += 1

    def guest() -> None:
        # Until the race has been run enough and lost at least once (a slow,
        # loaded machine takes longer; the assertions below are the same).
        deadline = time.monotonic() + 20
        while (swaps[0] < 2000 or not refused[0]) and time.monotonic() < deadline:
            seen.add(read_all(c, held))
            for how in ("lookup", "create"):
                try:
                    if how == "lookup":
                        node, _ = c.lookup(w.rw, b"f")
                        try:
                            seen.add(read_all(c, node))
                        finally:
                            forget(c, node)
                    else:
                        node, fh = c.create(w.rw, b"f", flags=os.O_RDWR)
                        seen.add(c.read(fh, 0, 100))
                        c.release(fh)
                        forget(c, node)
                except FuseError as e:
                    assert e.errno == errno.EACCES, e  # it was the FIFO
                    refused[0] += 1

    t = threading.Thread(target=swapper, name="swapper")
    t.start()
    try:
        guarded([f, fifo], guest, seconds=30)
    finally:
        stop.set()
        t.join(10)
    assert swaps[0] >= 2000 and refused[0] > 0
    assert seen == {b"file"}
    for p in (f, fifo):
        if stat.S_ISFIFO(p.lstat().st_mode):
            assert_no_reader(p)
        assert real_opens_of(p) == []
    w.assert_outside_untouched()


def test_a_unix_socket_is_never_opened(w: World) -> None:
    c = w.c
    path = w.export / "sock"
    if len(os.fsencode(path)) >= 108:
        pytest.skip("tmp_path too long for a unix socket address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        srv.setblocking(False)
        guarded([], lambda: assert_never_opened(c, w.rw, b"sock", stat.S_IFSOCK))
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing connected to it
    w.assert_outside_untouched()


DEVICES = {
    "char-null": (stat.S_IFCHR, 1, 3),
    "block-loop0": (stat.S_IFBLK, 7, 0),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.parametrize("device", DEVICES.values(), ids=DEVICES.keys())
def test_a_device_node_is_never_opened(w: World, device: tuple[int, int, int]) -> None:
    c = w.c
    kind, major, minor = device
    path = w.export / "dev"
    try:
        os.mknod(path, kind | 0o666, os.makedev(major, minor))
    except OSError as e:
        pytest.skip(f"mknod not allowed here: {e}")
    assert_never_opened(c, w.rw, b"dev", kind)
    assert c.lookup(w.rw, b"dev")[1][RDEV] == os.makedev(major, minor)
    assert real_opens_of(path) == []
    c.call(P.UNLINK, w.rw, name(b"dev"))  # removing one is an ordinary change
    assert not os.path.lexists(path)
    w.assert_outside_untouched()
