"""Files for a VM: one virtio-fs backend per running instance.

Every instance's VM gets a virtio-fs device (tag ``spectrum``) served by a
process of its own, ``python -m spectrumd.virtiofs``, so that directories
granted at run time can appear without a new device. The backend holds only
descriptors: the vhost-user connection to the VMM, a listening control
socket, and one directory descriptor per export, which the daemon opens
(with no symlink in any component) and passes; it opens no path itself. It
confines itself (``--confine``: the run's own file-server uid, an empty
mount namespace, no network, seccomp) before it reads a byte from the guest.

- **Start**: ``prepare`` (before the VMM is spawned) starts the backend and
  makes the VMM's end of the vhost-user connection ``spec.fs_fd`` (QEMU: one
  end of a socketpair; crosvm connects to a socket the daemon listens on).
  In ``started`` (before the guest runs) the backend's first answer on its
  control socket says it is confined and serving; its record (pid, start
  time, token) is written next to the run's, and the exports are sent.
- **Exports** change live (:meth:`FileService.set_exports`, used by grants):
  the difference is sent as ``add_export``/``remove_export``.
- **Daemon restart**: the backend keeps serving the guest. The next daemon
  adopts it like a VMM (pidfd, start time, executable, token) and connects
  to its control socket again (``fs-control.sock``, in the root-only run
  directory).
- **Backend death**: QEMU cannot reconnect a vhost-user-fs device, so the
  guest's file requests would hang for good. A backend that dies while its
  VMM runs ends the VM (``RunContext.fail``): the instance is ``failed``
  with a reason naming the file server, and restarts by its policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Mapping

import attrs

from spectrumd.errors import Failed, SpectrumError
from spectrumd.host.paths import open_directory
from spectrumd.model.types import DirectoryResource, Resource, VmmKind
from spectrumd.supervisor import process
from spectrumd.supervisor.resources import RunContext
from spectrumd.supervisor.statefile import write_atomically
from spectrumd.supervisor.vmrun import FS_PID_FILE, RUN_TOKEN
from spectrumd.virtiofs import jail
from spectrumd.virtiofs.client import ControlClient, ControlError
from spectrumd.virtiofs.spin import DEFAULT_POLL_MAX_US
from spectrumd.vmm.base import FS_VHOST_SOCKET, VMM_DIR, VmSpec

log = logging.getLogger(__name__)

FS_LOG = "fs.log"
FS_RECORD = "fs.json"
FS_CONTROL = "fs-control.sock"
# How long a backend has to end by itself once its VMM has gone.
EXIT_WAIT = 2.0
# In the backend's environment: whose file server it is (tests and ps find it).
ENV_INSTANCE = "SPECTRUM_FILESERVER"


@attrs.frozen
class Export:
    """One entry of an instance's tree: a host directory, and whether it is writable."""

    path: str
    writable: bool = False
    # The directory as a grant holds it (an O_PATH fd, the holder's): given to
    # the backend as it is, not resolved again. None: opened from ``path``.
    held_fd: int | None = attrs.field(default=None, eq=False)


# entry name → what it exports
Exports = dict[str, Export]


def exports_of(resources: tuple[Resource, ...]) -> Exports:
    return {
        r.name: Export(str(r.path), r.writable)
        for r in resources
        if isinstance(r, DirectoryResource)
    }


@attrs.define(eq=False)
class _Backend:
    """One instance's backend, as the daemon holds it."""

    name: str
    proc: process.VmmProcess
    control: ControlClient
    token: str = ""
    # Runs confined (--confine): it takes only detached exports (jail.detach).
    confined: bool = True
    # What the backend serves now; None: a name found at re-adoption, as it was.
    exports: dict[str, Export | None] = attrs.Factory(dict)
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    # Why the daemon ended it (a removal it could not confirm), for the VM's failure.
    ended_because: str | None = None


class FileService:
    """A ResourceDriver for directory resources: one backend per running instance."""

    def __init__(
        self,
        state_dir: os.PathLike[str] | str,
        control_timeout: float = 10.0,
        *,
        poll_max_us: int = DEFAULT_POLL_MAX_US,
    ) -> None:
        self.state_dir = os.fspath(state_dir)
        self.control_timeout = control_timeout
        self.poll_max_us = poll_max_us
        self._live: dict[str, _Backend] = {}
        # The VMM's ends of the vhost-user socketpairs, until the VMM has its copy.
        self._vmm_ends: dict[str, socket.socket] = {}

    # -- ResourceDriver --------------------------------------------------------

    async def prepare(self, ctx: RunContext) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        theirs: list[socket.socket] = [listener]
        try:
            listener.bind(str(ctx.run_dir / FS_CONTROL))  # root's: 0700 run dir, 0600 socket
            os.chmod(ctx.run_dir / FS_CONTROL, 0o600)
            listener.listen(4)
            if ctx.definition.vmm is VmmKind.crosvm:
                # crosvm connects to a path in the directory it owns.
                vhost = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                theirs.append(vhost)
                path = ctx.run_dir / VMM_DIR / FS_VHOST_SOCKET
                vhost.bind(str(path))
                if ctx.ids is not None:
                    os.chown(path, ctx.ids.vmm, ctx.ids.vmm)
                vhost.listen(1)
                vhost_arg = ["--vhost-listen-fd", str(vhost.fileno())]
                ctx.fs_fd = -1  # the device, without a descriptor: crosvm connects
            else:
                vmm_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                theirs.append(ours)
                # Closed once the VMM has its copy (started), or with a failed start:
                # while we hold it, the backend would not see the VMM's end.
                vmm_ends = self._vmm_ends
                vmm_ends[ctx.name] = vmm_end
                ctx.stack.callback(lambda: vmm_ends.pop(ctx.name, vmm_end).close())
                vhost_arg = ["--vhost-fd", str(ours.fileno())]
                ctx.fs_fd = vmm_end.fileno()
        except OSError as e:
            for s in theirs:
                s.close()
            why = f"cannot make the file server's sockets: {e}"
            raise Failed(f"cannot start {ctx.name}: {why}") from None
        argv = [sys.executable, "-m", "spectrumd.virtiofs", *vhost_arg]
        argv += ["--control-listen-fd", str(listener.fileno())]
        argv += ["--poll-max-us", str(self.poll_max_us)]
        if ctx.ids is not None:
            argv += ["--confine", f"{ctx.ids.fileserver}:{ctx.ids.fileserver}"]
        token = secrets.token_hex(16)
        try:
            proc = await process.spawn(
                argv,
                tuple(s.fileno() for s in theirs),
                ctx.run_dir / FS_LOG,
                None,  # it confines itself once its modules are loaded
                {RUN_TOKEN: token, ENV_INSTANCE: ctx.name, "SPECTRUM_STATE_DIR": self.state_dir},
                pid_file=ctx.run_dir / FS_PID_FILE,
            )
        except OSError as e:
            raise Failed(f"cannot start {ctx.name}: cannot start its file server: {e}") from None
        finally:
            # Only the backend holds them now: if it dies, the VMM and we see it.
            for s in theirs:
                s.close()
        ctx.stack.push_async_callback(self._end, ctx.name, proc)
        # The VMM is spawned at once: QEMU waits for the backend's first
        # answers itself, and the backend's start overlaps the VMM's.
        self._live[ctx.name] = _Backend(
            ctx.name,
            proc,
            ControlClient(timeout=self.control_timeout),
            token=token,
            confined=ctx.ids is not None,
        )

    async def started(self, ctx: RunContext, spec: VmSpec) -> None:
        """Before the guest runs: the backend answers (it is confined and serving),
        is recorded, and serves the instance's directories."""
        vmm_end = self._vmm_ends.pop(ctx.name, None)
        if vmm_end is not None:
            vmm_end.close()
        backend = self._live[ctx.name]
        await self._connect(ctx, backend, "start")
        try:
            write_atomically(ctx.run_dir / FS_RECORD, _record(backend.proc, backend.token))
        except OSError as e:
            ctx.log.error("cannot record the file server (it will not be re-adopted): %s", e)
        await self._sync(backend, exports_of(ctx.resources), remove=True)

    async def adopt(self, ctx: RunContext, spec: VmSpec) -> None:
        """Take back the backend an earlier daemon left serving this VMM.

        Raises Failed if it is gone (the guest's files are: the VM is ended).
        """
        proc = _adopt_record(ctx)
        if proc is None:
            raise Failed(
                f"cannot take {ctx.name} back: its file server is gone, and the guest "
                "cannot reach its files without it"
            )
        ctx.stack.push_async_callback(self._end, ctx.name, proc)
        backend = _Backend(
            ctx.name,
            proc,
            ControlClient(timeout=self.control_timeout),
            confined=ctx.ids is not None,
        )
        names = await self._connect(ctx, backend, "take back")
        # Kept as they are; the grants' first sync (set_exports) settles the rest.
        backend.exports = dict.fromkeys(names)
        self._live[ctx.name] = backend
        await self._sync(backend, exports_of(ctx.resources), remove=False)

    async def _connect(self, ctx: RunContext, backend: _Backend, what: str) -> list[str]:
        """Connect to the backend's control socket; its exports. Raises Failed."""
        ctx.conns.callback(backend.control.close)
        watch = asyncio.ensure_future(self._watch(ctx, backend))
        ctx.conns.callback(watch.cancel)
        try:
            await backend.control.connect(ctx.run_dir / FS_CONTROL)
            return await backend.control.list_exports()
        except ControlError as e:
            detail = await _exit_detail(ctx, backend.proc) or str(e)
            raise Failed(f"cannot {what} {ctx.name}: {detail}") from None

    async def _watch(self, ctx: RunContext, backend: _Backend) -> None:
        """A backend that ends while its VMM runs ends the VM (the guest would hang)."""
        rc = await backend.proc.wait()
        if rc == 0:
            return  # it ends so when the VMM closed the connection: the VMM is going
        if rc is None:
            # Adopted: no status. If its VMM went first, the run is ending by then.
            await asyncio.sleep(1.0)
        what = process.describe_exit(rc, f"file server (pid {backend.proc.pid})")
        if backend.ended_because is not None:
            ctx.fail(f"{what}: {backend.ended_because}")
            return
        tail = process.stderr_tail(ctx.run_dir / FS_LOG)
        ctx.fail(
            f"{what}{': ' + tail if tail and rc is not None and rc > 0 else ''}; "
            "its guest cannot reach its files again (a virtio-fs device cannot reconnect)"
        )

    async def _end(self, name: str, proc: process.VmmProcess) -> None:
        """After the VMM has ended (or was never spawned): SIGTERM, then SIGKILL."""
        b = self._live.get(name)
        if b is not None and b.proc is proc:
            del self._live[name]
            b.control.close()
        # It ends by itself when the VMM's end of its connection closes; a
        # crosvm that never connected (or a start that failed before the VMM
        # ran) leaves it waiting.
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), EXIT_WAIT)
        except TimeoutError:
            log.warning("%s: the file server did not end on SIGTERM; killing it", name)
        await proc.reap()

    # -- live exports --------------------------------------------------------------

    async def set_exports(self, name: str, exports: Mapping[str, Export]) -> None:
        """Make the instance's exports ``exports`` at once (runtime grants).

        Each directory is the one a grant holds, or is opened here with no
        symlink in any component. Raises Failed naming the export that could
        not be made; the others are applied.
        """
        b = self._live.get(name)
        if b is None:
            raise Failed(f"{name} has no file server")
        await self._sync(b, exports, remove=True)

    async def _sync(self, b: _Backend, exports: Mapping[str, Export], *, remove: bool) -> None:
        """Add what ``exports`` has and the backend has not; with ``remove``, also
        remove (or replace) what differs. Raises Failed.

        A removal is done when this returns: the backend refuses the export at
        once, and this waits out the time the guest may still show attributes
        it held of it (the backend's ``settle``). A backend that does not
        confirm a removal (no answer within the control timeout, a broken
        connection) is ended, and with it the VM.
        """
        errors: list[str] = []
        settle = 0.0
        async with b.lock:
            for entry, now in list(b.exports.items()):
                want = exports.get(entry)
                if not remove or (want is not None and (now is None or now == want)):
                    continue
                try:
                    settle = max(settle, await b.control.remove_export(entry))
                except ControlError as e:
                    # It may still serve the export: revocation wins. Ending the
                    # server ends the VM (failed, saying why).
                    why = f"it did not confirm the removal of export {entry!r} ({e})"
                    if b.ended_because is None:
                        b.ended_because = why
                        log.error("%s: ending its file server: %s", b.name, why)
                        b.proc.send_signal(signal.SIGKILL)
                    errors.append(f"{why}; the file server was ended")
                    b.exports.clear()
                    break
                del b.exports[entry]
            for entry, want in exports.items() if b.ended_because is None else ():
                if entry in b.exports:
                    if b.exports[entry] is None:
                        b.exports[entry] = want
                    continue
                try:
                    fd = self._open_export(want, b.confined)
                except SpectrumError as e:
                    errors.append(f"export {entry!r}: {e.message}")
                    continue
                try:
                    await b.control.add_export(entry, fd, want.writable)
                except ControlError as e:
                    errors.append(f"cannot add {entry!r}: {e}")
                    continue
                finally:
                    os.close(fd)
                b.exports[entry] = want
        if settle:
            await asyncio.sleep(settle)
        if errors:
            raise Failed(f"{b.name}: file server: " + "; ".join(errors))

    @staticmethod
    def _open_export(export: Export, confined: bool) -> int:
        """A descriptor of the export's directory for the backend: the one a grant
        holds, or opened with no symlink in any component; for a confined backend,
        on a private copy of its mount rooted there (``..`` of it leads nowhere;
        read-only at the mount unless writable). Raises InvalidArgument, Failed."""
        held = open_directory(export.path) if export.held_fd is None else None
        fd = export.held_fd if held is None else held.fd
        assert fd is not None
        try:
            if not confined:
                return os.dup(fd)
            try:
                return jail.detach(fd, export.writable)
            except OSError as e:
                why = e.strerror or e
                raise Failed(f"cannot detach a mount for {export.path}: {why}") from None
        finally:
            if held is not None:
                held.close()


def _record(proc: process.VmmProcess, token: str) -> str:
    return json.dumps(
        {
            "pid": proc.pid,
            "start_time": proc.started,
            "token": token,
            "exe": process.executable(proc.pid),
        }
    )


def _adopt_record(ctx: RunContext) -> process.VmmProcess | None:
    """The backend of the record in the (root-only) run directory, if it is that very
    process still."""
    try:
        raw = json.loads((ctx.run_dir / FS_RECORD).read_text())
        pid, start, token, exe = (raw[k] for k in ("pid", "start_time", "token", "exe"))
        if not (isinstance(pid, int) and isinstance(start, int)):
            raise TypeError("pid and start_time must be numbers")
        return process.adopt(pid, start, str(token), str(exe))
    except (OSError, ValueError, KeyError, TypeError) as e:
        ctx.log.error("cannot read the file server's record: %s", e)
        return None


async def _exit_detail(ctx: RunContext, proc: process.VmmProcess) -> str:
    """How the backend ended, if it ends within a moment ("" if it still runs)."""
    with contextlib.suppress(TimeoutError):
        rc = await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
        tail = process.stderr_tail(ctx.run_dir / FS_LOG)
        return process.describe_exit(rc, "its file server") + (f": {tail}" if tail else "")
    return ""
