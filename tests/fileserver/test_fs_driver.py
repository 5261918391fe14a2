"""The asyncio driver: stalls stay off the loop, failures stay in one connection."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from fs9p_helpers import StreamClient, make_table

from spectrumd.fileserver.driver import serve_connection
from spectrumd.fileserver.messages import NOFID, Message, Rclunk, Tattach, Tclunk, Tversion, Twalk
from spectrumd.fileserver.session import Session


async def start(session: Session) -> tuple[StreamClient, asyncio.Task[None]]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=theirs)
    task = asyncio.create_task(serve_connection(reader, writer, session, name="test"))
    return StreamClient(ours), task


async def test_slow_operation_does_not_block_the_loop(tmp_path: Path) -> None:
    session = Session(make_table(x=(str(tmp_path), False)))
    real = session.handle

    def slow(msg: Message) -> Message:
        if isinstance(msg, Twalk):
            time.sleep(0.3)  # a stuck disk
        return real(msg)

    session.handle = slow  # type: ignore[method-assign]
    client, task = await start(session)
    await client.rpc(Tversion, 8192, b"9P2000.L")
    await client.rpc(Tattach, 0, NOFID, b"", b"", 0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    await client.rpc(Twalk, 0, 1, (b"x",))
    t.cancel()
    assert ticks >= 10  # the loop kept running during the 0.3 s walk
    client.sock.close()
    await asyncio.wait_for(task, 5)


async def test_unexpected_failure_ends_the_connection_quietly(tmp_path: Path) -> None:
    session = Session(make_table())

    def broken(msg: Message) -> Message:
        raise RuntimeError("bug")

    session.handle = broken  # type: ignore[method-assign]
    client, task = await start(session)
    with pytest.raises(ConnectionError):
        await client.rpc(Tversion, 8192, b"9P2000.L")
    await asyncio.wait_for(task, 5)  # returned, did not raise
    client.sock.close()


async def test_eof_and_cancel_release_fids(tmp_path: Path) -> None:
    session = Session(make_table(x=(str(tmp_path), False)))
    client, task = await start(session)
    await client.rpc(Tversion, 8192, b"9P2000.L")
    await client.rpc(Tattach, 0, NOFID, b"", b"", 0)
    await client.rpc(Twalk, 0, 1, (b"x",))
    assert await client.raw(Tclunk(9, 0)) == Rclunk(9)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # session.close runs on the worker thread
        if not session.fids:
            break
        await asyncio.sleep(0.01)
    assert session.fids == {}
    client.sock.close()
