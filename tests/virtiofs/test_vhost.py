"""The vhost-user backend over a real socketpair, driven the way QEMU drives it, and fuzzed."""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrumd.virtiofs import protocol as P
from spectrumd.virtiofs import vhost as V
from spectrumd.virtiofs.__main__ import serve_vhost
from spectrumd.virtiofs.control import send_command
from spectrumd.virtiofs.device import Device, fs_config
from spectrumd.virtiofs.ops import FileSystem
from spectrumd.virtiofs.spin import KeepAwake
from spectrumd.virtiofs.tree import Tree
from spectrumd.virtiofs.virtqueue import DESC, F_NEXT, F_WRITE

from .fusereq import init_body, name, request

pytestmark = pytest.mark.timeout(60)
MEM = 1 << 20
GPA, UVA = 0x40000000, 0x7F0000000000
Q = 16


def msg(req: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    flags = V.VERSION | (V.F_NEED_REPLY if need_reply else 0)
    return V.HEADER.pack(req, flags, len(payload)) + payload


class Frontend:
    """The VMM's side: sends messages, reads replies, owns the guest memfd."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = os.memfd_create("ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, MEM)
        self.mem = mmap.mmap(self.fd, MEM)

    def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             need_reply: bool = False) -> None:  # fmt: skip
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([msg(req, payload, need_reply)], anc)

    def reply(self) -> bytes:
        head = self.sock.recv(12, socket.MSG_WAITALL)
        _req, flags, size = V.HEADER.unpack(head)
        assert flags & V.F_REPLY
        return self.sock.recv(size, socket.MSG_WAITALL) if size else b""

    def call(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        self.send(req, payload, fds)
        return self.reply()


@pytest.fixture(params=[0.0, 1e-3], ids=["sleeping", "polling"])
def vhost(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Frontend, socket.socket, Path]]:
    """The backend's loop in a thread; it sleeps between kicks, or keeps a CPU
    awake for up to 1 ms after each (its companion process, spin.KeepAwake)."""
    (tmp_path / "e").mkdir()
    tree = Tree()
    tree.add_export("e", os.open(tmp_path / "e", os.O_PATH | os.O_DIRECTORY), True)
    backend = V.Backend(Device(FileSystem(tree), 2), fs_config("spectrum", 1))
    ours, theirs = socket.socketpair()
    ctl_ours, ctl_theirs = socket.socketpair()
    errors: list[BaseException] = []
    awake = KeepAwake.start() if request.param else None

    def serve() -> None:
        try:
            serve_vhost(backend, ours, ctl_ours, poll_max=request.param, awake=awake)
        except BaseException as e:
            errors.append(e)
            ours.shutdown(socket.SHUT_RDWR)  # as the process exiting would

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    fe = Frontend(theirs)
    fe.errors = errors  # type: ignore[attr-defined]
    yield fe, ctl_theirs, tmp_path
    theirs.close()
    t.join(10)
    assert not t.is_alive()  # EOF on the vhost-user socket ends the loop
    if awake is not None:
        awake.close()
    tree.close()
    ours.close()
    ctl_ours.close()
    ctl_theirs.close()


def test_handshake_ring_request_and_call(vhost: tuple[Frontend, socket.socket, Path]) -> None:
    fe, ctl, tmp = vhost
    features = struct.unpack("<Q", fe.call(V.GET_FEATURES))[0]
    assert features & V.F_VERSION_1 and features & V.F_INDIRECT_DESC
    fe.send(V.SET_FEATURES, struct.pack("<Q", V.F_VERSION_1 | V.F_PROTOCOL_FEATURES))
    pf = struct.unpack("<Q", fe.call(V.GET_PROTOCOL_FEATURES))[0]
    fe.send(V.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
    assert struct.unpack("<Q", fe.call(V.GET_QUEUE_NUM))[0] == 2
    cfg = fe.call(V.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40))
    assert cfg[12:20] == b"spectrum" and struct.unpack_from("<I", cfg, 12 + 36)[0] == 1
    fe.send(V.SET_OWNER, need_reply=True)
    assert fe.reply() == struct.pack("<Q", 0)  # REPLY_ACK
    region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA, MEM - 4096, UVA, 4096)
    fe.send(V.SET_MEM_TABLE, region, (fe.fd,), need_reply=True)
    assert fe.reply() == struct.pack("<Q", 0)
    # Rings at memfd offsets 4096 (desc), 8192 (avail), 12288 (used): UVA + off - 4096.
    fe.send(V.SET_VRING_NUM, struct.pack("<II", 1, Q))
    fe.send(V.SET_VRING_BASE, struct.pack("<II", 1, 0))
    fe.send(V.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, UVA, UVA + 8192, UVA + 4096, 0))
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.send(V.SET_VRING_CALL, struct.pack("<Q", 1), (call,))
    fe.send(V.SET_VRING_KICK, struct.pack("<Q", 1), (kick,))
    fe.send(V.SET_VRING_ENABLE, struct.pack("<II", 1, 1), need_reply=True)
    assert fe.reply() == struct.pack("<Q", 0)
    m = fe.mem
    kicks = [kick]

    def submit(slot: int, req: bytes, out: int) -> None:
        at = 0x10000 + slot * 0x1000
        m[at : at + len(req)] = req
        DESC.pack_into(m, 4096 + 32 * slot, GPA + at - 4096, len(req), F_NEXT, 2 * slot + 1)
        DESC.pack_into(m, 4096 + 32 * slot + 16, GPA + at + 0x800 - 4096, out, F_WRITE, 0)
        idx = struct.unpack_from("<H", m, 4096 + 4096 + 2)[0]
        struct.pack_into("<H", m, 8192 + 4 + 2 * (idx % Q), 2 * slot)
        struct.pack_into("<H", m, 8192 + 2, idx + 1)
        os.eventfd_write(kicks[-1], 1)

    def wait_used(n: int) -> None:
        for _ in range(500):
            if struct.unpack_from("<H", m, 12288 + 2)[0] >= n:
                return
            threading.Event().wait(0.01)
        raise AssertionError("no used entry")

    submit(0, request(P.INIT, 0, init_body(), 1), 80)
    wait_used(1)
    submit(1, request(P.LOOKUP, 1, name(b"e"), 2), 144)
    wait_used(2)
    length, err, unique = P.OUT_HEADER.unpack_from(m, 0x10000 + 0x1000 + 0x800)
    assert (err, unique, length) == (0, 2, 144)
    assert os.eventfd_read(call) >= 1
    # A live export change over the control socket, then a lookup of it.
    (tmp / "late").mkdir()
    fd = os.open(tmp / "late", os.O_PATH | os.O_DIRECTORY)
    assert send_command(ctl, {"op": "add_export", "name": "late", "writable": False}, (fd,)) == {
        "ok": True
    }
    os.close(fd)
    submit(2, request(P.LOOKUP, 1, name(b"late"), 3), 144)
    wait_used(3)
    assert P.OUT_HEADER.unpack_from(m, 0x10000 + 0x2000 + 0x800)[1] == 0
    assert send_command(ctl, {"op": "remove_export", "name": "late"})["ok"] is True
    submit(3, request(P.LOOKUP, 1, name(b"late"), 4), 144)
    wait_used(4)
    assert -P.OUT_HEADER.unpack_from(m, 0x10000 + 0x3000 + 0x800)[1] == 2  # ENOENT
    assert send_command(ctl, {"op": "list_exports"}) == {"ok": True, "exports": ["e"]}
    assert send_command(ctl, {"op": "add_export", "name": "x"})["ok"] is False
    assert fe.call(V.GET_VRING_BASE, struct.pack("<II", 1, 0)) == struct.pack("<II", 1, 4)
    # The ring starts again on a new kick fd (the backend's copy of it may
    # take the number of the one it closed): its kicks are seen, one after
    # another and several at once.
    kicks.append(os.eventfd(0, os.EFD_CLOEXEC))
    fe.send(V.SET_VRING_BASE, struct.pack("<II", 1, 4))
    fe.send(V.SET_VRING_KICK, struct.pack("<Q", 1), (kicks[-1],))
    for n in range(5, 8):
        submit(n % 4, request(P.LOOKUP, 1, name(b"e"), n), 144)
        wait_used(n)
    for n in range(8, 11):
        submit(n % 4, request(P.LOOKUP, 1, name(b"e"), n), 144)
    wait_used(10)
    assert fe.call(V.GET_VRING_BASE, struct.pack("<II", 1, 0)) == struct.pack("<II", 1, 10)
    for fd in (*kicks, call):
        os.close(fd)


def test_bad_message_closes_the_connection(vhost: tuple[Frontend, socket.socket, Path]) -> None:
    fe, _, _ = vhost
    fe.send(V.SET_VRING_NUM, struct.pack("<II", 7, 16))  # no queue 7
    fe.sock.settimeout(5)
    assert fe.sock.recv(1) == b""
    assert "queue 7 does not exist" in str(fe.errors[0])  # type: ignore[attr-defined]


def _fresh_backend() -> V.Backend:
    return V.Backend(Device(FileSystem(Tree()), 2), fs_config("t", 1))


@given(st.lists(st.tuples(st.integers(0, 45), st.integers(0, 15), st.binary(max_size=300),
                          st.integers(0, 3)), max_size=30))  # fmt: skip
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_vhost_messages(msgs: list[tuple[int, int, bytes, int]]) -> None:
    """Any message sequence: replies or VhostError, never another exception, no fd leaked."""
    backend = _fresh_backend()
    before = len(os.listdir("/proc/self/fd"))
    memfd = os.memfd_create("m", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 16)
    try:
        for req, flags, payload, nfds in msgs:
            fds = [os.dup(memfd) if i == 0 else os.eventfd(0) for i in range(nfds)]
            try:
                reply = backend.handle(req, flags, payload, fds)
            except V.VhostError:
                continue
            if reply is not None:
                assert V.HEADER.unpack_from(reply)[2] == len(reply) - 12
    finally:
        backend.device.close()
        os.close(memfd)
    assert len(os.listdir("/proc/self/fd")) <= before
