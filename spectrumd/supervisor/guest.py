"""The host side of the guest's control port (``org.spectrum_os.control``).

Lines of UTF-8 text, each ending in ``\\n`` and at most 4096 bytes; unknown
lines are ignored by both sides (guest/README.md).

guest → host: ``ready``; ``exited N`` (the application ended with status N;
the guest then powers off); ``failed TEXT`` (the guest cannot run the
application, e.g. its root image does not mount; it then powers off).
host → guest: ``hello`` (answered with ``ready``); ``run B64`` (base64 of the
shell command line, run once); ``poweroff``.

Everything the guest sends is untrusted: a line that is too long (discarded
whole, up to its newline) or malformed is dropped, never raised. A failure's
TEXT ends up in StateReason, before a person's eyes: it is cut to
``MAX_FAILURE`` characters, and anything but printable characters becomes
``?`` (no escape sequences, no line breaks, no bidi controls). A guest that
leaves more than ``MAX_PENDING_WRITE`` bytes unread, or reads nothing for
``SEND_TIMEOUT`` while a send waits, loses the channel (see :mod:`.lines`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable

from spectrumd.supervisor.lines import SEND_TIMEOUT, WriteBound, guest_lines

log = logging.getLogger(__name__)

# Enough for "root image: cannot mount /dev/pmem0 (erofs): Invalid argument".
MAX_FAILURE = 200


def encode_run(command: str) -> bytes:
    return b"run " + base64.b64encode(command.encode()) + b"\n"


def parse_exited(untrusted_arg: str) -> int | None:
    if untrusted_arg.isdigit() and len(untrusted_arg) <= 3 and int(untrusted_arg) <= 255:
        return int(untrusted_arg)
    return None


def parse_failed(untrusted_text: str) -> str | None:
    """The guest's reason for ``failed TEXT``, fit to show; None when there is none."""
    text = "".join(c if c.isprintable() else "?" for c in untrusted_text.strip())
    if not text:
        return None
    if len(text) > MAX_FAILURE:
        text = text[: MAX_FAILURE - 1] + "…"
    return text


class GuestChannel:
    """Reads the guest's control lines and sends the host's."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_ready: Callable[[], None],
        on_exited: Callable[[int], None],
        logger: logging.Logger = log,
        send_timeout: float = SEND_TIMEOUT,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        # ``logger``: the instance's own, so that a warning names the instance.
        self._reader = reader
        self._writer = writer
        self._on_ready = on_ready
        self._on_exited = on_exited
        self._on_failed = on_failed
        self._log = logger
        self._bound = WriteBound(writer, logger, "control")
        self._warned_discard = False
        self._send_timeout = send_timeout

    @property
    def closed(self) -> bool:
        return self._bound.closed

    async def send(self, line: bytes) -> None:
        """Send one line; a guest that does not read loses the channel (never raises)."""
        if self._bound.write(line):
            await self._bound.drain(self._send_timeout)

    async def run(self) -> None:
        """Dispatch the guest's lines until the port closes."""

        def discarded(total: int) -> None:
            # Once at WARNING: a guest must not be able to flood the journal.
            level = logging.WARNING if self._warned_discard is False else logging.DEBUG
            self._warned_discard = True
            self._log.log(level, "control: discarded an over-long line (%d)", total)

        async for untrusted_line in guest_lines(self._reader, self._bound, discarded):
            self._dispatch(untrusted_line)

    def _dispatch(self, untrusted_line: bytes) -> None:
        try:
            text = untrusted_line.decode()
        except UnicodeDecodeError:
            return
        words = text.strip().split(" ")
        if words[0] == "failed" and self._on_failed is not None:
            reason = parse_failed(text.strip().removeprefix("failed"))
            if reason is not None:
                self._on_failed(reason)
        elif words == ["ready"]:
            self._on_ready()
        elif len(words) == 2 and words[0] == "exited":
            status = parse_exited(words[1])
            if status is not None:
                self._on_exited(status)

    def close(self) -> None:
        self._writer.close()
