"""The host side of the guest's control port (``org.spectrum_os.control``).

Lines of UTF-8 text, each ending in ``\\n`` and at most 4096 bytes; unknown
lines are ignored by both sides (guest/README.md).

guest → host: ``ready``; ``exited N`` (the application ended with status N;
the guest then powers off).
host → guest: ``hello`` (answered with ``ready``); ``run B64`` (base64 of the
shell command line, run once); ``poweroff``.

Everything the guest sends is untrusted: a line that is too long or malformed
is dropped, never raised.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable

MAX_LINE = 4096

log = logging.getLogger(__name__)


def encode_run(command: str) -> bytes:
    return b"run " + base64.b64encode(command.encode()) + b"\n"


def parse_exited(untrusted_arg: str) -> int | None:
    if untrusted_arg.isdigit() and len(untrusted_arg) <= 3 and int(untrusted_arg) <= 255:
        return int(untrusted_arg)
    return None


class GuestChannel:
    """Reads the guest's control lines and sends the host's."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_ready: Callable[[], None],
        on_exited: Callable[[int], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_ready = on_ready
        self._on_exited = on_exited

    async def send(self, line: bytes) -> None:
        self._writer.write(line)
        await self._writer.drain()

    async def run(self) -> None:
        """Dispatch the guest's lines until the port closes."""
        buf = b""
        while chunk := await self._reader.read(4096):
            buf += chunk
            while b"\n" in buf:
                untrusted_line, buf = buf.split(b"\n", 1)
                self._dispatch(untrusted_line)
            if len(buf) > MAX_LINE:
                log.debug("dropping an over-long line from the guest")
                buf = b""

    def _dispatch(self, untrusted_line: bytes) -> None:
        if len(untrusted_line) > MAX_LINE:
            return
        try:
            words = untrusted_line.decode().strip().split(" ")
        except UnicodeDecodeError:
            return
        if words == ["ready"]:
            self._on_ready()
        elif len(words) == 2 and words[0] == "exited":
            status = parse_exited(words[1])
            if status is not None:
                self._on_exited(status)

    def close(self) -> None:
        self._writer.close()
