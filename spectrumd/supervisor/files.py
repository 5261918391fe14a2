"""The file server as the daemon runs it: one process, one connection per instance.

The server (``spectrumd.fileserver``) runs as its own, unprivileged process
and is handed, per running instance, the stream of the VMM's
``org.spectrum_os.fs`` port and the instance's exports (its ``directory``
resources, and later its grants). If the process dies, the guests see I/O
errors; the daemon starts a new one, serves every running instance again,
and asks each guest to mount anew (control line ``mount-fs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from spectrumd.errors import Failed
from spectrumd.fileserver.client import FileServerClient, FileServerError
from spectrumd.model.types import DirectoryResource, Resource
from spectrumd.supervisor import process
from spectrumd.supervisor.resources import RunContext
from spectrumd.vmm.base import PORT_FS, VmSpec

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
Exports = dict[str, tuple[str, bool]]


def exports_of(resources: tuple[Resource, ...]) -> Exports:
    return {
        r.name: (str(r.path), r.writable) for r in resources if isinstance(r, DirectoryResource)
    }


class FileService:
    """Supervises the file-server process; a ResourceDriver for directory resources."""

    def __init__(self, user: str | None = None) -> None:
        self.user = user
        self._client: FileServerClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        # Per running instance: its fs port socket path and its exports.
        self._live: dict[str, tuple[Path, Exports]] = {}
        self.on_restart: list[Callable[[str], None]] = []
        self.restarts = 0

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    async def start(self) -> None:
        """Start the server process. Raises Failed if it does not come up."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "spectrumd.fileserver", "--control-fd", str(theirs.fileno())]
        if self.user:
            argv += ["--user", self.user]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as e:
            ours.close()
            raise Failed(f"cannot start the file server: {e}") from None
        finally:
            theirs.close()
        client = FileServerClient(timeout=10.0)
        client.attach(ours)
        self._client = client
        self._watch = asyncio.ensure_future(self._watch_process(self._proc))
        log.info("file server running (pid %d, user %s)", self._proc.pid, self.user or "root")

    async def _watch_process(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self._closing:
            return
        log.error("%s; restarting it", process.describe_exit(rc, "file server"))
        if self._client is not None:
            self._client.close()
        delay = RESTART_DELAY
        while True:
            await asyncio.sleep(delay)
            try:
                await self.start()
                break
            except Failed as e:
                delay = min(delay * 2, MAX_RESTART_DELAY)
                log.error("%s; trying again in %g s", e, delay)
        self.restarts += 1
        for name, (sock_path, exports) in list(self._live.items()):
            try:
                await self._serve(name, sock_path, exports)
            except (Failed, OSError) as e:
                log.error("%s: cannot serve files again: %s", name, e)
                continue
            for cb in self.on_restart:
                cb(name)

    async def _serve(self, name: str, sock_path: Path, exports: Exports) -> None:
        client = self._client
        if client is None:
            raise Failed("the file server is not running")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.setblocking(False)
            await asyncio.get_running_loop().sock_connect(conn, str(sock_path))
            await client.set_exports(name, exports)
            await client.serve(name, conn)
        except FileServerError as e:
            raise Failed(f"file server: {e}") from None
        finally:
            conn.close()  # the server holds its own copy now

    # -- ResourceDriver --------------------------------------------------------

    async def prepare(self, ctx: RunContext) -> None:
        # Every guest gets the port, so directories granted at run time can appear.
        ctx.ports.append(PORT_FS)

    async def started(self, ctx: RunContext, spec: VmSpec) -> None:
        exports = exports_of(ctx.resources)
        sock_path = spec.port_socket(PORT_FS)
        await self._serve(ctx.name, sock_path, exports)
        self._live[ctx.name] = (sock_path, exports)
        ctx.stack.push_async_callback(self._drop, ctx.name)

    async def adopt(self, ctx: RunContext, spec: VmSpec) -> None:
        """Serve a re-adopted instance again; its guest's old mount died with the old
        server, so it is told to mount anew."""
        await self.started(ctx, spec)
        for cb in self.on_restart:
            cb(ctx.name)

    async def _drop(self, name: str) -> None:
        self._live.pop(name, None)
        if self._client is not None:
            try:
                await self._client.drop(name)
            except FileServerError as e:
                log.debug("%s: drop: %s", name, e)

    async def set_exports(self, name: str, exports: Mapping[str, tuple[str, bool]]) -> None:
        """Change a running instance's exports at once (runtime grants). Raises Failed."""
        if name not in self._live or self._client is None:
            raise Failed(f"{name} has no file-server connection")
        sock_path, _ = self._live[name]
        try:
            await self._client.set_exports(name, exports)
        except FileServerError as e:
            raise Failed(f"file server: {e}") from None
        self._live[name] = (sock_path, dict(exports))

    async def close(self) -> None:
        self._closing = True
        if self._client is not None:
            self._client.close()  # the server exits when its control socket closes
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                await process.reap_child(self._proc)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
