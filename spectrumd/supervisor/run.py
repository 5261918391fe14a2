"""One VMM run of one instance, as one object.

A :class:`Run` owns everything one VMM needs and does all the work on it:
spawning, attaching its control channel, reconnecting after a daemon
restart, watching its exit, the stop's escalation and the teardown. Its
state-machine decisions are the instance's (``Instance`` applies the
lifecycle table to what the run reports through :class:`RunEvents`).

Two exit stacks:

- ``stack``: what lives as long as the VMM (the process and its reap, the run
  directory, taps, file-server exports). Closed when the VMM has ended.
- ``conns``: the daemon's connections to it (the control channel, console,
  guest channel, helper tasks). Closed when the VMM ends, and also when the
  daemon exits and leaves the VMM running for the next daemon to adopt.

Cancellation: a start (or a re-adoption) runs as one task, the run's scope.
:meth:`kill` cancels that scope and SIGKILLs the VMM, so a Kill ends a start
at whatever step it is in. A Stop during a start (:meth:`end_within`) cancels
the scope too, then ends the VMM as a Stop does before the teardown: the
power button only if the guest's CPUs may have run, else SIGTERM and
SIGKILL. The watcher resolves a started run in a ``finally``, so a run
always ends, and ``done`` is always set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs

from spectrumd.errors import Cancelled, Failed, SpectrumError
from spectrumd.host import sandbox
from spectrumd.host.uids import InstanceIds
from spectrumd.lifecycle import Event, ExitFacts, exit_event
from spectrumd.model.types import Accel, Application, InstanceDef, Resource, VmmKind
from spectrumd.supervisor import process
from spectrumd.supervisor.console import ConsoleLog, pump
from spectrumd.supervisor.control import BoundedControl
from spectrumd.supervisor.env import Environment
from spectrumd.supervisor.guest import GuestChannel, encode_run
from spectrumd.supervisor.resources import RunContext
from spectrumd.supervisor.spec import build_spec
from spectrumd.supervisor.vmrun import (
    PID_FILE,
    RUN_TOKEN,
    VMM_LOG,
    RunRecord,
    snapshot,
    write_record,
)
from spectrumd.vmm import BACKENDS, PORT_CONTROL, VmmBackend, VmmError, VmSpec
from spectrumd.vmm.base import VMM_DIR

KVM = Path("/dev/kvm")
PROC = Path("/proc")
# How long a VMM's exit waits for the guest's last control lines to be read.
GUEST_DRAIN_TIMEOUT = 1.0
# How StateReason begins after a Stop that came during the start.
STOPPED_IN_START = "stopped during its start"


def kvm_groups() -> tuple[int, ...]:
    """The group of /dev/kvm, if it is not root's: what a VMM under KVM joins."""
    try:
        gid = os.stat(KVM).st_gid
    except OSError:
        return ()
    return (gid,) if gid != 0 else ()


_T = TypeVar("_T")


class RunEvents(Protocol):
    """What a run reports to its instance (which applies the lifecycle table)."""

    def vmm_spawned(self, pid: int) -> None: ...

    def guest_ready(self) -> None: ...

    def guest_exited(self, status: int) -> None: ...

    def guest_failed(self, reason: str) -> None:
        """The guest said it cannot run the application (``reason`` is validated)."""

    def vmm_ended(self, event: Event, reason: str) -> None:
        """The watcher's verdict on a started run's exit (``exited`` or ``crashed``)."""


@attrs.define(eq=False)
class Run:
    name: str
    definition: InstanceDef
    application: Application
    resources: tuple[Resource, ...]
    env: Environment
    events: RunEvents
    log: logging.Logger
    stack: contextlib.AsyncExitStack = attrs.Factory(contextlib.AsyncExitStack)
    conns: contextlib.AsyncExitStack = attrs.Factory(contextlib.AsyncExitStack)
    proc: process.VmmProcess | None = None
    spec: VmSpec | None = None
    control: BoundedControl | None = None
    guest: GuestChannel | None = None
    # Set before a stop step or a kill: the reason the exit will be reported with.
    stop_reason: str | None = None
    # Set when a part the VM cannot run without failed (fail()): a crash's reason.
    failure: str | None = None
    guest_exit: int | None = None
    # What the guest said with "failed TEXT" (validated, bounded): the exit's reason.
    guest_failure: str | None = None
    command_sent: bool = False
    # QMP SHUTDOWN's reason: "guest-shutdown" (powered off), "guest-reset", "guest-panic".
    shutdown_reason: str | None = None
    # Adopted from an earlier daemon whose configuration differed.
    stale_definition: bool = False
    started_at_us: int = 0
    ids: InstanceIds | None = None
    # Put in the VMM's environment: the next daemon adopts a pid only if it has it.
    token: str = attrs.Factory(lambda: secrets.token_hex(16))
    done: asyncio.Future[None] = attrs.Factory(lambda: asyncio.get_running_loop().create_future())
    _scope: asyncio.Task[Any] | None = None
    _ending: asyncio.Task[None] | None = None
    _guest_reader: asyncio.Task[None] | None = None
    # A Stop came during the start: its stop timeout.
    _stop_in_start: float | None = None
    # The guest's CPUs may have run (crosvm from its spawn; QEMU once asked to).
    _cpus_may_have_run: bool = False
    _killed: bool = False
    _tasks: set[asyncio.Task[Any]] = attrs.Factory(set)

    @property
    def backend(self) -> VmmBackend:
        backend = BACKENDS.get(self.definition.vmm)
        if backend is None:
            raise Failed(
                f"cannot start {self.name}: the {self.definition.vmm.value} backend "
                "is not available in this version of spectrumd"
            )
        return backend

    # -- start and re-adoption ------------------------------------------------

    async def start(self) -> None:
        """Spawn the VMM, attach, connect, hand it to the drivers, start its CPUs.

        On any failure everything made so far is torn down and ``done`` is set.
        Raises Cancelled (a kill), SpectrumError, Failed.
        """
        await self._in_scope(self._start())

    async def adopt(self, record: RunRecord, proc: process.VmmProcess) -> bool:
        """Reconnect to a VMM an earlier daemon left running; True if it is paused.

        Raises like :meth:`start`; on failure the VMM is ended.
        """
        self.proc, self.command_sent = proc, True
        self.started_at_us = record.started_at_us
        if self.env.uids is not None:
            # Taken back at daemon start from what the kernel says the VMM runs as.
            self.ids = self.env.uids.ids_of(self.name)
            self.stack.callback(self.env.uids.release, self.name)
        self.spec = attrs.evolve(record.spec, vmm_uid=self.ids.vmm if self.ids else None)
        self.stale_definition = record.snapshot != snapshot(
            self.definition, self.application, self.resources
        )
        self.stack.callback(shutil.rmtree, self.env.run_dir(self.name), True)
        self.stack.push_async_callback(proc.reap)
        paused: bool = await self._in_scope(self._reconnect(self.spec))
        return paused

    async def _in_scope(self, coro: Coroutine[Any, Any, _T]) -> _T:
        scope: asyncio.Task[_T] = asyncio.ensure_future(coro)
        self._scope = scope
        try:
            result = await asyncio.shield(scope)
        except BaseException as e:
            outer = not scope.done()
            if outer:
                # Our caller was cancelled, not the scope: end the scope too.
                scope.cancel()
                with contextlib.suppress(BaseException):
                    await scope
            await self._end_in_start()
            await self._abort()
            if outer:
                raise
            raise self._start_error(e) from None
        else:
            if self._stop_in_start is None:
                return result
            # The Stop came as the last step finished: the guest runs, and is
            # stopped like any other before the start reports its cancellation.
            await self._end_in_start()
            await self._abort()
            raise self._start_error(asyncio.CancelledError())
        finally:
            self._scope = None

    def _start_error(self, e: BaseException) -> BaseException:
        if self.failure is not None:
            return Failed(f"cannot start {self.name}: {self.failure}")
        if self.stop_reason is not None:
            return Cancelled(f"start of {self.name} was cancelled: {self.stop_reason}")
        if isinstance(e, SpectrumError):
            return e
        return Failed(f"cannot start {self.name}: {e}")

    async def _abort(self) -> None:
        with contextlib.suppress(Exception):
            await self.end()
        if not self.done.done():
            self.done.set_result(None)

    def _context(self, spec_run_dir: Any) -> RunContext:
        return RunContext(
            name=self.name,
            definition=self.definition,
            application=self.application,
            resources=self.resources,
            run_dir=spec_run_dir,
            stack=self.stack,
            conns=self.conns,
            log=self.log,
            fail=self.fail,
            ids=self.ids,
        )

    async def _start(self) -> None:
        backend = self.backend
        ctx = self._context(self.env.run_dir(self.name))
        # Root's own: the VMM reaches nothing here but what it inherits.
        shutil.rmtree(ctx.run_dir, ignore_errors=True)
        ctx.run_dir.mkdir(mode=0o700, parents=True)
        os.chmod(ctx.run_dir, 0o700)
        self.stack.callback(shutil.rmtree, ctx.run_dir, True)
        self.ids = self._allocate_ids()
        ctx.ids = self.ids
        if backend.vmm_connects:
            # A VMM that connects to its sockets (crosvm) and makes its control
            # socket needs a directory of its own; the daemon reads nothing there.
            # It reaches it by searching the run directory (no read, no write).
            os.chmod(ctx.run_dir, 0o711)
            vmm_dir = ctx.run_dir / VMM_DIR
            vmm_dir.mkdir(mode=0o700)
            if self.ids is not None:
                os.chown(vmm_dir, self.ids.vmm, self.ids.vmm)
        for driver in self.env.drivers:
            await driver.prepare(ctx)
        spec = self._open_disks(build_spec(ctx, self.env.guest_dir))
        self.spec = spec
        name = spec.binary or backend.default_binary(spec.arch)
        binary = shutil.which(name)
        if binary is None:
            raise Failed(f"cannot start {self.name}: VMM binary {name} not found")
        argv = backend.argv(spec)
        self.log.debug("exec %s", argv)
        proc = await self._spawn(argv, spec, self._confine(spec, Path(binary)))
        self._cpus_may_have_run = not backend.cpus_held
        self.events.vmm_spawned(proc.pid)
        if self.env.machines is not None:
            await self.env.machines.register(self.name, proc.pid)

        await self._attach(spec, proc, self.env.attach_timeout)
        await self._connect_channels(spec)
        assert self.control is not None
        ctx.control = self.control
        for driver in self.env.drivers:
            await driver.started(ctx, spec)
        # Set before the call: once asked, they may run even if the answer never comes.
        self._cpus_may_have_run = True
        await self.control.start_cpus()
        self.started_at_us = time.time_ns() // 1000
        try:
            write_record(proc, spec, self.definition, self._snapshot(), ctx.nets,
                         self.started_at_us, self.token)  # fmt: skip
        except OSError as e:
            self.log.error("cannot record the run (it will not be re-adopted): %s", e)

    def _open_disks(self, spec: VmSpec) -> VmSpec:
        """Open the disk images for the VMM (the parent opens, the child inherits): the
        VMM's own uid need not be able to open them. Raises Failed naming the file."""
        if self.backend.kind is not VmmKind.qemu:
            return spec  # crosvm opens its --block paths itself
        wanted = [(d.path, d.writable) for d in spec.disks]
        if spec.root_image is not None and not spec.share_root:
            wanted.insert(0, (spec.root_image, False))
        fds: list[tuple[Path, tuple[int, ...]]] = []
        for path, writable in wanted:
            opened = []
            for mode in (os.O_RDONLY, os.O_RDWR) if writable else (os.O_RDONLY,):
                try:
                    fd = os.open(path, mode | os.O_CLOEXEC)
                except OSError as e:
                    why = e.strerror or e
                    raise Failed(f"cannot start {self.name}: cannot open {path}: {why}") from None
                self.stack.callback(os.close, fd)
                opened.append(fd)
            fds.append((path, tuple(opened)))
        return attrs.evolve(spec, disk_fds=tuple(fds))

    def _allocate_ids(self) -> InstanceIds | None:
        """This run's own uids (VMM, file server), released when the run has ended."""
        uids = self.env.uids
        if uids is None:
            self.log.warning(
                "the VMM runs as root and unconfined (--unsafe-unconfined-vmm): a compromised "
                "VMM owns the host"
            )
            return None
        ids = uids.allocate(self.name)
        self.stack.callback(uids.release, self.name)
        return ids

    def _confine(self, spec: VmSpec, binary: Path) -> sandbox.Prepared | None:
        """The VMM's confinement: its uid, Landlock over what it may read and write."""
        if self.ids is None:
            return None
        read = [spec.kernel, *([spec.initrd] if spec.initrd else [])]
        read_write: list[Path] = []
        if spec.root_image is not None:
            read.append(spec.root_image)
        for disk in spec.disks:
            (read_write if disk.writable else read).append(disk.path)
        groups: tuple[int, ...] = ()
        if spec.accel is Accel.kvm and KVM.exists():
            # (Without it the VMM itself says that KVM is missing.)
            read_write.append(KVM)
            groups = kvm_groups()
        programs: tuple[Path, ...] = sandbox.PROGRAMS
        if not binary.resolve().is_relative_to("/usr"):
            programs = (*programs, binary.resolve().parent)
        own: tuple[Path, ...] = ()
        if self.backend.kind is VmmKind.crosvm:
            own = (spec.run_dir / VMM_DIR,)
            # crosvm lists and dups its descriptors through /proc/self/fd (also the
            # USB devices it is given as /proc/self/fd/N). Other processes' files
            # there stay closed to it: they belong to other uids.
            read.append(PROC)
        conf = sandbox.Confinement(
            uid=self.ids.vmm,
            gid=self.ids.vmm,
            groups=groups,
            programs=programs,
            read=tuple(read),
            read_write=tuple(read_write),
            own=own,
        )
        prepared = sandbox.prepare(conf, self.env.landlock_abi)
        self.stack.callback(prepared.close)
        return prepared

    def _snapshot(self) -> str:
        return snapshot(self.definition, self.application, self.resources)

    async def _spawn(
        self, argv: list[str], spec: VmSpec, confined: sandbox.Prepared | None
    ) -> process.VmmProcess:
        """Spawn the VMM; a cancellation during the spawn still gets the child reaped."""
        spawning = asyncio.ensure_future(
            process.spawn(
                argv,
                spec.pass_fds,
                spec.run_dir / VMM_LOG,
                None if confined is None else confined.enter,
                {
                    RUN_TOKEN: self.token,
                    # For people (ps e) and tests: whose VMM this is.
                    "SPECTRUM_INSTANCE": self.name,
                    "SPECTRUM_STATE_DIR": str(self.env.state_dir),
                },
                pid_file=spec.run_dir / PID_FILE,
            )
        )
        try:
            proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                late = await spawning
                self.proc = late  # a Stop ends it with SIGTERM first
                self.stack.push_async_callback(late.reap)
            raise
        self.proc = proc
        self.stack.push_async_callback(proc.reap)
        return proc

    async def _reconnect(self, spec: VmSpec) -> bool:
        assert self.proc is not None
        await self._attach(spec, self.proc, self.env.control_timeout)
        await self._connect_channels(spec)
        assert self.guest is not None and self.control is not None
        self.spawn_task(self.guest.send(b"hello\n"))  # the guest answers "ready"
        ctx = self._context(spec.run_dir)
        ctx.control = self.control
        for driver in self.env.drivers:
            await driver.adopt(ctx, spec)
        status = await self.control.query_status()
        return status == "paused"

    async def _attach(self, spec: VmSpec, proc: process.VmmProcess, timeout: float) -> None:
        """Connect the VMM's control channel, racing its exit. Raises Failed."""
        attach = asyncio.ensure_future(self.backend.attach(spec, self._vmm_event, timeout))
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({attach, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not attach.done():
                attach.cancel()
                with contextlib.suppress(BaseException):
                    await attach
        if attach.cancelled():
            detail = process.stderr_tail(spec.run_dir / VMM_LOG)
            raise Failed(
                f"cannot start {self.name}: {process.describe_exit(proc.returncode)}"
                + (f": {detail}" if detail else "")
            )
        err = attach.exception()
        if err is None:
            self.control = BoundedControl(attach.result(), self.name, self.env.control_timeout)
            self.conns.push_async_callback(self.control.close)
            return
        if isinstance(err, VmmError | TimeoutError | OSError):
            raise Failed(
                f"cannot start {self.name}: no answer from the VMM's control socket: {err}"
            )
        raise err

    async def _connect_channels(self, spec: VmSpec) -> None:
        """Connect the console (into the log) and the guest's control port."""
        console_r, console_w = await asyncio.open_unix_connection(spec.console_socket)
        self.conns.callback(console_w.close)
        console = ConsoleLog(
            self.env.log_path(self.name), self.env.console_max_bytes, self.env.console_keep
        )
        self.conns.callback(console.close)
        self.spawn_task(pump(console_r, console))

        guest_r, guest_w = await asyncio.open_unix_connection(spec.port_socket(PORT_CONTROL))
        self.guest = GuestChannel(
            guest_r,
            guest_w,
            on_ready=self._guest_ready,
            on_exited=self._guest_exited,
            logger=self.log,
            on_failed=self._guest_failed,
        )
        self.conns.callback(self.guest.close)
        self._guest_reader = asyncio.ensure_future(self.guest.run())
        self._tasks.add(self._guest_reader)
        self._guest_reader.add_done_callback(self._tasks.discard)
        self.conns.callback(self._guest_reader.cancel)

    def spawn_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A helper task that ends with the run's connections."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.conns.callback(task.cancel)

    def _guest_ready(self) -> None:
        self.events.guest_ready()
        if not self.command_sent and self.guest is not None:
            self.command_sent = True
            self.spawn_task(self.guest.send(encode_run(self.application.command)))

    def _guest_exited(self, status: int) -> None:
        if self.guest_exit is not None:
            return
        self.guest_exit = status
        self.events.guest_exited(status)

    def _guest_failed(self, reason: str) -> None:
        if self.guest_failure is not None:
            return
        self.guest_failure = reason
        self.events.guest_failed(reason)

    def _vmm_event(self, name: str, data: Mapping[str, Any]) -> None:
        self.log.debug("vmm event %s %s", name, dict(data))
        if name == "SHUTDOWN" and data.get("guest"):
            self.shutdown_reason = str(data.get("reason", ""))

    def send_guest(self, line: bytes) -> None:
        """Send one control line to the guest, if it is connected."""
        if self.guest is not None:
            self.spawn_task(self.guest.send(line))

    # -- watching ----------------------------------------------------------------

    def watch(self) -> None:
        """Watch the started VMM; its exit becomes ``events.vmm_ended``."""
        task = asyncio.ensure_future(self._watch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        assert self.proc is not None
        returncode: int | None = None
        try:
            returncode = await self.proc.wait()
        except asyncio.CancelledError:
            raise  # the daemon exits and leaves the VMM running (detach)
        except Exception:
            # Whatever broke the wait, the run is resolved: never a run left hanging.
            self.log.exception("watching the VMM failed; ending it")
        await self._drain_guest()
        event, reason = exit_event(self._exit_facts(returncode))
        with contextlib.suppress(Exception):
            await self.end()
        if not self.done.done():
            self.events.vmm_ended(event, reason)
            self.done.set_result(None)

    async def _drain_guest(self) -> None:
        """Read what the guest sent before its VMM exited: a "failed" or "exited"
        written just before the power-off may still be in the socket. The VMM's
        exit closes the socket, so this is quick; it is bounded all the same."""
        if self._guest_reader is not None:
            # asyncio.wait: neither the reader's error nor its cancellation is ours.
            await asyncio.wait({self._guest_reader}, timeout=GUEST_DRAIN_TIMEOUT)

    def _exit_facts(self, returncode: int | None) -> ExitFacts:
        described = process.describe_exit(returncode)
        last = process.stderr_tail(self.spec.run_dir / VMM_LOG) if self.spec else ""
        if returncode is not None and returncode > 0 and last:
            described += f": {last}"
        said = None if returncode is None else self.backend.exit_reason(returncode)
        return ExitFacts(
            failure=self.failure,
            stop_reason=self.stop_reason,
            guest_exit=self.guest_exit,
            guest_failure=self.guest_failure,
            shutdown_reason=self.shutdown_reason,
            backend_said=said,
            described=described,
        )

    # -- ending ----------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the VMM now, and cancel a start or re-adoption under way."""
        self.stop_reason = "killed"
        self._killed = True
        if self._scope is not None and not self._scope.done():
            self._scope.cancel()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)

    def fail(self, reason: str) -> None:
        """A part the VM cannot run without failed: end the VMM (and a start under
        way) now; its exit is a crash with ``reason``. Ignored once a stop or a
        kill is under way, or the VMM has ended."""
        if self.stop_reason is not None or self.failure is not None or self.done.done():
            return
        if self.proc is not None and not self.proc.running:
            return
        self.failure = reason
        self.log.error("%s; ending the VM", reason)
        if self._scope is not None and not self._scope.done():
            self._scope.cancel()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)

    def end_within(self, timeout: float, *, powerdown: bool, was_paused: bool = False) -> None:
        """Make sure the VMM ends: the power button (if ``powerdown``), ``timeout``,
        then the VMM's own exit request, SIGTERM and SIGKILL. Idempotent: a
        second call joins the escalation under way.

        During a start it cancels the rest of the start; the start then ends the
        VMM (:meth:`_end_in_start`) and fails with Cancelled. A start that has
        already failed is being torn down: the stop joins that.
        """
        scope = self._scope
        if scope is not None:
            failed = scope.done() and (scope.cancelled() or scope.exception() is not None)
            if self._stop_in_start is None and not failed:
                self._stop_in_start = timeout
                if self.stop_reason is None:
                    self.stop_reason = STOPPED_IN_START
                scope.cancel()
            return
        if self._ending is None and not self.done.done():
            ending = self._escalate(timeout, powerdown, was_paused, self.done)
            self._ending = asyncio.ensure_future(ending)
            self._tasks.add(self._ending)

    async def _end_in_start(self) -> None:
        """A Stop came during the start: end the VMM as a Stop does, before the
        teardown (whose reap would SIGKILL it at once)."""
        timeout = self._stop_in_start
        if timeout is None or self._killed:
            return
        if self.proc is None:
            self._reason(f"{STOPPED_IN_START}, before its VMM was spawned")
            return
        if not self.proc.running:
            return
        ended = asyncio.ensure_future(self.proc.wait())
        # The button needs the control channel, and a guest whose CPUs never ran
        # cannot act on it: then there is no guest to wait for.
        button = self.control is not None and self._cpus_may_have_run
        try:
            await self._escalate(
                timeout if button else None, button, False, ended, f"{STOPPED_IN_START}: "
            )
        finally:
            ended.cancel()

    def _reason(self, reason: str) -> None:
        """The reason the exit will be reported with, unless a kill came meanwhile."""
        if not self._killed:
            self.stop_reason = reason

    async def _escalate(
        self,
        timeout: float | None,
        powerdown: bool,
        was_paused: bool,
        ended: asyncio.Future[Any],
        prefix: str = "",
    ) -> None:
        """The stop's steps until ``ended`` is done; ``timeout`` None: no guest to wait
        for (its CPUs never ran), SIGTERM at once."""
        assert self.proc is not None
        control = self.control
        term = self.env.term_timeout
        after = ""
        if timeout is not None:
            if await self._graceful(timeout, powerdown, was_paused, ended, prefix):
                return
            after = f" after the {timeout:g} s stop timeout"
            self._reason(f"{prefix}the vmm exited when asked{after}")
            with contextlib.suppress(VmmError, SpectrumError, TimeoutError):
                async with asyncio.timeout(term):
                    if control is not None and await control.request_exit():
                        await asyncio.shield(ended)
                        return
        self._reason(f"{prefix}vmm terminated with SIGTERM{after}")
        self.proc.send_signal(signal.SIGTERM)
        if await _within(ended, term):
            return
        self._reason(f"{prefix}vmm killed with SIGKILL; SIGTERM did not end it within {term:g} s")
        self.proc.send_signal(signal.SIGKILL)

    async def _graceful(
        self,
        timeout: float,
        powerdown: bool,
        was_paused: bool,
        ended: asyncio.Future[Any],
        prefix: str,
    ) -> bool:
        """The power button (if asked) and the wait for the guest, all within
        ``timeout``; True if the VMM has ended."""
        try:
            async with asyncio.timeout(timeout):
                if powerdown:
                    self._reason(f"{prefix}the guest shut down after the power button")
                    try:
                        assert self.control is not None
                        if was_paused:
                            await self.control.resume()
                        await self.control.powerdown()
                    except (VmmError, SpectrumError) as e:
                        # The button cannot reach the guest: waiting for it is pointless.
                        self.log.info("power button not delivered: %s", e)
                        return False
                await asyncio.shield(ended)
                return True
        except TimeoutError:
            return False

    async def end(self) -> None:
        """Tear everything down, in reverse order: connections first, then the VMM's things."""
        with contextlib.suppress(Exception):
            await self.conns.aclose()
        await self.stack.aclose()

    async def detach(self) -> None:
        """Drop the daemon's connections and leave the VMM running (daemon exit)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self.conns.aclose()
        if self.proc is not None:
            self.proc.close()


async def _within(fut: asyncio.Future[Any], timeout: float) -> bool:
    """True if ``fut`` is done within ``timeout`` (it is not cancelled on expiry)."""
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        return False
    return True
