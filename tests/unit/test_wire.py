"""Replies marshalled ahead of time are byte for byte what dbus-fast would send."""

from __future__ import annotations

import io

import pytest
from dbus_fast import Message
from dbus_fast._private.unmarshaller import Unmarshaller

from spectrumd.bus.wire import MarshalledReply, marshal_body

ROWS = [
    [f"i{k:03d}", "app", "stopped", f"/org/spectrum_os/Spectrum1/instance/i{k:03d}"]
    for k in range(100)
]


def call(sender: str | None, serial: int) -> Message:
    msg = Message(destination="org.example", path="/x", member="M", serial=serial)
    msg.sender = sender
    return msg


@pytest.mark.parametrize(
    ("sender", "serial", "signature", "body"),
    [
        (":1.7", 3, "a(ssso)", [ROWS]),
        (":1.123456", 4_000_000_000, "a(ssso)", [[]]),
        (None, 1, "s", ["é"]),
        (":1.2", 77, "a(ssso)s", [ROWS[:3], "tail"]),
    ],
)
def test_same_bytes_as_dbus_fast(
    sender: str | None, serial: int, signature: str, body: list[object]
) -> None:
    reference = Message.new_method_return(call(sender, serial), signature, body)
    reference.serial = 9
    ours = MarshalledReply(call(sender, serial), signature, marshal_body(signature, body))
    ours.serial = 9
    data = ours._marshall(False)
    assert bytes(data) == bytes(reference._marshall(False))

    reader = Unmarshaller(io.BytesIO(bytes(data)))
    reader.unmarshall()
    back = reader.message
    assert back.reply_serial == serial and back.signature == signature
    assert [list(map(list, b)) if isinstance(b, list) else b for b in back.body] == body
