"""End to end: the real server process, driven by FileServerClient, spoken to in 9P."""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fs9p_helpers import NinePError, StreamClient

from spectrumd.fileserver.client import FileServerClient, FileServerError
from spectrumd.fileserver.codec import decode_dirents
from spectrumd.fileserver.messages import (
    IOHDRSZ,
    NOFID,
    Tattach,
    Tclunk,
    Tgetattr,
    Tlcreate,
    Tlopen,
    Tmkdir,
    Tread,
    Treaddir,
    Tversion,
    Twalk,
    Twrite,
)

REPO = Path(__file__).resolve().parents[2]
MSIZE = 512 * 1024


async def start_server(sock_path: Path, *extra: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spectrumd.fileserver", "--control", str(sock_path), *extra,
        env=env, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def stop_server(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FileServerClient]:
    proc = await start_server(tmp_path / "ctl.sock")
    client = FileServerClient(timeout=10)
    try:
        await client.connect(str(tmp_path / "ctl.sock"))
        yield client
    finally:
        client.close()
        await stop_server(proc)
    assert proc.returncode == 0  # a clean exit on SIGTERM


async def connect_9p(client: FileServerClient, instance: str, msize: int = MSIZE) -> StreamClient:
    ours, theirs = socket.socketpair()
    try:
        await client.serve(instance, theirs)
    finally:
        theirs.close()  # the server holds its own copy now
    c = StreamClient(ours)
    reply = await c.rpc(Tversion, msize, b"9P2000.L")
    assert reply.msize == msize
    await c.rpc(Tattach, 0, NOFID, b"", b"", 0)
    return c


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "readme").write_bytes(b"read only")
    return ro, rw


async def test_large_io_with_512k_msize(server: FileServerClient, dirs: tuple[Path, Path]) -> None:
    ro, rw = dirs
    await server.set_exports("vm1", {"docs": (str(ro), False), "work": (str(rw), True)})
    c = await connect_9p(server, "vm1")
    await c.rpc(Tlopen, 0, 0)
    listing = decode_dirents((await c.rpc(Treaddir, 0, 0, 8192)).data)
    assert [n for *_, n in listing] == [b"docs", b"work"]

    payload = os.urandom(6 * 1024 * 1024 + 123)
    chunk = MSIZE - IOHDRSZ
    await c.rpc(Twalk, 0, 1, (b"work",))
    await c.rpc(Tlcreate, 1, b"big.bin", os.O_RDWR, 0o644, 0)
    start = time.monotonic()
    for off in range(0, len(payload), chunk):
        assert (await c.rpc(Twrite, 1, off, payload[off : off + chunk])).count == len(
            payload[off : off + chunk]
        )
    assert (rw / "big.bin").read_bytes() == payload
    got = bytearray()
    while data := (await c.rpc(Tread, 1, len(got), 1 << 30)).data:
        assert len(data) <= MSIZE - 11  # bounded by msize, whatever was asked
        got += data
    assert got == payload
    assert time.monotonic() - start < 10
    attr = await c.rpc(Tgetattr, 1, 0x7FF)
    assert attr.size == len(payload)

    await c.rpc(Twalk, 0, 2, (b"docs",))
    with pytest.raises(NinePError) as e:
        await c.rpc(Tmkdir, 2, b"x", 0o755, 0)
    assert e.value.errno == errno.EROFS
    c.sock.close()


async def test_frame_over_msize_ends_only_that_connection(
    server: FileServerClient, dirs: tuple[Path, Path]
) -> None:
    _, rw = dirs
    await server.set_exports("vm2", {"work": (str(rw), True)})
    bad = await connect_9p(server, "vm2", msize=8192)
    good = await connect_9p(server, "vm2")
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(bad.sock, struct.pack("<IBH", 8193, Twrite.TYPE, 1) + b"\0" * 8186)
    assert await asyncio.wait_for(loop.sock_recv(bad.sock, 100), 5) == b""  # closed
    await good.rpc(Twalk, 0, 1, (b"work",))
    # Garbage that frames badly is also the end of that stream only.
    junk = await connect_9p(server, "vm2")
    await loop.sock_sendall(junk.sock, b"\x03\0\0\0garbage")
    assert await asyncio.wait_for(loop.sock_recv(junk.sock, 100), 5) == b""
    await good.rpc(Tclunk, 1)
    for c in (bad, good, junk):
        c.sock.close()


async def test_live_exports_and_drop(server: FileServerClient, dirs: tuple[Path, Path]) -> None:
    ro, rw = dirs
    await server.set_exports("vm3", {"docs": {"path": str(ro), "writable": False}})
    c = await connect_9p(server, "vm3")
    await c.rpc(Twalk, 0, 1, (b"docs", b"readme"))
    await c.rpc(Tlopen, 1, 0)
    assert (await c.rpc(Tread, 1, 0, 100)).data == b"read only"
    await server.set_exports("vm3", {"work": (str(rw), True)})
    with pytest.raises(NinePError) as e:
        await c.rpc(Tread, 1, 0, 100)
    assert e.value.errno == errno.EIO
    await c.rpc(Twalk, 0, 2, (b"work",))
    await server.drop("vm3")
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(c.rpc(Tclunk, 2), 5)
    await server.drop("vm3")  # idempotent
    c.sock.close()


async def test_bad_commands_name_the_problem(server: FileServerClient, tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    cases = [
        ({"docs": ("relative/path", False)}, "docs"),
        ({"docs": (str(tmp_path / "missing"), False)}, "No such file"),
        ({"docs": (str(tmp_path / "file"), False)}, "Not a directory"),
        ({"docs": (str(tmp_path) + "/../x", False)}, "canonical"),
        ({"a/b": (str(tmp_path), False)}, "a/b"),
        ({"..": (str(tmp_path), False)}, ".."),
        ({"docs": {"path": str(tmp_path), "writable": "yes"}}, "writable"),
    ]
    for exports, needle in cases:
        with pytest.raises(FileServerError, match=needle):
            await server.set_exports("vm4", exports)  # type: ignore[arg-type]
    r, w = os.pipe()
    try:
        with pytest.raises(FileServerError, match="not a socket"):
            await server.serve("vm4", r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(FileServerError, match="instance"):
        await server.drop("")
    # The server is still fine afterwards.
    await server.set_exports("vm4", {"docs": (str(tmp_path), False)})


async def test_connect_failure_is_clear(tmp_path: Path) -> None:
    client = FileServerClient()
    with pytest.raises(FileServerError, match="cannot connect"):
        await client.connect(str(tmp_path / "nobody-here.sock"), timeout=0.2)
    with pytest.raises(FileServerError, match="not connected"):
        await client.drop("x")


async def test_control_fd_mode_exits_with_its_daemon() -> None:
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spectrumd.fileserver", "--control-fd", str(theirs.fileno()),
        pass_fds=[theirs.fileno()], env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    theirs.close()
    client = FileServerClient()
    client.attach(ours)
    try:
        await client.drop("nothing")
    finally:
        client.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_user_drop_privileges() -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    base = Path(tempfile.mkdtemp(prefix="fs-user-", dir="/tmp"))
    try:
        os.chmod(base, 0o777)
        (base / "world").write_bytes(b"hi")
        os.chmod(base / "world", 0o644)
        (base / "private").write_bytes(b"root only")
        os.chmod(base / "private", 0o600)
        proc = await start_server(base / "ctl.sock", "--user", "nobody")
        client = FileServerClient(timeout=10)
        try:
            await client.connect(str(base / "ctl.sock"))
            await client.set_exports("vm5", {"x": (str(base), True)})
            c = await connect_9p(client, "vm5")
            await c.rpc(Twalk, 0, 1, (b"x", b"world"))
            await c.rpc(Tlopen, 1, 0)  # reopened through /proc/self/fd as nobody
            assert (await c.rpc(Tread, 1, 0, 10)).data == b"hi"
            await c.rpc(Twalk, 0, 2, (b"x", b"private"))
            with pytest.raises(NinePError) as e:
                await c.rpc(Tlopen, 2, 0)
            assert e.value.errno == errno.EACCES
            await c.rpc(Twalk, 0, 3, (b"x",))
            await c.rpc(Tlcreate, 3, b"made", os.O_RDWR, 0o644, 0)
            assert os.stat(base / "made").st_uid == nobody.pw_uid
            c.sock.close()
        finally:
            client.close()
            await stop_server(proc)
    finally:
        shutil.rmtree(base)
