"""One application instance: its state, its VMM, and the calls on it.

Calls that change the VMM (start, stop, pause, resume) hold the instance's
lock, so two of them never interleave and there are never two VMMs for one
instance. ``kill`` does not wait for the lock: it must be able to end a start
or a stop that hangs. The VMM's exit is observed in one place (``_watch``),
which alone turns it into the final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs

from spectrumd.errors import Cancelled, Failed, InvalidState, SpectrumError, Timeout
from spectrumd.lifecycle import Event, State, next_state
from spectrumd.lifecycle.machine import InvalidTransition
from spectrumd.model.types import Application, InstanceDef, Resource
from spectrumd.supervisor import process
from spectrumd.supervisor.console import ConsoleLog, pump
from spectrumd.supervisor.guest import GuestChannel, encode_run
from spectrumd.supervisor.resources import ResourceDriver, RunContext
from spectrumd.supervisor.spec import build_spec
from spectrumd.supervisor.vmrun import VMM_LOG, RunRecord, snapshot, write_record
from spectrumd.supervisor.vmrun import VmRun as _Run
from spectrumd.vmm import BACKENDS, PORT_CONTROL, VmmControl, VmmError, VmSpec

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class MachineRegistry(Protocol):
    """Where VMMs are registered as machines (systemd-machined); never raises."""

    async def register(self, name: str, pid: int) -> None: ...


@attrs.frozen
class Environment:
    """Daemon-wide settings an instance needs."""

    state_dir: Path
    guest_dir: Path
    console_max_bytes: int = 1024 * 1024
    console_keep: int = 3
    # Parts that provide resources (file server, networks, ...), in setup order.
    drivers: tuple[ResourceDriver, ...] = ()
    # (uid, gid) the VMMs run as; None: the daemon's own.
    vmm_user: tuple[int, int] | None = None
    # Registers each VMM with systemd-machined where systemd runs.
    machines: MachineRegistry | None = None
    attach_timeout: float = 30.0
    term_timeout: float = 5.0
    control_timeout: float = 10.0

    def run_dir(self, name: str) -> Path:
        return self.state_dir / "run" / name

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / name / "console.log"


ChangeListener = Callable[["Instance", frozenset[str]], None]


class Instance:
    def __init__(
        self,
        definition: InstanceDef,
        application: Application,
        resources: tuple[Resource, ...],
        env: Environment,
    ) -> None:
        self.definition = definition
        self.application = application
        self.resources = resources
        self.env = env
        self.state = State.stopped
        self.state_reason = ""
        self.main_pid = 0
        self.started_at_us = 0
        self.guest_ready = False
        self.removed = False  # dropped from the configuration; deleted once stopped
        self.listeners: list[ChangeListener] = []
        self._lock = asyncio.Lock()
        self._run: _Run | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.log = log.getChild(definition.name)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def needs_restart(self) -> bool:
        """True while the VMM runs a definition that the configuration has since changed."""
        run = self._run
        return run is not None and (
            run.stale_definition
            or run.definition != self.definition
            or run.application != self.application
            or run.resources != self.resources
        )

    @property
    def active(self) -> bool:
        return self.state in (State.starting, State.running, State.paused, State.stopping)

    # -- state ------------------------------------------------------------

    def _notify(self, changed: set[str]) -> None:
        if not changed:
            return
        frozen = frozenset(changed)
        for listener in list(self.listeners):
            try:
                listener(self, frozen)
            except Exception:
                self.log.exception("change listener failed")

    def _set(self, **values: object) -> None:
        changed = set()
        for key, value in values.items():
            if getattr(self, key) != value:
                setattr(self, key, value)
                changed.add(key)
        self._notify(changed)

    def _fire(self, event: Event, reason: str | None = None, **values: object) -> None:
        """Apply ``event`` to the state; raises InvalidState naming the current state."""
        self._check(event)
        new = next_state(self.state, event)
        if reason is not None:
            values["state_reason"] = reason
        self._set(state=new, **values)

    def _check(self, event: Event) -> None:
        """Raise InvalidState if ``event`` is not possible now, without applying it."""
        try:
            next_state(self.state, event)
        except InvalidTransition:
            raise InvalidState(
                f"cannot {event.value} {self.name}: it is {self.state.value}"
            ) from None

    def give_reason(self, reason: str) -> None:
        """Replace StateReason (e.g. to say a failed instance will not be restarted)."""
        self._set(state_reason=reason)

    def update_definition(
        self, definition: InstanceDef, application: Application, resources: tuple[Resource, ...]
    ) -> None:
        """Take a reloaded definition; a running VMM keeps the old one until restarted."""
        before = (self.definition, self.application, self.needs_restart)
        self.definition, self.application, self.resources = definition, application, resources
        after = (self.definition, self.application, self.needs_restart)
        changed = {
            k
            for k, a, b in zip(
                ("definition", "application", "needs_restart"), before, after, strict=True
            )
            if a != b
        }
        self._notify(changed)

    # -- calls -------------------------------------------------------------

    async def start(self, reason: str = "") -> None:
        """Start the VM; returns when the VMM runs and its control channel answers.

        ``reason`` becomes StateReason (a restart says what it follows).
        Raises InvalidState, Failed (missing kernel or VMM, VMM exited at start),
        Cancelled (killed while starting).
        """
        async with self._lock:
            self._fire(Event.start, reason=reason)
            run = _Run(self.definition, self.application, self.resources)
            self._run = run
            try:
                await self._start_run(run)
            except BaseException as e:
                await self._abort_start(run, e)
                raise self._start_error(run, e) from None

    def _start_error(self, run: _Run, e: BaseException) -> BaseException:
        if run.stop_reason is not None:
            return Cancelled(f"start of {self.name} was cancelled: {run.stop_reason}")
        if isinstance(e, SpectrumError | asyncio.CancelledError):
            return e
        return Failed(f"cannot start {self.name}: {e}")

    async def _abort_start(self, run: _Run, e: BaseException) -> None:
        with contextlib.suppress(Exception):
            await run.end()
        self._run = None
        if run.stop_reason is not None:
            self._fire(Event.exited, reason=run.stop_reason, main_pid=0, guest_ready=False)
        else:
            reason = str(e) if isinstance(e, SpectrumError) else f"start failed: {e}"
            if isinstance(e, asyncio.CancelledError):
                reason = "start failed: cancelled"
            self._fire(Event.crashed, reason=reason, main_pid=0, guest_ready=False)
        self.log.error("%s", self.state_reason)
        self.log.debug("start failed", exc_info=e)
        if not run.done.done():
            run.done.set_result(None)

    async def _start_run(self, run: _Run) -> None:
        backend = BACKENDS.get(run.definition.vmm)
        if backend is None:
            raise Failed(
                f"cannot start {self.name}: the {run.definition.vmm.value} backend "
                "is not available in this version of spectrumd"
            )
        ctx = RunContext(
            name=self.name,
            definition=run.definition,
            application=run.application,
            resources=run.resources,
            run_dir=self.env.run_dir(self.name),
            stack=run.stack,
            log=self.log,
        )
        shutil.rmtree(ctx.run_dir, ignore_errors=True)
        ctx.run_dir.mkdir(mode=0o700, parents=True)
        run.stack.callback(shutil.rmtree, ctx.run_dir, True)
        if self.env.vmm_user is not None:
            # The VMM creates its sockets here.
            os.chown(ctx.run_dir, *self.env.vmm_user)
        for driver in self.env.drivers:
            await driver.prepare(ctx)
        spec = build_spec(ctx, self.env.guest_dir)
        run.spec = spec
        binary = spec.binary or backend.default_binary(spec.arch)
        if shutil.which(binary) is None:
            raise Failed(f"cannot start {self.name}: VMM binary {binary} not found")
        argv = backend.argv(spec)

        self.log.debug("exec %s", argv)
        proc = await process.spawn(argv, spec.pass_fds, ctx.run_dir / VMM_LOG, self.env.vmm_user)
        run.proc = proc
        run.stack.push_async_callback(proc.reap)
        self._set(main_pid=proc.pid)
        # Recorded so that a test's cleanup can find our child even if we died.
        (spec.run_dir / "vmm.pid").write_text(f"{proc.pid}\n")
        if self.env.machines is not None:
            await self.env.machines.register(self.name, proc.pid)

        run.control = await self._attach(run, spec, proc)
        run.conns.push_async_callback(run.control.close)
        await self._connect_channels(run, spec)

        ctx.control = run.control
        for driver in self.env.drivers:
            await driver.started(ctx, spec)
        await self._control(run.control.start_cpus(), "start")
        started_at = time.time_ns() // 1000
        try:
            write_record(run, started_at, ctx.nets)
        except OSError as e:
            self.log.error("cannot record the run (it will not be re-adopted): %s", e)
        self._fire(Event.started, started_at_us=started_at)
        self._watch_run(run)
        self.log.info("started (pid %d)", proc.pid)

    async def _connect_channels(self, run: _Run, spec: VmSpec) -> None:
        """Connect the console (into the log) and the guest's control port."""
        console_r, console_w = await asyncio.open_unix_connection(spec.console_socket)
        run.conns.callback(console_w.close)
        console = ConsoleLog(
            self.env.log_path(self.name), self.env.console_max_bytes, self.env.console_keep
        )
        run.conns.callback(console.close)
        self._spawn_task(pump(console_r, console), run)

        guest_r, guest_w = await asyncio.open_unix_connection(spec.port_socket(PORT_CONTROL))
        run.guest = GuestChannel(
            guest_r,
            guest_w,
            on_ready=lambda: self._guest_ready(run),
            on_exited=lambda status: self._guest_exited(run, status),
        )
        run.conns.callback(run.guest.close)
        self._spawn_task(run.guest.run(), run)

    def _watch_run(self, run: _Run) -> None:
        task = asyncio.ensure_future(self._watch(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        run.watch = task

    async def _attach(
        self, run: _Run, spec: VmSpec, proc: process.VmmProcess, timeout: float | None = None
    ) -> VmmControl:
        """Connect the VMM's control channel, racing its exit. Raises Failed."""
        backend = BACKENDS[run.definition.vmm]
        attach = asyncio.ensure_future(
            backend.attach(
                spec,
                functools.partial(self._vmm_event, run),
                timeout if timeout is not None else self.env.attach_timeout,
            )
        )
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({attach, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if attach.done() and attach.exception() is None:
            return attach.result()
        if not attach.done():
            attach.cancel()
            with contextlib.suppress(BaseException):
                await attach
            detail = process.stderr_tail(spec.run_dir / VMM_LOG)
            raise Failed(
                f"cannot start {self.name}: {process.describe_exit(proc.returncode)}"
                + (f": {detail}" if detail else "")
            )
        err = attach.exception()
        assert err is not None
        if isinstance(err, VmmError | TimeoutError | OSError):
            raise Failed(
                f"cannot start {self.name}: no answer from the VMM's control socket: {err}"
            )
        raise err

    def _spawn_task(self, coro: Any, run: _Run | None) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if run is not None:
            run.conns.callback(task.cancel)

    def _guest_ready(self, run: _Run) -> None:
        if self._run is not run:
            return
        self._set(guest_ready=True)
        if not run.command_sent and run.guest is not None:
            run.command_sent = True
            self._spawn_task(run.guest.send(encode_run(run.application.command)), run)

    def _vmm_event(self, run: _Run, name: str, data: Mapping[str, Any]) -> None:
        self.log.debug("vmm event %s %s", name, dict(data))
        if name == "SHUTDOWN" and data.get("guest"):
            run.shutdown_reason = str(data.get("reason", ""))

    def _guest_exited(self, run: _Run, status: int) -> None:
        if self._run is not run or run.guest_exit is not None:
            return
        run.guest_exit = status
        self.log.info("application exited with status %d", status)
        if self.state in (State.running, State.paused):
            self._fire(Event.guest_shutdown, reason=f"application exited with status {status}")

    async def _watch(self, run: _Run) -> None:
        """Turn the VMM's exit, asked for or not, into the final state."""
        assert run.proc is not None
        returncode = await run.proc.wait()
        clean, reason = self._exit_outcome(run, returncode)
        await run.end()
        self._run = None
        final = dict(main_pid=0, started_at_us=0, guest_ready=False)
        if clean:
            if self.state != State.stopping:
                self._fire(Event.guest_shutdown)
            self._fire(Event.exited, reason=reason, **final)
        else:
            self._fire(Event.crashed, reason=reason, **final)
            self.log.error("%s", reason)
        self.log.info("%s: %s", self.state.value, self.state_reason)
        run.done.set_result(None)

    @staticmethod
    def _exit_outcome(run: _Run, returncode: int | None) -> tuple[bool, str]:
        """(clean, reason) of a VMM exit: asked for, the guest's own power-off, or a crash."""
        if run.stop_reason is not None:
            return True, run.stop_reason
        if run.guest_exit is not None:
            return run.guest_exit == 0, f"application exited with status {run.guest_exit}"
        if run.shutdown_reason == "guest-shutdown":
            return True, "the guest powered off"
        if run.shutdown_reason in ("guest-reset", "guest-panic"):
            return False, f"the guest crashed or rebooted ({run.shutdown_reason})"
        said = None if returncode is None else BACKENDS[run.definition.vmm].exit_reason(returncode)
        if said is not None:
            return said
        reason = process.describe_exit(returncode)
        last = process.stderr_tail(run.spec.run_dir / VMM_LOG) if run.spec else ""
        if returncode is not None and returncode > 0 and last:
            reason += f": {last}"
        return False, reason

    async def stop(self) -> None:
        """Graceful stop: power button → stop timeout → SIGTERM → SIGKILL.

        Returns when the VMM has exited; StateReason says which step ended it.
        Raises InvalidState.
        """
        async with self._lock:
            run = self._run
            was_paused = self.state == State.paused
            self._fire(Event.stop)
            assert run is not None and run.proc is not None and run.control is not None
            timeout = run.definition.stop_timeout
            run.stop_reason = "the guest shut down after the power button"
            try:
                # The whole graceful step is bounded: a VMM that does not even
                # answer QMP (stopped, wedged) must not hold the stop up.
                async with asyncio.timeout(timeout):
                    try:
                        if was_paused:
                            await run.control.resume()
                        await run.control.powerdown()
                    except VmmError as e:
                        self.log.info("power button not delivered: %s", e)
                    await asyncio.shield(run.done)
                return
            except TimeoutError:
                pass
            run.stop_reason = f"the vmm exited when asked, after the {timeout:g} s stop timeout"
            with contextlib.suppress(VmmError, TimeoutError):
                async with asyncio.timeout(self.env.term_timeout):
                    if await run.control.request_exit():
                        await asyncio.shield(run.done)
                        return
            run.stop_reason = f"vmm terminated with SIGTERM after the {timeout:g} s stop timeout"
            run.proc.send_signal(signal.SIGTERM)
            if await self._wait_done(run, self.env.term_timeout):
                return
            run.stop_reason = (
                f"vmm killed with SIGKILL; SIGTERM did not end it "
                f"within {self.env.term_timeout:g} s"
            )
            run.proc.send_signal(signal.SIGKILL)
            await asyncio.shield(run.done)

    async def _wait_done(self, run: _Run, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(run.done), timeout)
        except TimeoutError:
            return False
        return True

    async def kill(self) -> None:
        """SIGKILL the VMM now (also during a start or a stop). Raises InvalidState."""
        run = self._run
        self._fire(Event.kill)
        assert run is not None
        run.stop_reason = "killed"
        if run.proc is not None:
            run.proc.send_signal(signal.SIGKILL)
        await asyncio.shield(run.done)

    async def pause(self) -> None:
        """Freeze the guest's CPUs. Raises InvalidState, Failed."""
        async with self._lock:
            self._check(Event.pause)
            run = self._run
            assert run is not None and run.control is not None
            await self._control(run.control.pause(), "pause")
            self._fire(Event.pause)

    async def resume(self) -> None:
        """Let a paused guest run again. Raises InvalidState, Failed."""
        async with self._lock:
            self._check(Event.resume)
            run = self._run
            assert run is not None and run.control is not None
            await self._control(run.control.resume(), "resume")
            self._fire(Event.resume)

    async def with_control(self, what: str, fn: Callable[[VmmControl], Awaitable[_T]]) -> _T:
        """Run ``fn`` on the running VMM's control channel, serialized with the
        other calls. Raises InvalidState unless the instance is running or paused."""
        async with self._lock:
            if self.state not in (State.running, State.paused):
                raise InvalidState(f"cannot {what} {self.name}: it is {self.state.value}")
            run = self._run
            assert run is not None and run.control is not None
            return await fn(run.control)

    def send_guest(self, line: bytes) -> None:
        """Send one control line to the running guest, if it is connected."""
        run = self._run
        if run is not None and run.guest is not None:
            self._spawn_task(run.guest.send(line), run)

    async def _control(self, call: Coroutine[Any, Any, None], what: str) -> None:
        """Run one VMM control call, bounded in time.

        Raises Timeout; InvalidState if a kill or stop ended the VMM meanwhile
        (the call lost its channel because the instance is going away, not
        because the host failed); Failed otherwise.
        """
        try:
            async with asyncio.timeout(self.env.control_timeout):
                await call
        except VmmError as e:
            if self.state not in (State.starting, State.running, State.paused):
                raise InvalidState(f"cannot {what} {self.name}: it is {self.state.value}") from None
            raise Failed(f"cannot {what} {self.name}: {e}") from None
        except TimeoutError:
            raise Timeout(
                f"cannot {what} {self.name}: the VMM did not answer within "
                f"{self.env.control_timeout:g} s"
            ) from None

    # -- daemon restarts ----------------------------------------------------------

    async def adopt(self, record: RunRecord) -> None:
        """Take back a VMM that an earlier daemon left running.

        Never raises: a VMM that has exited meanwhile gives ``failed`` with
        "exited while spectrumd was not running"; one that cannot be taken
        back is ended, and the instance is ``failed`` with the reason.
        """
        proc = process.adopt(record.pid, record.start_time)
        if proc is None:
            shutil.rmtree(record.spec.run_dir, ignore_errors=True)
            self._set(state=State.failed, state_reason="exited while spectrumd was not running")
            self.log.warning("%s", self.state_reason)
            return
        async with self._lock:
            run = _Run(self.definition, self.application, self.resources)
            run.stale_definition = record.snapshot != snapshot(
                self.definition, self.application, self.resources
            )
            run.proc, run.spec, run.command_sent = proc, record.spec, True
            run.stack.callback(shutil.rmtree, record.spec.run_dir, True)
            run.stack.push_async_callback(proc.reap)
            self._run = run
            try:
                paused = await self._reconnect(run, record)
            except Exception as e:
                self.log.debug("re-adoption failed", exc_info=True)
                await run.end()
                self._run = None
                self._set(state=State.failed, state_reason=f"could not re-adopt the VMM: {e}")
                self.log.error("%s", self.state_reason)
                return
            self._fire(
                Event.adopted,
                reason="re-adopted after a daemon restart",
                main_pid=proc.pid,
                started_at_us=record.started_at_us,
            )
            if paused:
                self._fire(Event.pause)
            self._watch_run(run)
            self.log.info("re-adopted (pid %d)", proc.pid)

    async def _reconnect(self, run: _Run, record: RunRecord) -> bool:
        """Reconnect the control channel, console, guest and drivers; True if paused."""
        spec = record.spec
        assert run.proc is not None
        run.control = await self._attach(run, spec, run.proc, self.env.control_timeout)
        run.conns.push_async_callback(run.control.close)
        await self._connect_channels(run, spec)
        assert run.guest is not None
        await run.guest.send(b"hello\n")  # the guest answers "ready"
        ctx = RunContext(
            name=self.name,
            definition=run.definition,
            application=run.application,
            resources=run.resources,
            run_dir=spec.run_dir,
            stack=run.stack,
            log=self.log,
            control=run.control,
        )
        for driver in self.env.drivers:
            await driver.adopt(ctx, spec)
        return await run.control.query_status() == "paused"

    async def detach(self) -> None:
        """Leave the VMM running and drop the daemon's hold on it (daemon exit)."""
        run = self._run
        if run is None:
            return
        if run.watch is not None:
            run.watch.cancel()
        await run.detach()
        self._run = None

    async def shutdown_tasks(self) -> None:
        """Cancel helper tasks (daemon exit); the VMM is left as it is."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
