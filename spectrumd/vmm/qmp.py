"""A small asyncio client for QEMU's Machine Protocol (QMP).

The wire protocol (docs/interop/qmp-spec.rst in QEMU): one JSON object per
line. The server greets with ``{"QMP": {...}}``; the client must send
``qmp_capabilities`` before anything else. A command is
``{"execute": NAME, "arguments": {...}, "id": ID}`` and its answer is
``{"return": ..., "id": ID}`` or ``{"error": {"class": C, "desc": D}, "id": ID}``.
Asynchronous events ``{"event": NAME, "data": {...}, "timestamp": {...}}`` may
arrive at any time, also between a command and its reply.

One reader task owns the stream: it resolves replies by ``id`` and hands events
to a callback, so commands may be issued concurrently. QEMU is a child we
started, but it also runs guest-facing device code: a malformed message is
treated as a lost connection, never trusted further.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from spectrumd.vmm.base import EventHandler, VmmError

log = logging.getLogger(__name__)

# query-qmp-schema answers are a few hundred KiB; nothing legitimate is near this.
_LINE_LIMIT = 8 * 1024 * 1024
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

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        greeting: Mapping[str, Any],
        on_event: EventHandler,
    ) -> None:
        self.greeting = greeting
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        # Set once the connection is unusable; every later call fails with it.
        self._closed_error: VmmError | None = None
        self._closed_event = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop(), name="qmp-reader")

    # The timeout parameter: the retries need the deadline themselves.
    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        on_event: EventHandler,
        timeout: float,
    ) -> QmpClient:
        """Connect to a QMP unix socket, retrying until it answers.

        The socket appears a few milliseconds after QEMU is exec'd, so a
        missing or refusing socket is retried until ``timeout`` passes.

        Raises VmmError if no negotiated connection was made in time (the
        message names the last connection error), or if the peer does not
        speak QMP.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.005
        last_error: BaseException | None = None
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    reader, writer = await asyncio.open_unix_connection(
                        os.fspath(path), limit=_LINE_LIMIT
                    )
                    break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                last_error = e
            except TimeoutError:
                pass
            except OSError as e:
                raise VmmError(f"QMP connection to {os.fspath(path)} failed: {e}") from e
            if loop.time() + delay >= deadline:
                raise VmmError(
                    f"QMP socket {os.fspath(path)} did not answer within {timeout:g}s"
                    + (f": {last_error}" if last_error else "")
                ) from last_error
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

        try:
            async with asyncio.timeout_at(deadline):
                greeting = _parse(await reader.readline())
                if greeting is None or not isinstance(greeting.get("QMP"), dict):
                    raise VmmError(f"QMP socket {os.fspath(path)} sent no QMP greeting")
                client = cls(reader, writer, greeting, on_event)
                try:
                    await client.execute("qmp_capabilities")
                except BaseException:
                    await client.close()
                    raise
        except TimeoutError as e:
            writer.close()
            raise VmmError(f"QMP negotiation on {os.fspath(path)} timed out") from e
        except (OSError, ValueError) as e:  # ValueError: a greeting over _LINE_LIMIT
            writer.close()
            raise VmmError(f"QMP connection to {os.fspath(path)} failed: {e}") from e
        except BaseException:
            writer.close()
            raise
        return client

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        ``fds`` travel with the command as SCM_RIGHTS (``getfd``, ``add-fd``);
        QEMU gets copies, the caller keeps its own.

        Raises QmpError if QEMU refused it, VmmError if the connection is (or
        becomes) closed before the answer.
        """
        if self._closed_error is not None:
            raise VmmError(str(self._closed_error))
        cmd_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": cmd_id}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[cmd_id] = (command, fut)
        try:
            log.debug("QMP → %s%s", msg, f" with fds {list(fds)}" if fds else "")
            data = json.dumps(msg).encode() + b"\n"
            try:
                if fds:
                    await self._send_with_fds(data, fds)
                else:
                    self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                # The reader will see the EOF too and fail the future; say it now.
                raise VmmError(_CLOSED) from e
            return await fut
        finally:
            # On cancellation the late reply finds no future and is dropped.
            self._pending.pop(cmd_id, None)

    async def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Write ``data`` with ``fds`` attached, in order with buffered writes. Raises OSError.

        asyncio's transport cannot send ancillary data, so the message goes
        straight to the socket once the transport's buffer is empty (nothing
        awaits between that check and the send, so no other write slips in).
        """
        transport = self._writer.transport
        while transport.get_write_buffer_size():
            await self._writer.drain()
            await asyncio.sleep(0.001)
        raw = self._writer.get_extra_info("socket")
        if raw is None:
            raise ConnectionError("the QMP transport has no socket")
        # A dup shares the open file (and its O_NONBLOCK): sendmsg on it is a
        # write on the connection itself.
        with socket.socket(fileno=os.dup(raw.fileno())) as sock:
            try:
                sent = socket.send_fds(sock, [data], list(fds))
            except BlockingIOError as e:
                raise ConnectionError("QMP socket is not writable") from e
        if sent < len(data):
            self._writer.write(data[sent:])

    async def close(self) -> None:
        """Close the connection; pending commands fail with VmmError."""
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        self._fail_all(VmmError(_CLOSED))
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def wait_closed(self) -> None:
        """Return when the connection has ended (peer closed it, or close())."""
        await self._closed_event.wait()

    async def _read_loop(self) -> None:
        reason = _CLOSED
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except ValueError:  # line longer than _LINE_LIMIT
                    reason = f"{_CLOSED}: message too long"
                    break
                except (ConnectionError, OSError):
                    break
                if not line:
                    break
                msg = _parse(line)
                if msg is None:
                    reason = f"{_CLOSED}: malformed message"
                    break
                self._dispatch(msg)
        finally:
            self._fail_all(VmmError(reason))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        log.debug("QMP ← %s", msg)
        if "event" in msg:
            data = msg.get("data")
            try:
                self._on_event(str(msg["event"]), data if isinstance(data, dict) else {})
            except Exception as e:
                log.error("QMP event handler failed on %s: %s", msg["event"], e)
                log.debug("QMP event handler traceback", exc_info=True)
            return
        cmd_id = msg.get("id")
        entry = self._pending.get(cmd_id) if isinstance(cmd_id, int) else None
        if entry is None:
            # A reply to a cancelled call, or one we never sent an id for.
            return
        command, fut = entry
        if fut.done():
            return
        if "return" in msg:
            fut.set_result(msg["return"])
        else:
            err = msg.get("error")
            err = err if isinstance(err, dict) else {}
            fut.set_exception(
                QmpError(command, str(err.get("class", "?")), str(err.get("desc", "")))
            )

    def _fail_all(self, error: VmmError) -> None:
        if self._closed_error is None:
            self._closed_error = error
            self._closed_event.set()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(VmmError(str(error)))
        self._pending.clear()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return msg if isinstance(msg, dict) else None
