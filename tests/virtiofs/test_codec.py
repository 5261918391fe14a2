"""The FUSE codec: request parsing, reply layouts as include/uapi/linux/fuse.h has them."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumd.virtiofs import protocol as P

from .fusereq import init_body, name, read_body, request, setattr_body

pytestmark = pytest.mark.timeout(30)


def test_header_sizes_match_the_kernel() -> None:
    assert P.IN_HEADER.size == 40 and P.OUT_HEADER.size == 16
    assert P.ATTR.size == 88 and P.ENTRY_HEAD.size + P.ATTR.size == 128  # fuse_entry_out
    assert P.ATTR_OUT_HEAD.size + P.ATTR.size == 104  # fuse_attr_out
    assert P.WRITE_IN.size == 40 and P.DIRENT.size == 24


def test_requests_round_trip() -> None:
    r = P.parse_request(request(P.LOOKUP, 5, name(b"file"), unique=99))
    assert (r.opcode, r.unique, r.nodeid, r.uid, r.gid, r.pid, r.args) == (
        P.LOOKUP, 99, 5, 1000, 1000, 42, b"file"
    )  # fmt: skip
    init = P.parse_request(request(P.INIT, 0, init_body(7)))
    assert init.args == P.InitIn(7, 38, 1 << 17, 7)
    sa = P.parse_request(request(P.SETATTR, 3, setattr_body(P.FATTR_MODE | P.FATTR_SIZE,
                                                              mode=0o644, size=12, fh=4)))  # fmt: skip
    assert (sa.args.valid, sa.args.mode, sa.args.size, sa.args.fh) == (9, 0o644, 12, 4)
    rd = P.parse_request(request(P.READ, 0, read_body(8, 4096, 65536)))
    assert rd.args == P.ReadIn(8, 4096, 65536, 0)
    cr = P.parse_request(request(P.CREATE, 2, struct.pack("<IIII", os.O_RDWR, 0o600, 0o22, 0)
                                 + name(b"new")))  # fmt: skip
    assert cr.args == P.CreateIn(os.O_RDWR, 0o600, b"new")
    mk = P.parse_request(request(P.MKDIR, 2, struct.pack("<II", 0o755, 0) + name(b"d")))
    assert mk.args == P.CreateIn(0, 0o755, b"d")
    rn = P.parse_request(request(P.RENAME, 2, struct.pack("<Q", 3) + name(b"a") + name(b"b")))
    assert rn.args == P.RenameIn(3, 0, b"a", b"b")
    rn2 = P.parse_request(request(P.RENAME2, 2, struct.pack("<QII", 3, 1, 0) + b"a\0b\0"))
    assert rn2.args == P.RenameIn(3, 1, b"a", b"b")
    bf = P.parse_request(request(P.BATCH_FORGET, 0, struct.pack("<IIQQQQ", 2, 0, 5, 1, 6, 2)))
    assert bf.args == [(5, 1), (6, 2)]
    fg = P.parse_request(request(P.FORGET, 5, struct.pack("<Q", 3)))
    assert fg.args == 3
    wr = P.parse_request(request(P.WRITE, 0, struct.pack("<QQIIQII", 4, 0, 10, 0, 0, 0, 0))[:80])
    assert wr.args == P.ReadIn(4, 0, 10, 0)
    assert P.parse_request(request(1234, 1)).args is None  # unknown: parsed header, no args


@pytest.mark.parametrize(
    "data,err",
    [
        (b"", errno.EINVAL),
        (request(P.LOOKUP, 1, b"no-nul"), errno.EINVAL),
        (request(P.LOOKUP, 1, b"x" * 300 + b"\0"), errno.ENAMETOOLONG),
        (request(P.READ, 0, b"short"), errno.EINVAL),
        (request(P.BATCH_FORGET, 0, struct.pack("<II", 1000, 0)), errno.EINVAL),
        (request(P.RENAME, 1, struct.pack("<Q", 3) + b"a\0b"), errno.EINVAL),
        (struct.pack("<I", 1 << 20) + request(P.GETATTR, 1)[4:], errno.EINVAL),  # len > data
        (request(P.GETATTR, 1)[:36] + struct.pack("<HH", 8, 0), errno.EINVAL),  # extensions
    ],
)
def test_bad_requests_name_their_errno(data: bytes, err: int) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(data)
    assert e.value.errno == err


def test_reply_layouts() -> None:
    st_ = os.stat("/")
    assert len(P.encode_entry(5, st_, (1, 0), (0, 0))) == 128
    assert struct.unpack_from("<Q", P.encode_entry(5, st_, (1, 0), (0, 0)))[0] == 5
    assert len(P.encode_attr_out(st_, (0, 0))) == 104
    init = P.encode_init(1 << 17, P.MAX_PAGES, 1 << 20, 256)
    assert len(init) == 64
    assert struct.unpack_from("<IIIIHHIIH", init) == (7, 31, 1 << 17, P.MAX_PAGES, 16, 12,
                                                      1 << 20, 1, 256)  # fmt: skip
    assert len(P.encode_open(3, P.FOPEN_DIRECT_IO)) == 16
    assert len(P.encode_statfs(os.statvfs("/"))) == 80
    assert P.out_header(9, errno.ENOENT, 0) == struct.pack("<IiQ", 16, -errno.ENOENT, 9)
    d = P.encode_dirent(7, 1, 4, b"abc")
    assert len(d) == 32 == P.dirent_size(b"abc", False) and d[24:27] == b"abc"
    assert P.dirent_size(b"abc", True) == 160


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    try:
        P.parse_request(data)
    except P.ProtocolError as e:
        assert e.errno > 0
