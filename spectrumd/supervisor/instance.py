"""One application instance: its state, its lock, and the calls on it.

The state changes only through the lifecycle table (``_fire``); the work on a
VMM is its :class:`~spectrumd.supervisor.run.Run`'s. Calls that change the
VMM (start, pause, resume, control calls, and a stop of a running or paused
VM) hold the instance's lock, so two of them never interleave and there are
never two VMMs for one instance. ``kill`` does not wait for the lock: it
cancels a start under way, or ends a stop that hangs; nor does a stop during
a start (it cancels the start) or in ``stopping`` (it joins). The run's
watcher alone turns a started VMM's exit into the final state; a start that
does not complete is resolved by ``start`` itself, through the same
:func:`~spectrumd.lifecycle.exit_event`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from typing import TypeVar

from spectrumd.errors import Cancelled, Failed, InvalidState, SpectrumError
from spectrumd.lifecycle import (
    Event,
    ExitFacts,
    InvalidTransition,
    State,
    StopPlan,
    allowed,
    exit_event,
    guest_failure_reason,
    has_vmm,
    next_state,
    stop_plan,
)
from spectrumd.model.types import Application, InstanceDef, Resource
from spectrumd.supervisor import process
from spectrumd.supervisor.env import Environment
from spectrumd.supervisor.run import Run
from spectrumd.supervisor.vmrun import RunRecord
from spectrumd.vmm import VmmControl, VmmError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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
        self._run: Run | None = None
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
        return has_vmm(self.state)

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

    def _check(self, event: Event, what: str | None = None) -> None:
        """Raise InvalidState if ``event`` is not possible now, without applying it."""
        try:
            next_state(self.state, event)
        except InvalidTransition:
            raise self._invalid(what or event.value) from None

    def _invalid(self, what: str) -> InvalidState:
        return InvalidState(f"cannot {what} {self.name}: it is {self.state.value}")

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

    # -- what the run reports (RunEvents) ----------------------------------------

    def _new_run(self) -> Run:
        events = _Events(self)
        run = Run(
            self.name, self.definition, self.application, self.resources, self.env,
            events=events, log=self.log,
        )  # fmt: skip
        events.run = run
        return run

    def _guest_exited(self, run: Run, status: int) -> None:
        self.log.info("application exited with status %d", status)
        self._guest_powers_off(run, f"application exited with status {status}")

    def _guest_failed(self, run: Run, reason: str) -> None:
        # The guest's own words (validated): logged as what the guest said.
        self.log.warning("the guest says it cannot start the application: %s", reason)
        self._guest_powers_off(run, guest_failure_reason(reason))

    def _guest_powers_off(self, run: Run, reason: str) -> None:
        if self._run is run and allowed(self.state, Event.guest_shutdown):
            # (During a start the table does not take it; the run keeps the fact
            # for its exit.)
            self._fire(Event.guest_shutdown, reason=reason)
            # The guest powers off by itself; if it does not, the stop escalates.
            run.end_within(run.definition.stop_timeout, powerdown=False)

    def _vmm_ended(self, run: Run, event: Event, reason: str) -> None:
        self._run = None
        self._fire(event, reason=reason, main_pid=0, started_at_us=0, guest_ready=False)
        if event is Event.crashed:
            self.log.error("%s", reason)
        self.log.info("%s: %s", self.state.value, self.state_reason)

    # -- calls -------------------------------------------------------------

    async def start(self, reason: str = "") -> None:
        """Start the VM; returns when the VMM runs and its control channel answers.

        ``reason`` becomes StateReason (a restart says what it follows).
        Raises InvalidState, Failed (missing kernel or VMM, VMM exited at start),
        Cancelled (killed or stopped while starting), Timeout.
        """
        async with self._lock:
            self._fire(Event.start, reason=reason)
            run = self._new_run()
            self._run = run
            try:
                await run.start()
            except BaseException as e:
                self._run = None
                why = str(e) if isinstance(e, SpectrumError) else "start failed: cancelled"
                # A kill or stop under way makes it an exit; else the start crashed.
                event, reason = exit_event(ExitFacts(stop_reason=run.stop_reason, described=why))
                self._fire(event, reason=reason, main_pid=0, guest_ready=False)
                if run.stop_reason is None:
                    self.log.error("%s", self.state_reason)
                else:
                    self.log.info("%s: %s", self.state.value, self.state_reason)
                self.log.debug("start failed", exc_info=e)
                raise
            # The watcher first: a Kill that came just as the start finished
            # (the state is stopping) is resolved by the VMM's exit like any other.
            run.watch()
            if run.stop_reason is not None:
                raise Cancelled(f"start of {self.name} was cancelled: {run.stop_reason}")
            self._fire(Event.started, started_at_us=run.started_at_us)
            self.log.info("started (pid %d)", self.main_pid)

    async def stop(self) -> None:
        """Graceful stop: power button → stop timeout → SIGTERM → SIGKILL.

        Returns when the VMM has exited; StateReason says which step ended it.
        During a start it cancels the rest of the start and ends the VMM (the
        start answers Cancelled); in ``stopping`` it joins the stop under way.
        Raises InvalidState.
        """
        plan = self._stop_plan()
        if plan.waits_for_calls:
            # A pause or control call under way ends first (each has a deadline).
            async with self._lock:
                run = self._begin_stop(self._stop_plan())
        else:
            run = self._begin_stop(plan)
        await asyncio.shield(run.done)

    def _stop_plan(self) -> StopPlan:
        try:
            return stop_plan(self.state)
        except InvalidTransition:
            raise self._invalid("stop") from None

    def _begin_stop(self, plan: StopPlan) -> Run:
        self._fire(Event.stop)
        run = self._run
        assert run is not None
        timeout = run.definition.stop_timeout
        if plan is StopPlan.button or plan is StopPlan.resume_and_button:
            resume = plan is StopPlan.resume_and_button
            run.end_within(timeout, powerdown=True, was_paused=resume)
        else:
            # During a start the run cancels it; in stopping a kill or the guest's
            # own power-off is under way, and this makes sure it ends.
            run.end_within(timeout, powerdown=False)
        return run

    async def kill(self) -> None:
        """SIGKILL the VMM now (also during a start or a stop). Raises InvalidState."""
        self._fire(Event.kill)
        run = self._run
        assert run is not None
        run.kill()
        await asyncio.shield(run.done)

    async def pause(self) -> None:
        """Freeze the guest's CPUs. Raises InvalidState, Failed, Timeout."""
        await self._call(Event.pause, "pause", lambda c: c.pause())

    async def resume(self) -> None:
        """Let a paused guest run again. Raises InvalidState, Failed, Timeout."""
        await self._call(Event.resume, "resume", lambda c: c.resume())

    async def with_control(self, what: str, fn: Callable[[VmmControl], Awaitable[_T]]) -> _T:
        """Run ``fn`` on the running VMM's control channel (every call of it has a
        deadline), serialized with the other calls. Raises InvalidState unless
        the instance is running or paused, Timeout, and what ``fn`` raises."""
        return await self._call(Event.control, what, fn)

    async def _call(self, event: Event, what: str, fn: Callable[[VmmControl], Awaitable[_T]]) -> _T:
        async with self._lock:
            self._check(event, what)
            run = self._run
            assert run is not None and run.control is not None
            try:
                result = await fn(run.control)
            except VmmError as e:
                # The channel was lost because a kill or stop ended the VMM
                # meanwhile (the call is no longer possible), not because the host failed.
                self._check(event, what)
                raise Failed(f"cannot {what} {self.name}: {e}") from None
            self._fire(event)
            return result

    def send_guest(self, line: bytes) -> None:
        """Send one control line to the running guest, if it is connected."""
        if self._run is not None:
            self._run.send_guest(line)

    # -- daemon restarts ----------------------------------------------------------

    async def adopt(self, record: RunRecord) -> None:
        """Take back a VMM that an earlier daemon left running.

        Never raises: a VMM that has exited meanwhile gives ``failed`` with
        "exited while spectrumd was not running"; one that cannot be taken
        back is ended, and the instance is ``failed`` with the reason.
        """
        async with self._lock:
            proc = process.adopt(record.pid, record.start_time, record.token, record.exe)
            if proc is None:
                if self.env.uids is not None:
                    self.env.uids.release(self.name)
                shutil.rmtree(self.env.run_dir(self.name), ignore_errors=True)
                self._fire(Event.lost, reason="exited while spectrumd was not running")
                self.log.warning("%s", self.state_reason)
                return
            run = self._new_run()
            self._run = run
            try:
                paused = await run.adopt(record, proc)
            except Exception as e:
                self._run = None
                self._fire(Event.lost, reason=f"could not re-adopt the VMM: {e}")
                self.log.error("%s", self.state_reason)
                return
            self._fire(
                Event.adopted_paused if paused else Event.adopted,
                reason="re-adopted after a daemon restart",
                main_pid=proc.pid,
                started_at_us=record.started_at_us,
            )
            run.watch()
            self.log.info("re-adopted (pid %d)", proc.pid)

    async def detach(self) -> None:
        """Leave the VMM running and drop the daemon's hold on it (daemon exit)."""
        run, self._run = self._run, None
        if run is not None:
            await run.detach()


class _Events:
    """An instance's side of :class:`~spectrumd.supervisor.run.RunEvents`, for one run:
    what an earlier run reports after a newer one began is ignored."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.run: Run | None = None

    def _current(self) -> Run | None:
        run = self.run
        return run if run is not None and self.inst._run is run else None

    def vmm_spawned(self, pid: int) -> None:
        if self._current() is not None:
            self.inst._set(main_pid=pid)

    def guest_ready(self) -> None:
        if self._current() is not None:
            self.inst._set(guest_ready=True)

    def guest_exited(self, status: int) -> None:
        run = self._current()
        if run is not None:
            self.inst._guest_exited(run, status)

    def guest_failed(self, reason: str) -> None:
        run = self._current()
        if run is not None:
            self.inst._guest_failed(run, reason)

    def vmm_ended(self, event: Event, reason: str) -> None:
        run = self._current()
        if run is not None:
            self.inst._vmm_ended(run, event, reason)
