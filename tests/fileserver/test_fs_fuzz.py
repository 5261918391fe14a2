"""Random and mutated requests never raise out of the session and never escape."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fs9p_helpers import make_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrumd.fileserver import messages as m
from spectrumd.fileserver.codec import Decoder, ProtocolError, encode
from spectrumd.fileserver.session import Session

NAMES = [b"rw", b"ro", b"f", b"sub", b"link", b"fifo", b"new", b"..", b".", b"/etc",
         b"a/b", b"", b"x\0y", b"n" * 300, b"secret", b"hard"]  # fmt: skip

fids = st.sampled_from([0, 1, 2, 3, 4, m.NOFID])
names = st.one_of(st.sampled_from(NAMES), st.binary(max_size=12))
u32 = st.one_of(st.sampled_from([0, 1, 2, 0o1000, 0o100644, 0o40755, 0xFFFFFFFF]),
                st.integers(0, 2**32 - 1))  # fmt: skip
u64 = st.one_of(st.sampled_from([0, 1, 5, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
count = st.sampled_from([0, 1, 100, 8192, 2**32 - 1])

REQUESTS = st.one_of(
    st.builds(m.Tversion, st.just(1), st.sampled_from([4096, 8192, 1 << 20, 10]),
              st.sampled_from([b"9P2000.L", b"9P2000"])),
    st.builds(m.Tattach, st.just(1), fids, fids, names, st.sampled_from([b"", b"rw", b"ro"]), u32),
    st.builds(m.Twalk, st.just(1), fids, fids, st.lists(names, max_size=18).map(tuple)),
    st.builds(m.Tlopen, st.just(1), fids, u32),
    st.builds(m.Tlcreate, st.just(1), fids, names, u32, u32, u32),
    st.builds(m.Tread, st.just(1), fids, u64, count),
    st.builds(m.Twrite, st.just(1), fids, u64, st.binary(max_size=64)),
    st.builds(m.Tclunk, st.just(1), fids),
    st.builds(m.Tremove, st.just(1), fids),
    st.builds(m.Tgetattr, st.just(1), fids, u64),
    st.builds(m.Tsetattr, st.just(1), fids, u32, u32, u32, u32, u64, u64, u64, u64, u64),
    st.builds(m.Treaddir, st.just(1), fids, u64, count),
    st.builds(m.Tmkdir, st.just(1), fids, names, u32, u32),
    st.builds(m.Tunlinkat, st.just(1), fids, names, st.sampled_from([0, 0x200, 1])),
    st.builds(m.Trenameat, st.just(1), fids, names, fids, names),
    st.builds(m.Tstatfs, st.just(1), fids),
    st.builds(m.Tfsync, st.just(1), fids, u32),
    st.builds(m.Tflush, st.just(1), st.integers(0, 0xFFFF)),
    st.builds(m.Txattrwalk, st.just(1), fids, fids, names),
    st.builds(m.Tsymlink, st.just(1), fids, names, names, u32),
    st.builds(m.Tlink, st.just(1), fids, fids, names),
    st.builds(m.Tmknod, st.just(1), fids, names, u32, u32, u32, u32),
    st.builds(m.Treadlink, st.just(1), fids),
    st.builds(m.Rread, st.just(1), st.binary(max_size=8)),  # a reply sent as a request
)  # fmt: skip

# Kept small for the suite; FS_FUZZ_EXAMPLES=5000 for a longer hunt.
EXAMPLES = int(os.environ.get("FS_FUZZ_EXAMPLES", "100"))

START = [m.Tversion(0, 1 << 20, b"9P2000.L"), m.Tattach(0, 0, m.NOFID, b"", b"", 0),
         m.Twalk(0, 0, 1, (b"rw",)), m.Twalk(0, 0, 2, (b"ro",))]  # fmt: skip


def snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st_ = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            out[str(p.relative_to(path))] = (stat.S_IFMT(st_.st_mode), data)
    return out


@contextmanager
def playground() -> Iterator[tuple[Path, Session]]:
    base = Path(tempfile.mkdtemp(prefix="fs-fuzz-"))
    try:
        for d in ("rw", "ro", "outside"):
            (base / d).mkdir()
        (base / "outside" / "secret").write_bytes(b"SECRET")
        for d in ("rw", "ro"):
            (base / d / "f").write_bytes(b"data")
            (base / d / "sub").mkdir()
            os.symlink(base / "outside", base / d / "link")
            os.mkfifo(base / d / "fifo")
        table = make_table(rw=(str(base / "rw"), True), ro=(str(base / "ro"), False))
        try:
            yield base, Session(table)
        finally:
            table.clear()
    finally:
        shutil.rmtree(base)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_reply(req: m.Message, reply: m.Message, msize: int) -> None:
    assert reply.tag == req.tag
    assert isinstance(reply, m.Rlerror) or reply.TYPE == req.TYPE + 1
    assert len(encode(reply)) <= max(msize, 4096)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(REQUESTS, max_size=25))
def test_session_fuzz(requests: list[m.Message]) -> None:
    fds_before = open_fds()
    with playground() as (base, session):
        outside = snapshot(base / "outside")
        ro = snapshot(base / "ro")
        for req in START + requests:
            reply = session.handle(req)
            check_reply(req, reply, session.msize)
        session.close()
        assert snapshot(base / "outside") == outside
        assert snapshot(base / "ro") == ro
        assert sorted(os.listdir(base)) == ["outside", "ro", "rw"]
    assert open_fds() == fds_before  # every fid's fds were closed


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.lists(REQUESTS, min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
)
def test_mutated_stream_through_decoder_and_session(
    requests: list[m.Message], flips: list[tuple[int, int]]
) -> None:
    """What the driver does, minus sockets: bytes in, replies out, no escape."""
    stream = bytearray(b"".join(encode(r) for r in START + requests))
    prefix = sum(len(encode(r)) for r in START)
    for pos, value in flips:
        if prefix + pos < len(stream):
            stream[prefix + pos] = value
    with playground() as (base, session):
        outside = snapshot(base / "outside")
        dec = Decoder(session.msize)
        dec.feed(bytes(stream))
        try:
            while (req := dec.next_message()) is not None:
                reply = session.handle(req)
                assert reply.tag == req.tag
                encode(reply)
                dec.max_size = session.msize
        except ProtocolError:
            pass  # the driver would close the connection here
        session.close()
        assert snapshot(base / "outside") == outside
