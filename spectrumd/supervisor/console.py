"""A guest's serial console, captured to a bounded, rotated log file.

The log is ``console.log`` plus up to ``keep`` older files ``console.log.1``…
(``.1`` the newest). Rotation happens at ``max_bytes``, so a guest that prints
without end costs at most ``(keep + 1) * max_bytes`` of disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_KEEP = 3


class ConsoleLog:
    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
            )
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        self.close()
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
        if self.keep == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def write(self, data: bytes) -> None:
        """Append ``data``; small local writes, fine to do on the event loop."""
        while data:
            fd = self._open()
            room = self.max_bytes - self._size
            if room <= 0:
                self._rotate()
                continue
            chunk = data[:room]
            os.write(fd, chunk)
            self._size += len(chunk)
            data = data[len(chunk) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def pump(reader: asyncio.StreamReader, log: ConsoleLog) -> None:
    """Copy a console stream into ``log`` until EOF."""
    while chunk := await reader.read(65536):
        log.write(chunk)
