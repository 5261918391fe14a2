"""Bounds on what a guest's line channel (control, portal) may make the daemon hold.

Pure parts and one small driver helper, shared by :mod:`.guest` and :mod:`.portal`:

- :class:`LineSplitter` turns untrusted bytes into lines of at most
  ``max_line`` bytes. A longer line is discarded whole, up to and including
  its newline: its tail is never parsed as a line of its own (a guest could
  otherwise smuggle a request past a length check by padding it in front).
  It holds at most ``max_line`` bytes whatever it is fed.
- :class:`WriteBound` watches the daemon's pending write buffer towards the
  guest. A guest that never reads its replies would otherwise make the
  daemon buffer them without end; past ``MAX_PENDING_WRITE`` the channel is
  closed and one WARNING names the instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

MAX_LINE = 4096
# What the daemon queues towards one guest channel beyond the kernel's socket
# buffer. A guest that behaves sends one request and reads one answer (a few
# hundred bytes); 256 KiB is far beyond that, and small times many instances.
MAX_PENDING_WRITE = 256 * 1024
# How long a send may wait for a guest to read before the channel is given up.
SEND_TIMEOUT = 30.0


class LineSplitter:
    """Splits untrusted bytes into complete lines (without their ``\\n``)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False  # inside an over-long line, until its newline
        self.discarded = 0  # over-long lines dropped so far

    def feed(self, untrusted_data: bytes) -> list[bytes]:
        """The lines completed by ``untrusted_data``; over-long ones are left out."""
        lines: list[bytes] = []
        start = 0
        while (nl := untrusted_data.find(b"\n", start)) >= 0:
            piece = untrusted_data[start:nl]
            start = nl + 1
            if self._discarding:
                self._discarding = False
            elif len(self._buf) + len(piece) > self.max_line:
                self._buf.clear()
                self.discarded += 1
            else:
                self._buf += piece
                lines.append(bytes(self._buf))
                self._buf.clear()
        rest = untrusted_data[start:]
        if not self._discarding and rest:
            if len(self._buf) + len(rest) > self.max_line:
                self._buf.clear()
                self._discarding = True
                self.discarded += 1
            else:
                self._buf += rest
        return lines

    @property
    def pending(self) -> int:
        """Bytes held for a line not yet complete (at most ``max_line``)."""
        return len(self._buf)


class WriteBound:
    """Closes a guest channel whose pending writes pass ``limit`` bytes."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        log: logging.Logger,
        what: str,
        limit: int = MAX_PENDING_WRITE,
    ) -> None:
        self._writer = writer
        self._log = log
        self._what = what
        self.limit = limit
        self.closed_for_overflow = False

    @property
    def closed(self) -> bool:
        return self.closed_for_overflow or self._writer.is_closing()

    def write(self, line: bytes) -> bool:
        """Queue ``line``; False (and the channel closed) if the guest is not reading."""
        if self.closed:
            return False
        self._writer.write(line)
        pending = self._writer.transport.get_write_buffer_size()
        if pending > self.limit:
            self.overflow(f"{pending} bytes of replies are waiting for it to read")
            return False
        return True

    def overflow(self, why: str) -> None:
        """Give up the channel: the guest broke a bound. Logged once."""
        if self.closed_for_overflow:
            return
        self.closed_for_overflow = True
        self._log.warning("%s: closing the channel: the guest broke a bound (%s)", self._what, why)
        # abort(), not close(): close() would keep the buffer until it is flushed,
        # which is what this guest never lets happen.
        self._writer.transport.abort()

    async def drain(self, timeout: float = SEND_TIMEOUT) -> None:
        """Wait for the guest to read, at most ``timeout`` s (then the channel is closed)."""
        if self.closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            self.overflow(f"it read nothing for {timeout:g} s")
        except ConnectionError:
            pass


async def guest_lines(
    reader: asyncio.StreamReader,
    bound: WriteBound,
    on_discard: Callable[[int], None],
    max_line: int = MAX_LINE,
) -> AsyncIterator[bytes]:
    """The guest's lines on ``reader`` until the port closes or ``bound`` is broken.

    Over-long lines are dropped whole; ``on_discard(total so far)`` is called
    after each chunk that dropped one (callers warn once, then quietly).
    """
    lines = LineSplitter(max_line)
    while not bound.closed:
        try:
            chunk = await reader.read(4096)
        except ConnectionError:
            return
        if not chunk:
            return
        before = lines.discarded
        for untrusted_line in lines.feed(chunk):
            if bound.closed:
                return
            yield untrusted_line
        if lines.discarded > before:
            on_discard(lines.discarded)
