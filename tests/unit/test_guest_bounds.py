"""A hostile guest against the daemon's real channel objects, over real unix sockets.

The guest's end of each socketpair is driven by the test the way a
compromised guest would: it floods, never reads, sends lines longer than the
protocol allows. What is asserted is what the daemon holds (its transport's
pending writes, its RSS) and what the guest sees afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumd.supervisor.console import ConsoleLog, pump
from spectrumd.supervisor.guest import MAX_FAILURE, GuestChannel, encode_run
from spectrumd.supervisor.lines import MAX_LINE, MAX_PENDING_WRITE, LineSplitter
from spectrumd.supervisor.portal import PortalChannel
from spectrumd.vmm.relay import SerialRelay

pytestmark = pytest.mark.timeout(60)

INSTANCE_LOG = "spectrumd.supervisor.instance.evil"
MiB = 1024 * 1024


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def channel_pair() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket]
]:
    """The daemon's stream pair on one end of a socketpair, the guest's raw socket on the other."""
    daemon_end, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=daemon_end)
    try:
        yield reader, writer, guest
    finally:
        writer.close()
        guest.close()


async def guest_lines(guest: socket.socket, until: Callable[[list[bytes]], bool]) -> list[bytes]:
    """What the guest reads, line by line, until ``until(lines)`` or EOF."""
    loop = asyncio.get_running_loop()
    buf, lines = b"", []
    while not until(lines):
        try:
            data = await loop.sock_recv(guest, 65536)
        except ConnectionResetError:  # the daemon aborted the port
            break
        if not data:
            break
        buf += data
        *done, buf = buf.split(b"\n")
        lines += done
    return lines


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 30]


# -- the line splitter (pure) --------------------------------------------------------


def test_an_over_long_line_is_discarded_whole() -> None:
    s = LineSplitter(10)
    assert s.feed(b"0123456789ab") == []  # over-long, its newline not seen yet
    assert s.pending == 0
    assert s.feed(b"cdef request\nok\n") == [b"ok"]  # the tail is not a line of its own
    assert s.discarded == 1
    assert s.feed(b"0123456789\n01234567890\nx") == [b"0123456789"]  # exactly 10 is fine
    assert s.discarded == 2
    assert s.feed(b"\n") == [b"x"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a", b"bb", b"\n", b"x" * 7, b"request 1\n", b"\xff"]),
        max_size=60,
    ),
    st.lists(st.integers(min_value=0, max_value=40), max_size=20),
)
def test_lines_do_not_depend_on_how_the_bytes_arrive(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    expected = [line for line in data.split(b"\n")[:-1] if len(line) <= 8]
    s = LineSplitter(8)
    got: list[bytes] = []
    pos = 0
    for cut in sorted(set(cuts)):
        got += s.feed(data[pos:cut])
        pos = max(pos, cut)
        assert s.pending <= 8
    got += s.feed(data[pos:])
    assert got == expected


# -- the portal port -------------------------------------------------------------------


async def test_a_portal_guest_that_never_reads_loses_its_channel_not_the_daemon_its_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each "request a" is answered (code 2, malformed), about 4 bytes out for 1 in:
    # unbounded, 10 MB of these made the daemon hold 38 MB.
    loop = asyncio.get_running_loop()
    async with channel_pair() as (reader, writer, guest):
        ch = PortalChannel(
            "evil", "shell", logging.getLogger(INSTANCE_LOG), reader, writer, lambda: None
        )
        serve = asyncio.ensure_future(ch.serve())
        flood = b"request a\n" * 6553
        rss_before = rss_kib()
        sent = peak = 0
        with caplog.at_level(logging.DEBUG):
            async with asyncio.timeout(30):
                while sent < 10 * MiB:
                    try:
                        await loop.sock_sendall(guest, flood)
                    except OSError:  # the daemon closed the port
                        break
                    sent += len(flood)
                    peak = max(peak, writer.transport.get_write_buffer_size())
                await serve
        grown = rss_kib() - rss_before
        assert ch.bound.closed_for_overflow
        assert sent < 10 * MiB, "the daemon kept reading from a guest that never reads"
        assert peak <= MAX_PENDING_WRITE + 64
        assert writer.transport.get_write_buffer_size() == 0  # dropped, not kept
        assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
        warned = warnings_of(caplog, INSTANCE_LOG)
        assert len(warned) == 1 and "portal" in warned[0] and "bound" in warned[0]
        # The guest sees its port closed after what the kernel still held.
        lines = await asyncio.wait_for(guest_lines(guest, lambda _: False), 10)
        assert lines and all(line.startswith(b"response a 2 ") for line in lines)


async def test_a_guest_that_reads_late_but_within_the_bound_keeps_its_port() -> None:
    async with channel_pair() as (reader, writer, guest):
        ch = PortalChannel(
            "calm", "shell", logging.getLogger(INSTANCE_LOG), reader, writer, lambda: None
        )
        serve = asyncio.ensure_future(ch.serve())
        try:
            await asyncio.get_running_loop().sock_sendall(guest, b"request a\n" * 500)
            await asyncio.sleep(0.2)
            lines = await asyncio.wait_for(guest_lines(guest, lambda ls: len(ls) >= 500), 10)
            assert len(lines) == 500 and not ch.bound.closed
        finally:
            serve.cancel()


async def test_the_line_after_an_over_long_portal_line_is_handled_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    async with channel_pair() as (reader, writer, guest):
        ch = PortalChannel(
            "evil", "shell", logging.getLogger(INSTANCE_LOG), reader, writer, lambda: None
        )
        serve = asyncio.ensure_future(ch.serve())
        try:
            with caplog.at_level(logging.DEBUG):
                for _ in range(3):
                    # The daemon reads the padding before the rest arrives: a splitter
                    # that cut the line at 4096 bytes would parse "request b" alone.
                    await loop.sock_sendall(guest, b"x" * (MAX_LINE + 1))
                    await asyncio.sleep(0.1)
                    await loop.sock_sendall(guest, b" request b\n")
                b64 = base64.b64encode(b"/nonexistent").decode()
                await loop.sock_sendall(guest, f"request c dir {b64} ro running\n".encode())
                lines = await asyncio.wait_for(guest_lines(guest, lambda ls: len(ls) >= 1), 10)
            assert lines == [b"response c 2 " + base64.b64encode(b"requests are not accepted yet")]
            assert len(warnings_of(caplog, INSTANCE_LOG)) == 1  # once, not per line
        finally:
            serve.cancel()


# -- the control port ---------------------------------------------------------------------


async def test_the_line_after_an_over_long_control_line_is_handled_alone() -> None:
    loop = asyncio.get_running_loop()
    ready: list[bool] = []
    exited: list[int] = []
    async with channel_pair() as (reader, writer, guest):
        ch = GuestChannel(reader, writer, lambda: ready.append(True), exited.append)
        run = asyncio.ensure_future(ch.run())
        await loop.sock_sendall(guest, b"garbage\xff\nexited 300\nexited -1\nexited x\n")
        await loop.sock_sendall(guest, b"x" * (MAX_LINE + 1))
        await asyncio.sleep(0.1)
        await loop.sock_sendall(guest, b" ready\n")  # the tail of the over-long line
        await loop.sock_sendall(guest, b"exited 3\n")
        guest.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(run, 10)
        assert ready == []
        assert exited == [3]
        await ch.send(encode_run("echo hi; true"))
        got = await asyncio.wait_for(guest_lines(guest, lambda ls: len(ls) >= 1), 10)
        assert got == [b"run " + base64.b64encode(b"echo hi; true")]


async def test_a_guest_failure_reaches_the_host_only_as_one_short_printable_line() -> None:
    loop = asyncio.get_running_loop()
    failed: list[str] = []
    async with channel_pair() as (reader, writer, guest):
        ch = GuestChannel(reader, writer, lambda: None, lambda _: None, on_failed=failed.append)
        run = asyncio.ensure_future(ch.run())
        hostile = [
            b"failed\n",  # no reason: dropped
            b"failed   \n",
            b"failedroot image\n",  # not the word "failed"
            b"failed \xff\xfe\n",  # not UTF-8
            b"failed root image: cannot mount /dev/vda (erofs): Invalid argument\n",
            # Terminal escapes, a bidi override and a tab reach nobody's screen.
            "failed a\x1b[31mred\u202eevil\tx\r\n".encode(),
            b"failed " + b"y" * 3000 + b"\n",
            b"failed " + b"z" * (MAX_LINE + 1) + b"\n",  # over-long: discarded whole
        ]
        await loop.sock_sendall(guest, b"".join(hostile))
        guest.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(run, 10)
    assert failed[0] == "root image: cannot mount /dev/vda (erofs): Invalid argument"
    assert failed[1] == "a?[31mred?evil?x"
    assert failed[2] == "y" * (MAX_FAILURE - 1) + "…"
    assert len(failed) == 3


async def test_a_control_guest_that_never_reads_loses_its_channel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with channel_pair() as (reader, writer, _guest):
        ch = GuestChannel(
            reader, writer, lambda: None, lambda _: None, logging.getLogger(INSTANCE_LOG)
        )
        run = asyncio.ensure_future(ch.run())
        with caplog.at_level(logging.DEBUG):
            # What Instance.send_guest does: one task per line, none waiting for the others.
            sends = [asyncio.ensure_future(ch.send(b"mount-fs\n" * 100)) for _ in range(2000)]
            await asyncio.wait_for(asyncio.gather(*sends), 10)  # none raises, none hangs
            await asyncio.wait_for(run, 10)
        assert ch.closed
        assert writer.transport.get_write_buffer_size() == 0
        assert len(warnings_of(caplog, INSTANCE_LOG)) == 1


async def test_a_control_send_waits_for_a_silent_guest_only_so_long() -> None:
    async with channel_pair() as (reader, writer, _guest):
        ch = GuestChannel(reader, writer, lambda: None, lambda _: None, send_timeout=0.3)
        # Fill the kernel's buffer, then leave more than the transport's high-water
        # mark (64 KiB) but less than the bound queued in the daemon.
        while writer.transport.get_write_buffer_size() == 0:
            writer.write(b"x" * 4096)
        assert writer.transport.get_write_buffer_size() <= 4096
        async with asyncio.timeout(10):
            await ch.send(b"y" * (128 * 1024))
        assert ch.closed
        assert writer.transport.get_write_buffer_size() == 0


# -- the console: relay (crosvm) and pump into the log ---------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="sgb.", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_the_serial_relay_holds_one_chunk_for_a_host_side_that_never_reads(
    short_dir: Path,
) -> None:
    loop = asyncio.get_running_loop()
    relay = SerialRelay(short_dir / "vmm.sock", short_dir / "host.sock")
    vmm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        vmm.connect(os.fspath(short_dir / "vmm.sock"))
        vmm.setblocking(False)
        relay.start()
        host.connect(os.fspath(short_dir / "host.sock"))
        host.setblocking(False)
        rss_before = rss_kib()
        block = bytes(range(256)) * 256
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while sent < 64 * MiB:
                    await loop.sock_sendall(vmm, block)
                    sent += len(block)
        assert sent < 8 * MiB, "the relay kept reading while the host side did not"
        assert rss_kib() - rss_before < 8 * 1024
        first = await asyncio.wait_for(loop.sock_recv(host, 1000), 5)
        assert first == block[: len(first)]  # nothing lost or reordered, only held back
    finally:
        relay.close()
        vmm.close()
        host.close()


async def test_the_console_pump_keeps_a_flood_to_the_log_bound(short_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    console = ConsoleLog(short_dir / "console.log", max_bytes=64 * 1024, keep=1)
    async with channel_pair() as (reader, _writer, guest):
        task = asyncio.ensure_future(pump(reader, console))
        rss_before = rss_kib()
        block = b"spam " * 13107
        for _ in range(80):  # 5 MiB
            await loop.sock_sendall(guest, block)
        guest.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 20)
        assert rss_kib() - rss_before < 8 * 1024
    console.close()
    sizes = sorted(p.stat().st_size for p in short_dir.iterdir())
    assert len(sizes) == 2 and all(s <= 64 * 1024 for s in sizes)
