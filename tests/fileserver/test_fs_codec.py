"""The sans-IO codec: round trips, framing, hostile bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumd.fileserver.codec import (
    Decoder,
    ProtocolError,
    decode_dirents,
    encode,
    encode_dirent,
)
from spectrumd.fileserver.messages import (
    ALL_MESSAGES,
    BadMessage,
    Message,
    Qid,
    Rlerror,
    Tversion,
    Twalk,
    Twrite,
)

_SAMPLES = {
    "B": 0xAB,
    "H": 0xBEEF,
    "I": 0xDEADBEEF,
    "Q": 0x0123456789ABCDEF,
    "s": b"name\xff",
    "q": Qid(0x80, 7, 1 << 63),
    "W": (b"a", b"", b"\xfe\xfd"),
    "X": (Qid(0, 1, 2), Qid(0x80, 3, 4)),
    "D": b"\0data\n" * 10,
}


def _sample(cls: type[Message]) -> Message:
    return cls(0x1234, *(_SAMPLES[c] for c in cls.FMT))  # type: ignore[call-arg]


def test_every_9p2000l_message_is_covered() -> None:
    types = {cls.TYPE for cls in ALL_MESSAGES}
    # The operations issue 5 lists, and their replies.
    for t in (100, 104, 110, 12, 14, 116, 118, 120, 24, 26, 40, 72, 76, 74, 8, 50, 108, 30):
        assert t in types and t + 1 in types
    assert 7 in types  # Rlerror


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[Message]) -> None:
    msg = _sample(cls)
    frame = encode(msg)
    assert struct.unpack_from("<IBH", frame) == (len(frame), cls.TYPE, 0x1234)
    dec = Decoder()
    dec.feed(frame)
    assert dec.next_message() == msg
    assert dec.next_message() is None
    assert dec.pending == 0


def test_byte_by_byte_and_pipelined() -> None:
    msgs = [_sample(cls) for cls in ALL_MESSAGES]
    stream = b"".join(encode(m) for m in msgs)
    dec = Decoder()
    out = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert out == msgs


def test_frame_over_max_size_is_a_protocol_error() -> None:
    dec = Decoder(max_size=8192)
    # Refused from the size field alone, before the body arrives.
    dec.feed(struct.pack("<IBH", 8193, Twrite.TYPE, 1))
    with pytest.raises(ProtocolError, match="over msize"):
        dec.next_message()


@pytest.mark.parametrize("size", [0, 1, 6])
def test_frame_under_header_is_a_protocol_error(size: int) -> None:
    dec = Decoder()
    dec.feed(struct.pack("<I", size) + b"\0" * 8)
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_unknown_type_and_malformed_body_are_bad_messages() -> None:
    dec = Decoder()
    dec.feed(struct.pack("<IBH", 7, 250, 9))
    assert dec.next_message() == BadMessage(9, 250, known=False)
    # Twalk claiming two names but carrying one.
    body = struct.pack("<IIH", 1, 2, 2) + struct.pack("<H", 1) + b"a"
    dec.feed(struct.pack("<IBH", 7 + len(body), Twalk.TYPE, 10) + body)
    assert dec.next_message() == BadMessage(10, Twalk.TYPE, known=True)
    # Trailing bytes after the last field.
    frame = encode(Rlerror(11, 2)) + b"x"
    frame = struct.pack("<I", len(frame)) + frame[4:]
    dec.feed(frame)
    assert dec.next_message() == BadMessage(11, Rlerror.TYPE, known=True)
    # The stream is still in step afterwards.
    dec.feed(encode(Tversion(12, 8192, b"9P2000.L")))
    assert dec.next_message() == Tversion(12, 8192, b"9P2000.L")


def test_bad_message_and_oversized_fields_do_not_encode() -> None:
    with pytest.raises(ValueError):
        encode(BadMessage(1, 250, known=False))
    with pytest.raises(ValueError):
        encode(Twalk(1, 0, 1, (b"x" * 70000,)))


def test_dirents_round_trip() -> None:
    recs = [(Qid(0x80, 0, 5), 1, 4, b"dir"), (Qid(0, 0, 6), 2, 8, b"f\xff")]
    data = b"".join(encode_dirent(*r) for r in recs)
    assert decode_dirents(data) == recs
    with pytest.raises(ValueError):
        decode_dirents(data[:-1])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_decoder_fuzz_random_bytes(data: bytes, chunk: int) -> None:
    dec = Decoder(max_size=4096)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
            while (m := dec.next_message()) is not None:
                assert isinstance(m, Message)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ALL_MESSAGES),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
    st.integers(0, 40),
)
def test_decoder_fuzz_mutated_frames(
    cls: type[Message], flips: list[tuple[int, int]], cut: int
) -> None:
    frame = bytearray(encode(_sample(cls)))
    for pos, value in flips:
        if pos < len(frame):
            frame[pos] = value
    frame = frame[: max(0, len(frame) - cut)]
    dec = Decoder(max_size=4096)
    dec.feed(bytes(frame))
    try:
        while (m := dec.next_message()) is not None:
            assert isinstance(m, Message)
    except ProtocolError:
        pass
