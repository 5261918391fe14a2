"""The daemon's control client against a backend that answers what the test says.

The backend is confined, not trusted: whatever it answers to a removal, the
daemon waits at most MAX_SETTLE, and an answer that is not a duration is an
error naming it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from spectrumd.virtiofs.client import MAX_SETTLE, ControlClient, ControlError


async def removal_answered(path: Path, reply: dict[str, Any]) -> float:
    """Connect a client to a one-shot server at *path* that answers *reply*."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> bytes:
        conn, _ = await loop.sock_accept(listener)
        with conn:
            line = await loop.sock_recv(conn, 4096)
            await loop.sock_sendall(conn, json.dumps(reply).encode() + b"\n")
            return line

    server = asyncio.ensure_future(serve())
    client = ControlClient(timeout=5)
    try:
        await client.connect(path)
        settle = await client.remove_export("docs")
        assert json.loads(await server) == {"op": "remove_export", "name": "docs"}
        return settle
    finally:
        client.close()
        server.cancel()
        listener.close()


@pytest.mark.parametrize(
    ("settle", "waits"),
    [(0.2, 0.2), (0, 0.0), (3, 3.0), (1e9, MAX_SETTLE), (None, 0.0)],
)
async def test_a_removal_returns_the_settle_time_bounded(
    tmp_path: Path, settle: float | None, waits: float
) -> None:
    reply: dict[str, Any] = {"ok": True}
    if settle is not None:
        reply["settle"] = settle
    assert await removal_answered(tmp_path / "c.sock", reply) == waits


@pytest.mark.parametrize("settle", ["0.2", -1, True, float("nan"), [1]])
async def test_a_settle_that_is_not_a_duration_is_an_error(tmp_path: Path, settle: Any) -> None:
    with pytest.raises(ControlError, match="remove_export: a settle that is not a duration"):
        await removal_answered(tmp_path / "c.sock", {"ok": True, "settle": settle})


async def test_an_exchange_whose_caller_is_gone_fails_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Kill cancels the caller; the exchange runs on (the next command must
    # not read this one's reply) and then times out: nobody is left to take
    # its error, and asyncio must not report it as never retrieved.
    path = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    client = ControlClient(timeout=0.3)
    try:
        await client.connect(path)
        conn, _ = listener.accept()  # it reads nothing and answers nothing
        caller = asyncio.ensure_future(client.remove_export("docs"))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.6)  # the exchange's own timeout has passed
        gc.collect()
        await asyncio.sleep(0)
        never = [r for r in caplog.records if "never retrieved" in r.getMessage()]
        assert never == []
        conn.close()
    finally:
        client.close()
        listener.close()
