"""QEMU's Machine Protocol through the QEMU project's own library (``qemu.qmp``).

``qemu.qmp.QMPClient`` does the protocol: the greeting, capability
negotiation, commands matched to replies by id, events, and descriptors sent
with SCM_RIGHTS (``send_fd_scm``, for ``getfd`` and ``add-fd``). This module
adds what the supervisor needs around it:

- connecting by retrying until the socket answers (QEMU creates it a few
  milliseconds after exec), within a deadline; a re-adopted QEMU after a daemon
  restart is reached the same way, by a new connection to its socket;
- errors as :class:`~spectrumd.vmm.base.VmmError` (QmpError when QEMU refused a
  command), so nothing above the vmm layer sees the library's types;
- events drained from the library's queue into one callback as they come, so
  a VMM that floods events costs no memory, and a read limit far below the
  library's 10 MB: QEMU runs guest-facing device code and is not trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from spectrumd.aio import held
from spectrumd.vmm.base import EventHandler, VmmError

log = logging.getLogger(__name__)

# Our replies are small (query-status, add-fd); nothing legitimate is near this.
_READ_LIMIT = 1024 * 1024
_CLOSED = "QMP connection closed"


class QmpError(VmmError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    """A negotiated QMP connection. Create with :meth:`connect`."""

    def __init__(self, client: QMPClient, on_event: EventHandler) -> None:
        self._qmp = client
        self._on_event = on_event
        self._events = asyncio.ensure_future(self._pump_events())
        self._ended: asyncio.Task[None] | None = None
        # However the connection ends (QEMU's exit, close(), even a close
        # cancelled before it ran), the library's disconnect runs to its end:
        # cut short, it leaves its tasks pending and their errors unread.
        self._lifetime = asyncio.ensure_future(self._end_with_connection())

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], on_event: EventHandler, timeout: float
    ) -> QmpClient:
        """Connect to a QMP unix socket, retrying until it answers or ``timeout`` passes.

        Raises VmmError if no negotiated connection was made in time (the
        message names the last connection error), or if the peer does not
        speak QMP.
        """
        where = os.fspath(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sock = await _connect_unix(where, deadline, timeout)
        qmp = QMPClient(f"qmp {os.path.basename(os.path.dirname(where))}", _READ_LIMIT)
        # The library's connect is cancelled at most once (a deadline, a Kill):
        # its own clean-up awaits a disconnect that a second cancellation would
        # break, which it logs as a bug of its own.
        connecting = held(qmp.connect(sock))
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(connecting)
        except BaseException as e:
            connecting.cancel()
            await asyncio.shield(held(_end_connect(qmp, connecting, sock)))
            if isinstance(e, TimeoutError):
                raise VmmError(f"QMP negotiation on {where} timed out") from None
            if isinstance(e, QMPError | OSError):
                raise VmmError(f"QMP connection to {where} failed: {e}") from None
            raise
        # The library's transport owns the socket from now on.
        return cls(qmp, on_event)

    @property
    def closed(self) -> bool:
        return self._qmp.runstate is not Runstate.RUNNING

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        ``fds`` travel before the command as SCM_RIGHTS (``getfd``, ``add-fd``
        take the last one received); QEMU gets copies, the caller keeps its own.
        Calls that pass descriptors must not run concurrently (the supervisor
        serializes control calls per instance).

        Raises QmpError if QEMU refused it, VmmError if the connection is (or
        becomes) closed before the answer.
        """
        if self.closed:
            raise VmmError(_CLOSED)
        log.debug(
            "QMP → %s %s%s", command, arguments or {}, f" with fds {list(fds)}" if fds else ""
        )
        try:
            for fd in fds:
                self._qmp.send_fd_scm(fd)
            return await self._qmp.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as e:
            raise QmpError(command, e.error_class, str(e)) from None
        except (QMPError, OSError) as e:
            log.debug("QMP %s: %s", command, e)
            raise VmmError(_CLOSED) from None

    async def _pump_events(self) -> None:
        async for event in self._qmp.events:
            data = event.get("data", {})
            try:
                self._on_event(str(event.get("event", "")), data if isinstance(data, dict) else {})
            except Exception:
                log.exception("QMP event handler failed")

    async def close(self) -> None:
        """Close the connection; pending commands fail with VmmError.

        A cancelled caller stops waiting; the close itself runs to its end.
        """
        await asyncio.shield(self._end())

    def _end(self) -> asyncio.Task[None]:
        if self._ended is None:
            self._events.cancel()
            self._ended = held(_disconnect(self._qmp))
        return self._ended

    async def _end_with_connection(self) -> None:
        await self.wait_closed()
        await self._end()

    async def wait_closed(self) -> None:
        """Return when the connection has ended (QEMU exited, or close())."""
        while self._qmp.runstate is Runstate.RUNNING:
            await self._qmp.runstate_changed()


async def _connect_unix(where: str, deadline: float, timeout: float) -> socket.socket:
    """A connected socket to ``where``, retrying while it does not exist or refuses.

    Raises VmmError at the deadline or on any other error.
    """
    loop = asyncio.get_running_loop()
    delay = 0.005
    last: OSError | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, where)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            last = e
        except TimeoutError:
            pass
        except OSError as e:
            sock.close()
            raise VmmError(f"QMP connection to {where} failed: {e}") from None
        sock.close()
        if loop.time() + delay >= deadline:
            raise VmmError(
                f"QMP socket {where} did not answer within {timeout:g}s"
                + (f": {last}" if last else "")
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def _end_connect(qmp: QMPClient, connecting: asyncio.Task[None], sock: socket.socket) -> None:
    """After a failed or cancelled connect: its own clean-up, then ours."""
    await asyncio.wait({connecting})
    await _disconnect(qmp)
    sock.close()


async def _disconnect(qmp: QMPClient) -> None:
    # disconnect() re-raises whatever broke the connection; it is closed either way.
    with contextlib.suppress(Exception):
        await qmp.disconnect()
